"""The end of a fit: write the run's outputs (adapter/ or model/, metrics.json, config.yaml) as one
export that appears whole or not at all (`training.outputs.publish`), and log them to MLflow.

The adapter is self-describing: its sidecar records the prompt settings of the prepared data it was
trained on (`adapter_io.write_prompt_settings`, from the data module's manifest), which registration
and serving read instead of looking for the data.

With early stopping the exported weights are the best checkpoint's (training.early_stopping): metrics.json
and the sidecar record where they came from under `early_stopping` (best_step, best_epoch, best_value, ...;
null when off), `val_loss` is that checkpoint's, and the MLflow run gets `early_stopping.*` tags.

Called by `FineTuneModule.on_train_end` on global rank 0 only, inside `training.fsdp.gathered_parameters`
(under FSDP the full adapter tensors are gathered there for the time of the export). The saved keys
are the unwrapped ones: FSDP's wrappers put `_fsdp_wrapped_module` into module paths, which PEFT's
keys must not contain.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import load_file, save_file

from lora_module import contracts as c
from lora_module.adapter_io import write_prompt_settings
from lora_module.files import sha256_file, write_with
from lora_module.prompt import PromptSettings
from lora_module.redact import redact_uri
from lora_module.training.fsdp import unwrapped_name
from lora_module.training.outputs import publish
from lora_module.training.run_lineage import tag_early_stopping


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _local_path_or_name(name_or_path: str) -> str:
    """Absolute path for a local folder (later stages may run elsewhere), else the Hub name unchanged."""
    p = Path(name_or_path)
    return str(p.resolve()) if p.exists() else name_or_path


def _exported_val_loss(module: Any, early_stopping: dict[str, Any] | None) -> float | None:
    """The validation loss of the exported state: the best checkpoint's when it is chosen on val/loss,
    else the last validation run's."""
    best = early_stopping or {}
    if best.get("monitor") == "val/loss" and best.get("best_value") is not None:
        return best["best_value"]
    val = module.trainer.callback_metrics.get("val/loss")
    return float(val) if val is not None else None


def export_outputs(
    module: Any, train_loss: float | None, tokens_per_sec: float | None, seconds: float, tokens: int,
    early_stopping: dict[str, Any] | None = None,
) -> None:
    """Write adapter/ or model/, metrics.json and config.yaml as one export (rank 0); log them to MLflow.

    `early_stopping`: where the exported weights came from (training.early_stopping.restore_best), None: off.
    """
    out = Path(module.hparams.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainable, total = module.parameter_counts()
    datamodule = getattr(module.trainer, "datamodule", None)
    manifest = getattr(datamodule, "manifest", None) or {}
    metrics: dict[str, Any] = {
        "finetune": module.finetune,
        "model_name_or_path": _local_path_or_name(module.hparams.model_name_or_path),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100.0 * trainable / total,
        "train_loss": train_loss,  # mean over the last epoch's batches
        "val_loss": _exported_val_loss(module, early_stopping),
        "steps": module.global_step,
        "epochs": module.current_epoch,
        "tokens": tokens,
        "train_seconds": seconds,
        "tokens_per_sec": tokens_per_sec,
        "world_size": module.trainer.world_size,
        "precision": str(module.trainer.precision),
        "data_fingerprint": manifest.get("fingerprint"),
        "base_fingerprint": module.base_fingerprint(),
        "checkpoint": str(out / "checkpoints" / "last.ckpt"),
        "early_stopping": early_stopping,
    }
    mlflow = next((lg for lg in module.loggers if isinstance(lg, MLFlowLogger)), None)
    if mlflow is not None:
        metrics["mlflow_run_id"] = mlflow.run_id
        metrics["mlflow_tracking_uri"] = redact_uri(getattr(mlflow, "_tracking_uri", None))  # no credentials
    # Without a manifest (a data module of one's own) there is nothing to record: registration then
    # asks for the prepared folder.
    prompt = PromptSettings.from_manifest(manifest) if manifest else None
    # adapter/ or model/, metrics.json and config.yaml appear together (one atomic switch).
    folder = publish(out, _write_outputs(module, out, metrics, prompt))
    if mlflow is not None:
        run = mlflow.experiment
        for name in c.TRAIN_FILES:
            run.log_artifact(mlflow.run_id, str(folder / name))
        if module.finetune != "full":
            run.log_artifacts(mlflow.run_id, str(folder / c.ADAPTER_DIR), artifact_path=c.ADAPTER_DIR)
        if early_stopping is not None:
            tag_early_stopping(mlflow, early_stopping)
    rank_zero_info(f"training outputs written to {out}")

def _write_outputs(module: Any, out: Path, metrics: dict[str, Any],
                   prompt: PromptSettings | None) -> Callable[[Path], None]:
    """The writer of one export folder: adapter/ or model/, then metrics.json and config.yaml."""

    def write(folder: Path) -> None:
        if module.finetune == "full":
            _save_full_model(module, folder / c.MODEL_DIR)
            metrics["model_bytes"] = _folder_bytes(folder / c.MODEL_DIR)
        else:
            adapter = folder / c.ADAPTER_DIR
            _save_adapter(module, metrics, adapter, prompt)
            metrics["adapter_bytes"] = _folder_bytes(adapter)
            # Lets a reader check that metrics.json describes the adapter beside it.
            metrics["adapter_sha256"] = sha256_file(adapter / c.ADAPTER_WEIGHTS_FILE)
            metrics["adapter_dir"] = str(out / c.ADAPTER_DIR)
        (folder / c.METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        # Without the CLI (plain Trainer) the hyperparameters are the resolved config.
        config = module.resolved_config or yaml.safe_dump({"model": dict(module.hparams)}, sort_keys=False)
        (folder / c.CONFIG_FILE).write_text(config)

    return write

def _save_adapter(module: Any, metrics: dict[str, Any], path: Path, prompt: PromptSettings | None) -> None:
    """The adapter in PEFT format, its sidecar with our metadata and the prompt settings it learnt with."""
    keys = ("finetune", "steps", "train_loss", "val_loss", "data_fingerprint", "early_stopping")
    meta = {k: metrics[k] for k in keys}
    module.model.save_pretrained(
        path, base_model_name_or_path=_local_path_or_name(module.hparams.model_name_or_path), metadata=meta,
    )
    _unwrap_saved_keys(path / c.ADAPTER_WEIGHTS_FILE)
    if prompt is not None:
        write_prompt_settings(path, prompt)


def _unwrap_saved_keys(weights: Path) -> None:
    """Rewrite `weights` with unwrapped keys if a wrapper's name part got into them (FSDP auto-wrapping
    puts `_fsdp_wrapped_module` into module paths; PEFT would silently load such keys as nothing)."""
    tensors = load_file(str(weights))
    if all(unwrapped_name(k) == k for k in tensors):
        return
    clean: dict[str, torch.Tensor] = {unwrapped_name(k): v for k, v in tensors.items()}
    write_with(weights, lambda tmp: save_file(clean, str(tmp), metadata={"format": "pt"}))

def _save_full_model(module: Any, path: Path) -> None:
    module.model.save_pretrained(path)
    tokenizer = getattr(getattr(module.trainer, "datamodule", None), "tokenizer", None)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            module.hparams.model_name_or_path, trust_remote_code=module.hparams.trust_remote_code
        )
    tokenizer.save_pretrained(path)
