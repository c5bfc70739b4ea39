"""Faults during training lose nothing: exact resume after SIGKILL, outputs that appear whole.

    .venv/bin/pytest tests/test_training_resume.py -q

The resume test runs the real CLI (`python -m lora_module.training fit`) with the shipped config
`demo_summary_lora.yaml` (max_epochs set, validation each epoch) on a tiny T5, checkpoints every
2 steps, kills one run with SIGKILL in the middle of an epoch and resumes it with
`--ckpt_path last`. The resumed adapter must equal the uninterrupted run's, with dropout 0 and
with dropout 0.1, and the resumed run must train exactly the batches the killed one had not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_training import prepare_tiny

from lora_module.registry.inputs import RegistrationInputError, read_inputs
from lora_module.training import export, outputs
from lora_module.training.cli import main
from lora_module.training.outputs import current_outputs

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "deploy" / "configs" / "demo_summary_lora.yaml"
EPOCHS, BATCHES_PER_EPOCH, KILL_AFTER = 3, 5, 8  # step 8 = batch 3 of epoch 2: mid-epoch


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory, seq2seq_tokenizer_dir) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    return prepare_tiny(seq2seq_tokenizer_dir, "seq2seq", root, n_train=4 * BATCHES_PER_EPOCH)


def fit_args(model: Path, prepared: Path, out: Path, dropout: float, *extra: str) -> list[str]:
    return [
        "--model.model_name_or_path", str(model),
        "--data.prepared_dir", str(prepared),
        "--model.output_dir", str(out),
        "--model.lora.lora_dropout", str(dropout),
        "--model.checkpoint_every_n_steps", "2",
        "--trainer.max_epochs", str(EPOCHS),
        "--trainer.accelerator", "cpu",
        "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
        "--data.batch_size", "4",
        *extra,
    ]  # fmt: skip


def probe_config(tmp: Path, name: str, pause_at: int | None = None) -> Path:
    """A config file adding the BatchLog probe (tests/resume_probe.py), which writes `<name>.batches`."""
    probe = tmp / f"{name}.probe.yaml"
    init = {"path": str(tmp / f"{name}.batches"), "pause_at": pause_at}
    probe.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "resume_probe.BatchLog", "init_args": init}]}}))
    return probe


def start_fit(args: list[str], tmp: Path, name: str, pause_at: int | None = None) -> subprocess.Popen:
    """A real training process (the CLI the launcher runs), with the probe."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    cmd = [sys.executable, "-m", "lora_module.training", "fit", "--config", str(DEMO_CONFIG),
           "--config", str(probe_config(tmp, name, pause_at)), *args]
    return subprocess.Popen(cmd, env=env, stdout=open(tmp / f"{name}.log", "w"), stderr=subprocess.STDOUT)


def kill_when_paused(proc: subprocess.Popen, tmp: Path, name: str) -> None:
    marker, deadline = tmp / f"{name}.batches.paused", time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, (tmp / f"{name}.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run to kill never reached its pause point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def run_killed_and_resumed(model: Path, prepared: Path, tmp_path: Path, dropouts, procs: list) -> None:
    """Per dropout: an uninterrupted run, and a run killed by SIGKILL mid-epoch then resumed from `last`."""
    killed = {d: start_fit(fit_args(model, prepared, tmp_path / f"resumed{d}", d), tmp_path,
                           f"killed{d}", pause_at=KILL_AFTER) for d in dropouts}
    procs += killed.values()
    for d in dropouts:  # uninterrupted runs through the same CLI, in this process, while those start
        main(["fit", "--config", str(DEMO_CONFIG), "--config", str(probe_config(tmp_path, f"straight{d}")),
              *fit_args(model, prepared, tmp_path / f"straight{d}", d)])
    resumed = {}
    for d in dropouts:
        kill_when_paused(killed[d], tmp_path, f"killed{d}")
        last = tmp_path / f"resumed{d}" / "checkpoints" / "last.ckpt"
        assert torch.load(last, weights_only=False)["global_step"] == KILL_AFTER
        assert not (tmp_path / f"resumed{d}" / "adapter").exists()  # nothing exported by the killed run
        resumed[d] = start_fit(fit_args(model, prepared, tmp_path / f"resumed{d}", d, "--ckpt_path", "last"),
                               tmp_path, f"resumed{d}")
        procs.append(resumed[d])
    for d, proc in resumed.items():
        assert proc.wait(timeout=300) == 0, (tmp_path / f"resumed{d}.log").read_text()[-3000:]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_last_equals_uninterrupted_run(
    tiny_t5_dir, prepared_dir, tmp_path
):
    dropouts, procs = (0.0, 0.1), []
    try:
        run_killed_and_resumed(tiny_t5_dir, prepared_dir, tmp_path, dropouts, procs)
    finally:  # a failed assertion must not leave paused trainings behind
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    total = EPOCHS * BATCHES_PER_EPOCH
    for d in dropouts:
        straight, resumed = tmp_path / f"straight{d}", tmp_path / f"resumed{d}"
        assert "no last checkpoint available" not in (tmp_path / f"resumed{d}.log").read_text()
        log = {n: (tmp_path / f"{n}{d}.batches").read_text().splitlines()
               for n in ("straight", "killed", "resumed")}
        assert len(log["straight"]) == total and len(log["killed"]) == KILL_AFTER
        # The resumed run trained exactly the batches the killed one had not, in the same order.
        assert log["killed"] + log["resumed"] == log["straight"]
        for out in (straight, resumed):
            metrics = json.loads((out / "metrics.json").read_text())
            assert metrics["steps"] == total and metrics["epochs"] == EPOCHS
        a, b = adapter(straight), adapter(resumed)
        assert a.keys() == b.keys()
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        print(f"lora_dropout={d}: max |resumed - uninterrupted| = {diff:.3g}")
        assert diff <= 1e-6, (d, diff)
    # Dropout 0.1 really drew masks: its adapter differs from the dropout-0 one.
    assert max((adapter(tmp_path / "straight0.0")[k] - adapter(tmp_path / "straight0.1")[k]).abs().max()
               for k in adapter(tmp_path / "straight0.0")) > 1e-4


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def test_ckpt_path_last_without_checkpoint_or_missing_file_fails_in_one_line(
    tiny_t5_dir, prepared_dir, tmp_path, capsys
):
    out = tmp_path / "fresh"
    for ckpt, expected in (("last", "nothing to resume"), (str(tmp_path / "nope.ckpt"), "does not exist")):
        with pytest.raises(SystemExit) as e:
            main(["fit", "--config", str(DEMO_CONFIG),
                  *fit_args(tiny_t5_dir, prepared_dir, out, 0.0, "--ckpt_path", ckpt)])
        assert e.value.code == 2
        message = one_error_line(capsys)
        assert expected in message and str(out / "checkpoints" / "last.ckpt") in message, message
    assert not out.exists()


def test_resume_with_another_lora_r_names_both(tiny_t5_dir, prepared_dir, tmp_path, capsys):
    out = tmp_path / "r4"  # the demo config's rank
    main(["fit", "--config", str(DEMO_CONFIG), *fit_args(tiny_t5_dir, prepared_dir, out, 0.0),
          "--trainer.max_epochs", "-1", "--trainer.max_steps", "2"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(DEMO_CONFIG), *fit_args(tiny_t5_dir, prepared_dir, out, 0.0),
              "--model.lora.r", "2", "--ckpt_path", "last"])
    assert e.value.code == 2
    message = one_error_line(capsys)
    assert "LoRA r=4" in message and "model.lora.r=2" in message and "last.ckpt" in message, message


def test_resume_with_loraplus_switched_on_names_the_setting(tiny_t5_dir, prepared_dir, tmp_path, capsys):
    """LoRA+ decides the optimizer's parameter groups: a resume that changes it is refused in one line
    (torch would otherwise fail deep in the optimizer's load_state_dict)."""
    out = tmp_path / "plain"
    main(["fit", "--config", str(DEMO_CONFIG), *fit_args(tiny_t5_dir, prepared_dir, out, 0.0),
          "--trainer.max_epochs", "-1", "--trainer.max_steps", "2"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(DEMO_CONFIG), *fit_args(tiny_t5_dir, prepared_dir, out, 0.0),
              "--model.loraplus_lr_ratio", "16", "--trainer.max_steps", "4", "--ckpt_path", "last"])
    assert e.value.code == 2
    message = one_error_line(capsys)
    assert "loraplus_lr_ratio=None" in message and "16.0" in message, message


# ---- whole outputs ------------------------------------------------------------------------------


class SimulatedKill(RuntimeError):
    """Stands for the process dying at that point (a real kill cannot be caught in-process)."""


def fit_in_process(model: Path, prepared: Path, out: Path, r: int) -> None:
    """Two steps through the CLI (which used to write config.yaml as the run started)."""
    main(["fit", "--config", str(DEMO_CONFIG), *fit_args(model, prepared, out, 0.0),
          "--model.lora.r", str(r), "--trainer.max_epochs", "-1", "--trainer.max_steps", "2"])


def assert_whole(out: Path, r: int) -> None:
    """config.yaml, metrics.json and adapter/ of `out` describe one and the same adapter with rank r."""
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"]["lora"]["r"] == r
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == r
    inputs = read_inputs("whole", out / "adapter", None, out, None, "rougeL")  # checks sha and r
    assert inputs.adapter_config["r"] == r


@pytest.mark.parametrize("fail_at", ["adapter save", "after all files written", "switch"])
def test_export_killed_midway_leaves_previous_outputs_whole(
    fail_at, tiny_t5_dir, prepared_dir, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    fit_in_process(tiny_t5_dir, prepared_dir, out, r=8)
    assert_whole(out, 8)
    files = ("config.yaml", "metrics.json", "adapter/adapter_model.safetensors")
    before = {p: (out / p).read_bytes() for p in files}

    def crash(*args, **kwargs):
        raise SimulatedKill(f"killed during {fail_at}")

    if fail_at == "adapter save":
        monkeypatch.setattr(export, "_save_adapter", crash)
    elif fail_at == "after all files written":
        write_outputs = export._write_outputs

        def written_then_killed(*args):
            write = write_outputs(*args)
            return lambda folder: (write(folder), crash())

        monkeypatch.setattr(export, "_write_outputs", written_then_killed)
    else:
        monkeypatch.setattr(outputs, "_symlink_atomically", crash)
    with pytest.raises(SimulatedKill):
        fit_in_process(tiny_t5_dir, prepared_dir, out, r=4)
    monkeypatch.undo()
    assert {p: (out / p).read_bytes() for p in before} == before
    assert_whole(out, 8)

    fit_in_process(tiny_t5_dir, prepared_dir, out, r=4)  # a complete re-run replaces everything at once
    assert_whole(out, 4)
    assert [p.name for p in (out / "exports").iterdir()] == [current_outputs(out).name]


def test_registration_refuses_training_folder_that_disagrees_with_adapter(
    tiny_t5_dir, prepared_dir, tmp_path
):
    out = tmp_path / "run"
    fit_in_process(tiny_t5_dir, prepared_dir, out, r=8)
    mixed = tmp_path / "mixed"  # what a killed re-run used to leave: a new config beside the old adapter
    mixed.mkdir()
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["model"]["lora"]["r"] = 4
    (mixed / "config.yaml").write_text(yaml.safe_dump(config))
    (mixed / "metrics.json").write_text((out / "metrics.json").read_text())
    with pytest.raises(RegistrationInputError) as e:
        read_inputs("mixed", out / "adapter", None, mixed, None, "rougeL")
    assert "model.lora.r=4" in str(e.value) and "r=8" in str(e.value)

    metrics = json.loads((out / "metrics.json").read_text())
    (mixed / "config.yaml").write_text((out / "config.yaml").read_text())
    (mixed / "metrics.json").write_text(json.dumps({**metrics, "adapter_sha256": "0" * 64}))
    with pytest.raises(RegistrationInputError, match="adapter_sha256 000000000000"):
        read_inputs("mixed", out / "adapter", None, mixed, None, "rougeL")
