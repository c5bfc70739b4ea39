"""FSDP training exports the adapter a DDP run exports (#25 item 5): the sharded tensors are gathered on
rank 0 before the export, and the saved keys are the unwrapped (PEFT) ones.

    .venv/bin/pytest tests/test_fsdp.py -q            # the 2-process CPU runs are `slow`; -m gpu: CUDA

On a CPU, Lightning's FSDPStrategy runs through `fsdp_cpu.CpuFSDPBlocks` (see that module: the same
strategy with the two CPU-only fixes, and one FSDP unit per T5 block). On a GPU the test uses
`--trainer.strategy fsdp`, as a user would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.strategies import FSDPStrategy
from safetensors.torch import load_file, save_file
from test_training import prepare_tiny
from test_training_cli import DEMO_CONFIG, overrides

from lora_module.contracts import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_DIR,
    ADAPTER_SIDECAR_FILE,
    ADAPTER_WEIGHTS_FILE,
    METRICS_FILE,
)
from lora_module.errors import SettingsError
from lora_module.training.export import _unwrap_saved_keys
from lora_module.training.fsdp import gathered_parameters, is_fsdp, unwrapped_name
from lora_module.training.launcher import TrainingError, run_fit
from lora_module.training.module import FineTuneModule

TESTS = Path(__file__).resolve().parent
NO_CUDA = "needs a CUDA GPU: torch.cuda.is_available() is False (no GPU, or a CPU build of torch)"
CPU_FSDP = json.dumps({"class_path": "fsdp_cpu.CpuFSDPBlocks"})


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory, seq2seq_tokenizer_dir) -> Path:
    return prepare_tiny(seq2seq_tokenizer_dir, "seq2seq", tmp_path_factory.mktemp("prepared"))


def _fit(model_dir: Path, prepared: Path, out: Path, strategy: str, devices: int, *extra: str,
         resume: bool = False) -> Path:
    """4 steps of the shipped demo config (its gradient clipping included) under `strategy`, with a
    checkpoint every 2 steps."""
    args = overrides(model_dir, prepared, out, 4, "--trainer.devices", str(devices), "--trainer.strategy",
                     strategy, "--trainer.logger", "false", "--model.checkpoint_every_n_steps", "2", *extra)
    python_path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": python_path}
    return run_fit(DEMO_CONFIG, args, env=env, timeout=600, output_dir=out, resume=resume)


def _interrupted_and_resumed(model_dir: Path, prepared: Path, out: Path, strategy: str, devices: int,
                             *extra: str) -> Path:
    """A fit stopped by an error before step 2 (its last checkpoint: step 2), then resumed to step 4."""
    stop = out.parent / "fail_at_step_2.yaml"
    stop.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "fsdp_cpu.FailAtStep", "init_args": {"step": 2}}]}}))
    with pytest.raises(TrainingError, match="FailAtStep"):
        _fit(model_dir, prepared, out, strategy, devices, "--config", str(stop), *extra)
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2 and not (out / ADAPTER_DIR).exists()
    assert all("lora_" in key for key in checkpoint["state_dict"])  # the adapter only, gathered
    assert len(checkpoint["state_dict"]) == 2 * sum(1 for k in checkpoint["state_dict"] if "lora_A" in k)
    return _fit(model_dir, prepared, out, strategy, devices, *extra, resume=True)


def _assert_same_adapter(fsdp: Path, reference: Path) -> None:
    """Same keys (no wrapper names), tensors equal up to float reduction order, same config and base."""
    ours = load_file(fsdp / ADAPTER_DIR / ADAPTER_WEIGHTS_FILE)
    theirs = load_file(reference / ADAPTER_DIR / ADAPTER_WEIGHTS_FILE)
    assert sorted(ours) == sorted(theirs)
    assert all(unwrapped_name(k) == k and k.startswith("base_model.model.") for k in ours)
    for key, value in theirs.items():
        assert ours[key].shape == value.shape
        torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert any(v.abs().sum() > 0 for k, v in theirs.items() if "lora_B" in k)  # trained: B starts at zero
    for name in (ADAPTER_CONFIG_FILE, ADAPTER_SIDECAR_FILE):
        config = [json.loads((run / ADAPTER_DIR / name).read_text()) for run in (fsdp, reference)]
        config[0].pop("lora_pipeline", None), config[1].pop("lora_pipeline", None)  # losses differ slightly
        assert config[0] == config[1], name
    metrics = [json.loads((run / METRICS_FILE).read_text()) for run in (fsdp, reference)]
    for key in ("trainable_params", "total_params", "steps", "base_fingerprint", "world_size"):
        assert metrics[0][key] == metrics[1][key], key
    assert metrics[0]["train_loss"] == pytest.approx(metrics[1]["train_loss"], rel=1e-5)


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_interrupted_and_resumed_exports_the_ddp_adapter(
    tiny_t5_dir, prepared_dir, tmp_path
):
    """3 fits of 2 processes each (2 minutes; 8 on a 2-core machine shared 7 ways): the only way to shard
    for real without a GPU. One FSDP unit per T5 block, gradient clipping on, a checkpoint saved, resumed."""
    ddp = _fit(tiny_t5_dir, prepared_dir, tmp_path / "ddp", "ddp", 2)
    fsdp = _interrupted_and_resumed(tiny_t5_dir, prepared_dir, tmp_path / "fsdp", CPU_FSDP, 2)
    _assert_same_adapter(fsdp, ddp)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_fsdp_on_cuda_interrupted_and_resumed_exports_the_ddp_adapter(tiny_t5_dir, prepared_dir, tmp_path):
    """`--trainer.strategy fsdp` as a user gives it: Lightning's own CUDA path (offloading included)."""
    devices = min(2, torch.cuda.device_count())  # one GPU: FSDP still flattens and gathers; two: shards
    gpu = ("--trainer.accelerator", "gpu")
    ddp = _fit(tiny_t5_dir, prepared_dir, tmp_path / "ddp", "ddp", devices, *gpu)
    fsdp = _interrupted_and_resumed(tiny_t5_dir, prepared_dir, tmp_path / "fsdp", "fsdp", devices, *gpu)
    _assert_same_adapter(fsdp, ddp)


def test_wrapper_name_parts_are_removed_from_saved_keys(tmp_path):
    wrapped = "base_model.model.encoder.block.0._fsdp_wrapped_module.layer.0._checkpoint_wrapped_module.q"
    assert unwrapped_name(wrapped) == "base_model.model.encoder.block.0.layer.0.q"
    weights = tmp_path / ADAPTER_WEIGHTS_FILE
    a, b = torch.randn(2, 8), torch.randn(8, 2)
    save_file({f"{wrapped}.lora_A.weight": a, f"{wrapped}.lora_B.weight": b}, str(weights))
    _unwrap_saved_keys(weights)
    saved = load_file(weights)
    assert sorted(saved) == ["base_model.model.encoder.block.0.layer.0.q.lora_A.weight",
                             "base_model.model.encoder.block.0.layer.0.q.lora_B.weight"]
    assert torch.equal(saved["base_model.model.encoder.block.0.layer.0.q.lora_A.weight"], a)
    before = weights.read_bytes()
    _unwrap_saved_keys(weights)  # clean keys: the file is left as it is
    assert weights.read_bytes() == before


def _attach(module: FineTuneModule, strategy: object) -> None:
    """Just enough of a Trainer for `is_fsdp` and `setup`: a strategy and no data module."""
    module._trainer = type("TrainerStub", (), {"strategy": strategy, "datamodule": None})()


def test_without_fsdp_nothing_is_gathered(tiny_t5_dir):
    module = FineTuneModule(str(tiny_t5_dir))
    assert not is_fsdp(module)  # no trainer
    with gathered_parameters(module):  # not FSDP: a no-op, no process group needed
        pass
    _attach(module, object())
    assert not is_fsdp(module)


@pytest.mark.parametrize(("settings", "message"), [
    ({"early_stopping": {"patience": 2}}, "model.early_stopping does not work with trainer.strategy fsdp"),
    ({"finetune": "qlora"}, "model.finetune 'qlora' does not work with trainer.strategy fsdp"),
], ids=["early-stopping", "qlora"])
def test_what_fsdp_cannot_do_is_refused_in_one_line(tiny_t5_dir, settings, message):
    """QLoRA: FSDP's flattening raises "Must flatten tensors with uniform dtype" (float32 and uint8)."""
    module = FineTuneModule(str(tiny_t5_dir), **settings)
    _attach(module, FSDPStrategy())
    assert is_fsdp(module)
    with pytest.raises(SettingsError, match=message) as refused:
        module.setup("fit")
    assert "\n" not in str(refused.value)
