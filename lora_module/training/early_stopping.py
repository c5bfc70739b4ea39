"""Early stopping on the validation loss that exports the best checkpoint's adapter, not the last state.

    model:                          # in a training config (deploy/configs/demo_summary_lora.yaml)
      early_stopping: {monitor: val/loss, patience: 3, min_delta: 0.0, mode: min}    # null: off
    lora-pipeline fit --config ... --model.early_stopping.patience 3       # on; other fields default

On, `FineTuneModule.configure_callbacks` adds Lightning's own EarlyStopping and a second ModelCheckpoint
(monitor, save_top_k=1, weights only) that keeps `checkpoints/best.ckpt`: the module's state_dict, so
adapter tensors only for lora/qlora. When the fit ends, `restore_best` loads that checkpoint back into
the model, so the export (adapter/ or model/, metrics.json) is the best validated state, and returns
where it came from:

    {"monitor": "val/loss", "mode": "min", "patience": 3, "min_delta": 0.0, "stopped_early": true,
     "stop_reason": "patience_exhausted", "best_step": 12, "best_epoch": 5, "best_value": 1.93,
     "best_checkpoint": ".../checkpoints/best.ckpt"}

metrics.json and the adapter's sidecar keep it under `early_stopping` (null when off) and the MLflow run
gets it as `early_stopping.*` tags. Off (the default), nothing here runs and the last state is exported.
Both callbacks' states travel in last.ckpt, so `--ckpt_path last` resumes the patience count and the
best so far (Lightning restores the checkpoint's patience too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.utilities import rank_zero_warn

from lora_module.errors import SettingsError
from lora_module.training.resume import CheckpointMismatchError

BEST_CHECKPOINT = "best"
"""File name (without .ckpt) of the best checkpoint in `<output_dir>/checkpoints/`."""
MONITORS = {"val/loss": "min"}
"""The metrics early stopping can watch, and the direction in which each improves."""
KEY = "model.early_stopping"


@dataclass
class EarlyStoppingConfig:
    """When to stop a fit early; the best checkpoint on `monitor` is the one exported."""

    monitor: str = "val/loss"
    """Logged metric to watch: "val/loss", the validation loss of every validation run."""
    patience: int = 3
    """Validation runs in a row without an improvement of at least min_delta before training stops (>= 1)."""
    min_delta: float = 0.0
    """Smallest change of the monitored value that counts as an improvement (>= 0)."""
    mode: str = "min"
    """"min": lower is better (a loss); "max": higher is better."""


def _check_fields(config: EarlyStoppingConfig) -> None:
    if config.monitor not in MONITORS:
        raise SettingsError(f"{KEY}.monitor must be one of {sorted(MONITORS)}, got {config.monitor!r}")
    patience = config.patience
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise SettingsError(f"{KEY}.patience must be an integer >= 1 (validation runs without improvement"
                            f" before stopping), got {patience!r}")
    delta = config.min_delta
    number = isinstance(delta, int | float) and not isinstance(delta, bool)
    if not (number and math.isfinite(delta) and delta >= 0):
        raise SettingsError(f"{KEY}.min_delta must be a finite number >= 0, got {delta!r}")
    if config.mode not in ("min", "max"):
        raise SettingsError(f"{KEY}.mode must be 'min' or 'max', got {config.mode!r}")
    right = MONITORS[config.monitor]
    if config.mode != right:
        better = "lower" if right == "min" else "higher"
        raise SettingsError(f"{KEY}.mode {config.mode!r} would keep the worst {config.monitor}"
                            f" ({better} is better): use mode {right!r}")


def check_early_stopping(early_stopping: EarlyStoppingConfig | dict | None = None, *,
                         limit_val_batches: int | float | None = None) -> EarlyStoppingConfig | None:
    """The checked settings (None: off). FineTuneModule runs it when built, the training CLI on a parsed
    config (with trainer.limit_val_batches) before it builds anything. Raises SettingsError naming the key."""
    if early_stopping is None:
        return None
    if isinstance(early_stopping, dict):
        names = [f.name for f in fields(EarlyStoppingConfig)]
        unknown = sorted(set(early_stopping) - set(names))
        if unknown:
            raise SettingsError(f"{KEY} has no field {unknown[0]!r}; its fields: {names}")
        early_stopping = EarlyStoppingConfig(**early_stopping)
    _check_fields(early_stopping)
    if limit_val_batches == 0:
        raise SettingsError(f"{KEY} needs validation runs but trainer.limit_val_batches is 0:"
                            f" allow validation batches or set {KEY} to null")
    return early_stopping


class ValidationEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping, checked right after each validation run, refusing a fit with no
    validation data (it would otherwise fail at the first check with Lightning's multi-line error)."""

    def __init__(self, config: EarlyStoppingConfig):
        super().__init__(monitor=config.monitor, patience=config.patience, min_delta=config.min_delta,
                         mode=config.mode, check_on_train_epoch_end=False)
        self.config = config

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # Validation loaders are set up before this hook unless the first validation comes in a later epoch.
        no_batches = trainer.val_dataloaders is not None and sum(trainer.num_val_batches) == 0
        if trainer.limit_val_batches == 0 or no_batches:
            raise SettingsError(f"{KEY} needs validation data but this fit has no validation batches"
                                f" (trainer.limit_val_batches={trainer.limit_val_batches}): give the data a"
                                f" validation split or set {KEY} to null")


class BestCheckpoint(ModelCheckpoint):
    """Keeps the one best checkpoint on the monitored value (weights only), written after validation."""

    def __init__(self, config: EarlyStoppingConfig, dirpath: Path):
        super().__init__(dirpath=dirpath, filename=BEST_CHECKPOINT, monitor=config.monitor, mode=config.mode,
                         save_top_k=1, save_weights_only=True, save_on_train_epoch_end=False,
                         auto_insert_metric_name=False, enable_version_counter=False)


def early_stopping_callbacks(config: EarlyStoppingConfig | None, dirpath: Path,
                             given: list[Callback]) -> list[Callback]:
    """The callbacks for `config` (none when off); `given` are the Trainer's own callbacks. An
    EarlyStopping given to the Trainer is replaced by ours (Lightning replaces subclassed types).

    Put them before the ModelCheckpoint that writes last.ckpt: checkpoint callbacks run in order, and
    last.ckpt must hold the best checkpoint's state after this validation's update, or a resume would
    compare later validations with a stale best.
    """
    if config is None:
        if any(isinstance(cb, EarlyStopping) for cb in given):
            rank_zero_warn(f"an EarlyStopping in trainer.callbacks stops the fit, but the export is then the"
                           f" last state: set {KEY} instead to export the best checkpoint's adapter")
        return []
    return [ValidationEarlyStopping(config), BestCheckpoint(config, dirpath)]


def _restore(module: Any, path: str) -> dict[str, Any]:
    """Load the weights of checkpoint `path` into `module`; returns the checkpoint."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"]
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    if not trainable <= state.keys():
        missing = sorted(trainable - state.keys())
        raise CheckpointMismatchError(f"{path} lacks trained tensors of this model, e.g. {missing[:2]}")
    module.load_state_dict(state, strict=module.strict_loading)
    return checkpoint


def restore_best(module: Any) -> dict[str, Any] | None:
    """Load the best checkpoint into `module` (a FineTuneModule at the end of its fit) and return the
    record of where it came from; None when early stopping is off. Runs on every rank."""
    callbacks = module.trainer.callbacks
    best = next((cb for cb in callbacks if isinstance(cb, BestCheckpoint)), None)
    if best is None:
        return None
    stopper = next(cb for cb in callbacks if isinstance(cb, ValidationEarlyStopping))
    stopped = stopper.stopping_reason != EarlyStoppingReason.NOT_STOPPED
    record: dict[str, Any] = {
        "monitor": stopper.config.monitor, "mode": stopper.config.mode, "patience": stopper.patience,
        "min_delta": stopper.config.min_delta, "stopped_early": stopped,
        "stop_reason": stopper.stopping_reason.name.lower() if stopped else None,
        "best_step": None, "best_epoch": None, "best_value": None, "best_checkpoint": None,
    }
    if not best.best_model_path:
        rank_zero_warn(f"{KEY}: no validation ran during this fit, so there is no best checkpoint;"
                       " the last state is exported")
        return record
    checkpoint = _restore(module, best.best_model_path)
    record.update(best_step=checkpoint["global_step"], best_epoch=checkpoint["epoch"],
                  best_value=float(best.best_model_score), best_checkpoint=best.best_model_path)
    return record
