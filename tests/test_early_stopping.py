"""Early stopping exports the best checkpoint's adapter and records where it came from.

    .venv/bin/pytest tests/test_early_stopping.py -q

A tiny T5 trained with a constant learning rate high enough to overfit 8 rows: its validation loss
falls, then rises. A probe callback records the validation loss and the adapter tensors at every
validation, so the tests know independently of the code under test which step was best. Each fit
takes about a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping
from mlflow_server import client_for
from safetensors.torch import load_file
from test_training import prepare_tiny

from lora_module import LoraConfig
from lora_module import contracts as c
from lora_module.errors import SettingsError
from lora_module.training.cli import ConfigParseError, LoraCLI, PipelineMLFlowLogger, parse_config
from lora_module.training.datamodule import PreparedDataModule
from lora_module.training.early_stopping import BestCheckpoint, EarlyStoppingConfig, check_early_stopping
from lora_module.training.module import FineTuneModule

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "deploy" / "configs" / "demo_summary_lora.yaml"
MAX_STEPS, BATCHES_PER_EPOCH, PATIENCE = 40, 2, 2
PATHS = ("--model.model_name_or_path", "base", "--data.prepared_dir", "prepared")  # not read by parse_config
LORA = LoraConfig(r=4, lora_alpha=16, target_modules=["q", "k", "v", "o", "wi", "wo"])


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory, seq2seq_tokenizer_dir) -> Path:
    return prepare_tiny(seq2seq_tokenizer_dir, "seq2seq", tmp_path_factory.mktemp("prepared"),
                        n_train=4 * BATCHES_PER_EPOCH)


class ValidationProbe(L.Callback):
    """Records (global step, val/loss, adapter tensors) after every validation run."""

    def __init__(self):
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.steps.append(trainer.global_step)
        self.losses.append(float(trainer.callback_metrics["val/loss"]))
        self.states[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def fit(model: Path, prepared: Path, out: Path, early_stopping: EarlyStoppingConfig | None,
        max_steps: int = MAX_STEPS, ckpt_path: str | None = None, **trainer_kw) -> ValidationProbe:
    """A plain-Trainer fit of the tiny T5 with a constant learning rate high enough to overfit."""
    torch.manual_seed(0)
    module = FineTuneModule(str(model), lora=LORA, learning_rate=1e-2, scheduler="constant",
                            early_stopping=early_stopping, output_dir=str(out))
    probe = ValidationProbe()
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, gradient_clip_val=1.0,
                        callbacks=[probe, *trainer_kw.pop("callbacks", [])],
                        **{"logger": False, **trainer_kw})
    trainer.fit(module, datamodule=PreparedDataModule(str(prepared), batch_size=4), ckpt_path=ckpt_path)
    return probe


def exported(out: Path) -> dict[str, torch.Tensor]:
    """The exported adapter's tensors under the module's state_dict names: PEFT's
    `base_model.model.<path>.lora_A.weight` is `model.model.<path>.lora_A.default.weight` there."""
    tensors = load_file(out / c.ADAPTER_DIR / c.ADAPTER_WEIGHTS_FILE)
    prefix = "base_model.model."
    return {"model.model." + k[len(prefix):].replace(".weight", ".default.weight"): v
            for k, v in tensors.items()}


def checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:4]
    return max((a[k] - b[k]).abs().max().item() for k in a)


def cli_args(model: Path, prepared: Path, out: Path, max_steps: int, *extra: str) -> list[str]:
    """`fit` with the shipped demo config, early stopping on, a constant learning rate that overfits."""
    return [
        "fit", "--config", str(DEMO_CONFIG),
        "--model.model_name_or_path", str(model), "--data.prepared_dir", str(prepared),
        "--model.output_dir", str(out), "--model.early_stopping.patience", str(PATIENCE),
        "--model.learning_rate", "1e-2", "--model.scheduler", "constant", "--model.warmup_ratio", "0",
        "--model.lora.lora_dropout", "0", "--trainer.max_epochs", "-1", "--trainer.max_steps", str(max_steps),
        "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--data.batch_size", "4", *extra,
    ]  # fmt: skip


def test_stops_when_validation_loss_rises_and_exports_the_best_checkpoint(tiny_t5_dir, prepared_dir,
                                                                         tmp_path):
    out = tmp_path / "run"
    cli = LoraCLI(args=cli_args(tiny_t5_dir, prepared_dir, out, MAX_STEPS,
                                "--trainer.callbacks+=test_early_stopping.ValidationProbe"))
    probe = next(cb for cb in cli.trainer.callbacks if isinstance(cb, ValidationProbe))
    metrics = json.loads((out / c.METRICS_FILE).read_text())
    record = metrics["early_stopping"]

    # The validation loss went down, then up for PATIENCE validations in a row: training stopped there.
    best_index = probe.losses.index(min(probe.losses))
    best_step = probe.steps[best_index]
    assert 0 < best_index and len(probe.losses) - 1 - best_index == PATIENCE, probe.losses
    assert metrics["steps"] == probe.steps[-1] < MAX_STEPS
    assert record["stopped_early"] and record["stop_reason"] == "patience_exhausted"

    # The record names the best step, its epoch (0-based, validation at each epoch end) and its value.
    assert record["best_step"] == best_step
    assert record["best_epoch"] == best_step // BATCHES_PER_EPOCH - 1
    assert record["best_value"] == pytest.approx(probe.losses[best_index], rel=1e-6)
    assert metrics["val_loss"] == record["best_value"]  # the exported adapter's, not the last run's
    assert record["best_checkpoint"] == str(out / "checkpoints" / "best.ckpt")
    settings = {"monitor": "val/loss", "patience": PATIENCE, "min_delta": 0.0, "mode": "min"}
    assert settings.items() <= record.items()

    # The exported adapter is the best checkpoint's weights, as they were at the best step, not the last.
    adapter = exported(out)
    assert max_diff(adapter, checkpoint_state(out / "checkpoints" / "best.ckpt")) == 0.0
    assert max_diff(adapter, probe.states[best_step]) == 0.0
    assert max_diff(adapter, checkpoint_state(out / "checkpoints" / "last.ckpt")) > 1e-4
    assert max_diff(probe.states[probe.steps[-1]], checkpoint_state(out / "checkpoints" / "last.ckpt")) == 0.0

    sidecar = json.loads((out / c.ADAPTER_DIR / c.ADAPTER_SIDECAR_FILE).read_text())
    assert sidecar["lora_pipeline"]["early_stopping"] == record
    config = yaml.safe_load((out / c.CONFIG_FILE).read_text())
    assert config["model"]["early_stopping"]["patience"] == PATIENCE


def test_the_mlflow_run_is_tagged_with_the_best_step(tiny_t5_dir, prepared_dir, tmp_path, mlflow_server):
    logger = PipelineMLFlowLogger(experiment_name="early-stopping", tracking_uri=mlflow_server.uri)
    probe = fit(tiny_t5_dir, prepared_dir, tmp_path / "run", EarlyStoppingConfig(patience=PATIENCE),
                max_steps=6, logger=logger)
    metrics = json.loads((tmp_path / "run" / c.METRICS_FILE).read_text())
    tags = client_for(mlflow_server.uri).get_run(metrics["mlflow_run_id"]).data.tags
    best_step = probe.steps[probe.losses.index(min(probe.losses))]
    assert tags["early_stopping.best_step"] == str(best_step) == str(metrics["early_stopping"]["best_step"])
    assert tags["early_stopping.monitor"] == "val/loss" and tags["early_stopping.stopped_early"] == "False"
    assert "early_stopping.stop_reason" not in tags  # None values are left out


def test_without_early_stopping_the_last_state_is_exported(tiny_t5_dir, prepared_dir, tmp_path):
    out = tmp_path / "run"
    probe = fit(tiny_t5_dir, prepared_dir, out, None, max_steps=8)
    metrics = json.loads((out / c.METRICS_FILE).read_text())
    assert metrics["early_stopping"] is None and metrics["steps"] == 8
    assert metrics["val_loss"] == pytest.approx(probe.losses[-1], rel=1e-6)
    assert max_diff(exported(out), checkpoint_state(out / "checkpoints" / "last.ckpt")) == 0.0
    assert not (out / "checkpoints" / "best.ckpt").exists()


def test_hand_added_early_stopping_warns_that_the_last_state_is_exported(tiny_t5_dir, prepared_dir, tmp_path):
    with pytest.warns(UserWarning, match="model.early_stopping"):
        fit(tiny_t5_dir, prepared_dir, tmp_path / "run", None, max_steps=2,
            callbacks=[EarlyStopping(monitor="val/loss")])


def test_early_stopping_without_validation_batches_fails_in_one_line(tiny_t5_dir, prepared_dir, tmp_path):
    with pytest.raises(SettingsError, match="model.early_stopping needs validation data") as e:
        fit(tiny_t5_dir, prepared_dir, tmp_path / "run", EarlyStoppingConfig(), max_steps=2,
            limit_val_batches=0)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / c.METRICS_FILE).exists()


def best_state_in(last: Path) -> dict:
    callbacks = torch.load(last, map_location="cpu", weights_only=False)["callbacks"]
    return next(v for k, v in callbacks.items() if k.startswith(BestCheckpoint.__qualname__))


def test_resume_from_last_continues_with_the_best_so_far(tiny_t5_dir, prepared_dir, tmp_path):
    """A fit interrupted at its best step and resumed from last.ckpt (what `--ckpt_path last` loads) stops
    at the same step and exports the same adapter as the uninterrupted fit."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    early_stopping = EarlyStoppingConfig(patience=PATIENCE)
    fit(tiny_t5_dir, prepared_dir, straight, early_stopping)
    record = json.loads((straight / c.METRICS_FILE).read_text())["early_stopping"]
    assert record["stopped_early"], record

    fit(tiny_t5_dir, prepared_dir, resumed, early_stopping, max_steps=record["best_step"])
    last = resumed / "checkpoints" / "last.ckpt"
    # last.ckpt was written after this validation's best checkpoint, so it holds the new best.
    assert best_state_in(last)["best_model_score"] == pytest.approx(record["best_value"], rel=1e-6)
    fit(tiny_t5_dir, prepared_dir, resumed, early_stopping, ckpt_path=str(last))

    again = json.loads((resumed / c.METRICS_FILE).read_text())
    assert again["steps"] == json.loads((straight / c.METRICS_FILE).read_text())["steps"]
    assert {**again["early_stopping"], "best_checkpoint": None} == {**record, "best_checkpoint": None}
    assert max_diff(exported(resumed), exported(straight)) == 0.0


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("monitor", "val/rouge", "model.early_stopping.monitor must be one of ['val/loss'], got 'val/rouge'"),
    ("patience", "0", "model.early_stopping.patience must be an integer >= 1"),
    ("mode", "up", "model.early_stopping.mode must be 'min' or 'max', got 'up'"),
    ("mode", "max", "model.early_stopping.mode 'max' would keep the worst val/loss"),
    ("min_delta", "-0.1", "model.early_stopping.min_delta must be a finite number >= 0"),
])
def test_bad_settings_fail_in_one_line_naming_the_key(option, value, expected):
    args = ["--config", str(DEMO_CONFIG), *PATHS, f"--model.early_stopping.{option}", value]
    with pytest.raises(ConfigParseError) as e:
        parse_config(args, quiet=True)
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_early_stopping_without_validation_runs_is_refused_before_training():
    args = ["--config", str(DEMO_CONFIG), *PATHS, "--model.early_stopping.patience", "3",
            "--trainer.limit_val_batches", "0"]
    with pytest.raises(ConfigParseError, match="needs validation runs but trainer.limit_val_batches is 0"):
        parse_config(args, quiet=True)


def test_shipped_setting_and_its_default():
    config = parse_config(["--config", str(DEMO_CONFIG), *PATHS], quiet=True)
    assert config.model.early_stopping is None  # off: the demo exports its last state, as measured
    on = parse_config(["--config", str(DEMO_CONFIG), *PATHS, "--model.early_stopping.patience", "3"],
                      quiet=True)
    assert check_early_stopping(on.model.early_stopping.as_dict()) == EarlyStoppingConfig(patience=3)
    with pytest.raises(SettingsError, match="has no field 'wait'"):
        check_early_stopping({"wait": 3})
