"""What lets a fit killed mid-epoch resume to the adapter of the uninterrupted run (FineTuneModule uses it).

    lora-pipeline fit --config deploy/configs/demo_summary_lora.yaml ... --ckpt_path last

Three things would otherwise differ after a resume:
- the batches: the train loader's position is saved in checkpoints and restored, but only if
  the trainer has not built its loader before the restore, which `estimated_stepping_batches`
  does when max_epochs is set; `total_optimizer_steps` computes the LR schedule's length without it;
- the dropout masks: Lightning does not checkpoint RNG states, and the global stream also feeds
  DataLoader iterators and validation, which a resume replays differently; `step_seed` derives
  each micro-batch's seed from (run seed, step, epoch, batch, rank) alone;
- the model: `check_lora_layout` refuses a checkpoint of another LoRA r or layout in one line.

`check_local_checkpoint` refuses a checkpoint that is not a local file (a URL, any remote fsspec path,
Lightning's `registry:` model registry): Lightning unpickles those with `weights_only=False`, so a
checkpoint URL would run whatever code its server sends.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from fsspec.core import split_protocol

from lora_module.errors import PipelineError


class CheckpointMismatchError(PipelineError, ValueError):
    """The checkpoint to resume from was written for another model (finetune mode, LoRA r or layout, base)."""


class RemoteCheckpointError(PipelineError, ValueError):
    """A checkpoint to load that is not a local file (a URL, a remote fsspec path, a model registry)."""


_LOCAL_PROTOCOLS = (None, "file", "local")


def check_local_checkpoint(ckpt_path: str | None, field: str = "--ckpt_path") -> None:
    """Refuse a checkpoint path that Lightning would fetch from elsewhere (and unpickle, running its code)."""
    if ckpt_path is None:
        return
    text = str(ckpt_path)
    remote = "::" in text or text.startswith("registry") or split_protocol(text)[0] not in _LOCAL_PROTOCOLS
    if remote:
        raise RemoteCheckpointError(
            f"{field} {text.split('?')[0][:200]}: only local checkpoint files are loaded (a checkpoint is a"
            " pickle and may run code); download it yourself and pass its path, or 'last'"
        )


def check_ckpt_overrides(args: list[str], field: str = "--ckpt_path") -> None:
    """`check_local_checkpoint` on every `--ckpt_path X` / `--ckpt_path=X` in CLI arguments (e.g. a
    deployment's train_overrides), before a training process is started with them."""
    for i, arg in enumerate(args):
        if arg == "--ckpt_path" and i + 1 < len(args):
            check_local_checkpoint(args[i + 1], field)
        elif arg.startswith("--ckpt_path="):
            check_local_checkpoint(arg.split("=", 1)[1], field)


def total_optimizer_steps(trainer: Any) -> float:
    """Optimizer steps of the whole fit, as `trainer.estimated_stepping_batches` counts them, but from
    a throwaway loader of the datamodule: the trainer's own loader must be built after the restore."""
    datamodule = getattr(trainer, "datamodule", None)
    if trainer.max_epochs == -1 or datamodule is None:
        return trainer.estimated_stepping_batches  # reads max_steps only, or plain loaders (not resumable)
    batches = len(datamodule.train_dataloader())
    limit = trainer.limit_train_batches
    batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    total = math.ceil(batches / trainer.accumulate_grad_batches) * max(trainer.max_epochs, 1)
    return min(total, trainer.max_steps) if trainer.max_steps != -1 else total


def step_seed(base_seed: int, step: int, epoch: int, batch_idx: int, rank: int) -> int:
    """A 63-bit seed for one micro-batch that depends on these numbers and nothing else."""
    key = f"{base_seed}:{step}:{epoch}:{batch_idx}:{rank}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def check_lora_layout(
    own: dict[str, torch.Size], state: dict[str, torch.Tensor], saved_r: int | None, r: int
) -> None:
    """The checkpoint's adapter tensors have this model's names and shapes, else one clear error."""
    shapes_differ = [n for n in own.keys() & state.keys() if tuple(state[n].shape) != tuple(own[n])]
    if saved_r is not None and saved_r != r or shapes_differ:
        got = saved_r if saved_r is not None else f"? (tensor shape {tuple(state[shapes_differ[0]].shape)})"
        raise CheckpointMismatchError(
            f"checkpoint has LoRA r={got} but the config has model.lora.r={r}:"
            " resume with the r it was trained with, or start a new run (another model.output_dir)"
        )
    if own.keys() != state.keys():
        raise CheckpointMismatchError(
            "checkpoint does not match this model's LoRA layout (another target_modules?):"
            f" missing {sorted(own.keys() - state.keys())[:3]},"
            f" unexpected {sorted(state.keys() - own.keys())[:3]}"
        )


def check_saved_settings(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint written under other settings that its state depends on (the
    fine-tuning method; LoRA+'s ratio, which decides the optimizer's parameter groups; the optimizer)."""
    for key, value in current.items():
        if key in saved and saved[key] != value:
            raise CheckpointMismatchError(
                f"checkpoint was written with {key}={saved[key]!r}, this run has {value!r}: resume with"
                f" the same {key}, or start a new run without --ckpt_path"
            )
