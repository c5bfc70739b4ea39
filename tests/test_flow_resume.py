"""A killed flow resumes, not restarts (#27, "A killed flow retrains from scratch").

Re-running the same task pipeline after a SIGKILL finds the interrupted run's folder (same inputs:
`lora_module.run_dirs.training_key`) and continues its training from `checkpoints/last.ckpt`; older
interrupted folders of the same inputs are removed, everything else is left alone. The end-to-end test
kills `lora-pipeline run` (with its training subprocess) mid-training and checks that the re-run's
adapter equals an uninterrupted training's bit for bit (LoRA dropout 0).
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
from test_flows import DATA, write_spec

from lora_module import contracts as c
from lora_module.contracts import RUN_STATE_FILE
from lora_module.run_dirs import DONE, RunDirBusyError, claim_run_dir, training_key
from lora_module.training.launcher import run_fit

ROOT = Path(__file__).resolve().parents[1]
KILL_AT = 4  # paused inside step 5, after the checkpoint of step 4


def _state(folder: Path) -> dict:
    return json.loads((folder / RUN_STATE_FILE).read_text())


def _interrupt(runs: Path, name: str, key: str) -> Path:
    """A run folder left by a run of `key` that died (its lock released, never finished)."""
    (runs / name).mkdir(parents=True)
    (runs / name / RUN_STATE_FILE).write_text(json.dumps({"key": key, "state": "running"}))
    return runs / name


# ---- claiming run folders (no training) ---------------------------------------------------------
def test_interrupted_run_of_the_same_inputs_is_adopted_and_older_ones_removed(tmp_path):
    runs = tmp_path / "runs"
    older, newer = _interrupt(runs, "20260101T000000Z-a", "K"), _interrupt(runs, "20260102T000000Z-b", "K")
    other = _interrupt(runs, "20260103T000000Z-c", "OTHER")
    with claim_run_dir(runs, "K", runs / "20260104T000000Z-d") as claim:
        assert claim.adopted and claim.path == newer and claim.removed == [older]
        claim.finish()
    assert not older.exists() and other.is_dir() and not (runs / "20260104T000000Z-d").exists()
    assert _state(newer)["state"] == DONE
    # Finished: the next run with the same inputs starts a new folder.
    with claim_run_dir(runs, "K", runs / "20260105T000000Z-e") as claim:
        assert not claim.adopted and claim.path == runs / "20260105T000000Z-e" and claim.removed == []
    assert _state(other)["state"] == "running"  # another key's interrupted run is left for its own re-run


def test_a_run_folder_in_use_is_never_adopted(tmp_path):
    runs = tmp_path / "runs"
    with claim_run_dir(runs, "K", runs / "live") as live:
        with claim_run_dir(runs, "K", runs / "second") as second:  # a concurrent run, same inputs
            assert not second.adopted and second.path == runs / "second" and live.path.is_dir()
        with pytest.raises(RunDirBusyError, match="in use by another process"):
            with claim_run_dir(runs, "OTHER", runs / "live"):
                pass


def test_training_key_follows_inputs_and_config_contents(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("a: 1\n")
    key = training_key({"spec": {"x": 1}}, [config, None])
    assert key == training_key({"spec": {"x": 1}}, [config, None])
    assert key != training_key({"spec": {"x": 2}}, [config, None])
    config.write_text("a: 2\n")
    assert key != training_key({"spec": {"x": 1}}, [config, None])


# ---- end to end: SIGKILL `lora-pipeline run`, run it again ----------------------------------------
def _spec(tmp_path: Path, base: Path) -> Path:
    probe = tmp_path / "probe.yaml"
    init = {"marker": str(tmp_path / "paused"), "at_step": KILL_AT}
    probe.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "flow_resume_probe.PauseOnce", "init_args": init}]}}))
    train = ["--trainer.max_steps", "7", "--data.batch_size", "8", "--trainer.enable_progress_bar", "false",
             "--model.checkpoint_every_n_steps", "2", "--config", str(probe)]
    return write_spec(tmp_path, "tiny_resume", "summary", base, full=False, train_overrides=train,
                      lora_overrides=["--model.lora.lora_dropout", "0.0"], eval_limit=4,
                      data_overrides={**DATA, "demo_train_size": 24})


def _kill_run_when_paused(cmd: list[str], env: dict, tmp_path: Path) -> None:
    log = open(tmp_path / "killed.log", "w")  # noqa: SIM115 (the child writes to it)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while not (tmp_path / "paused").exists():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the training never reached its pause point"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the flow process and its training subprocess
        proc.wait(timeout=60)
        log.close()


@pytest.mark.slow
def test_sigkill_of_lora_pipeline_run_then_rerun_resumes_to_the_uninterrupted_adapter(
        harness, prefect_api, tmp_path, tiny_t5_dir, monkeypatch):
    """Slow (~1-2 min on 2 cores): three trainings, two flow runs, one of them in its own process."""
    from lora_pipeline.flows.pipeline import main

    spec, home = _spec(tmp_path, tiny_t5_dir), tmp_path / "home"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    args = ["--task", str(spec), "--home", str(home), "--no-full", "--max-concurrency", "1"]
    cmd = [str(Path(sys.executable).parent / "lora-pipeline"), "run", *args]
    _kill_run_when_paused(cmd, {**os.environ, "PREFECT_API_URL": prefect_api}, tmp_path)
    [killed] = list((home / "runs" / "tiny_resume").iterdir())
    last = killed / "lora" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == KILL_AT
    assert not (killed / "lora" / c.ADAPTER_DIR).exists()

    assert main(args) == 0  # the same command again
    assert list((home / "runs" / "tiny_resume").iterdir()) == [killed]  # adopted, no new folder
    assert _state(killed)["state"] == DONE
    assert f"--ckpt_path {last}" in (killed / "lora" / "logs" / "fit.log").read_text()
    metrics = json.loads((killed / "lora" / c.METRICS_FILE).read_text())
    assert metrics["steps"] == 7

    # The uninterrupted training with the flow's own arguments (the probe no longer pauses).
    prepared = next(d for d in (home / "data").iterdir() if (d / c.MANIFEST_FILE).is_file())
    loaded = yaml.safe_load(spec.read_text())
    flow_args = ["--model.model_name_or_path", str(tiny_t5_dir), "--data.prepared_dir", str(prepared),
                 *loaded["train_overrides"], *loaded["lora_overrides"], "--trainer.logger", "false"]
    straight = run_fit(loaded["lora_config"], flow_args, output_dir=tmp_path / "straight")
    got = load_file(killed / "lora" / c.ADAPTER_DIR / c.ADAPTER_WEIGHTS_FILE)
    want = load_file(straight / c.ADAPTER_DIR / c.ADAPTER_WEIGHTS_FILE)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_an_adopted_folder_whose_training_finished_is_not_trained_again(tmp_path, monkeypatch):
    import lora_module.training.launcher as launcher
    from lora_module.training.outputs import publish
    from lora_pipeline.flows import tasks

    def write(folder: Path) -> None:
        (folder / c.ADAPTER_DIR).mkdir()
        (folder / c.METRICS_FILE).write_text(json.dumps({"steps": 7}))
        (folder / c.CONFIG_FILE).write_text("model: {}\n")

    monkeypatch.setattr(launcher, "run_fit", lambda *a, **k: pytest.fail("trained again"))
    out = tmp_path / "lora"
    publish(out, write)  # what a fit leaves when it ends
    done = tasks.train.fn("unused.yaml", [], str(out), "sqlite:///x.db", "lora-x", {})
    assert done["finished_before"] and done["metrics"] == {"steps": 7} and done["path"] == str(out.resolve())
