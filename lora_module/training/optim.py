"""AdamW parameter groups of a fit: plain (decay on matrices only) or LoRA+ (B learns `ratio` times faster).

    groups = param_groups(module, learning_rate=5e-3, weight_decay=0.0, loraplus_lr_ratio=16)
    torch.optim.AdamW(groups, lr=5e-3, eps=1e-8)

LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models") gives the B
matrices the learning rate `lr * ratio` and the A matrices `lr`. The groups are those of PEFT's
`peft.optimizers.create_loraplus_optimizer`, so a run here and one with PEFT's optimizer take the
same steps (tests/test_loraplus.py):
  A        every trainable matrix that is not a `lora_B` (A, modules_to_save copies): lr, weight decay
  B        `lora_B` and every 1-D tensor (DoRA magnitudes, saved norms): lr * ratio, weight decay,
  B, no decay  the same tensors when they are biases or inside an `nn.LayerNorm`: lr * ratio, no decay.
PEFT's fourth group, LoRA on embedding layers at `loraplus_lr_embedding`, is never needed: this core
adapts linear layers only (an embedding in modules_to_save is a plain copy, group A in PEFT as here).
Unlike the plain groups, LoRA+ decays 1-D tensors outside norms, as PEFT does.

`build_optimizer` makes the optimizer over those groups (`model.optimizer`): torch's AdamW, or
bitsandbytes' `PagedAdamW8bit` (8-bit states paged to host memory under GPU memory pressure; CUDA only),
which takes the same groups, LoRA+ learning rates included.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lora_module.errors import SettingsError

OPTIMIZERS = ("adamw", "paged_adamw_8bit")


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameters PEFT (through transformers' `get_parameter_names`) exempts from weight decay: those
    inside an `nn.LayerNorm` and those with "bias" in their name."""
    names = {n for n, _ in model.named_parameters() if "bias" in n}
    for prefix, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            names.update(f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters())
    return names


def loraplus_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float) -> list[dict[str, Any]]:
    """The non-empty LoRA+ groups of `model`'s trainable parameters, in PEFT's order (A, B, B no decay)."""
    no_decay = _no_decay_names(model)
    a, b, b_no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_B" in name or p.ndim == 1:
            (b_no_decay if name in no_decay else b).append(p)
        else:
            a.append(p)
    groups = [{"params": a, "weight_decay": weight_decay, "lr": lr},
              {"params": b, "weight_decay": weight_decay, "lr": lr * ratio},
              {"params": b_no_decay, "weight_decay": 0.0, "lr": lr * ratio}]
    return [g for g in groups if g["params"]]


def param_groups(model: nn.Module, *, learning_rate: float, weight_decay: float,
                 loraplus_lr_ratio: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups of `model`'s trainable parameters: LoRA+ groups when a ratio is given, else weight
    decay on matrices and none on 1-D tensors (biases, norms), all at `learning_rate`."""
    if loraplus_lr_ratio is not None:
        return loraplus_groups(model, learning_rate, loraplus_lr_ratio, weight_decay)
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(name: str, groups: list[dict[str, Any]], *, lr: float, eps: float,
                    device: torch.device) -> torch.optim.Optimizer:
    """The `model.optimizer` called `name` over `groups` (per-group lr and weight_decay win over `lr`)."""
    if name not in OPTIMIZERS:
        raise SettingsError(f"model.optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, eps=eps)
    if device.type != "cuda":
        raise SettingsError(f"model.optimizer {name!r} needs a CUDA GPU (bitsandbytes pages its states to "
                            f"host memory) and this run trains on {device.type}: set model.optimizer to "
                            "'adamw' or train with trainer.accelerator gpu")
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW8bit(groups, lr=lr, eps=eps)
