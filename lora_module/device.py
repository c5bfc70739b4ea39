"""CUDA defaults in one place: the dtype, matmul precision and attention kernel a device gets.

    device = resolve_device("auto")                       # cuda where available, else cpu
    dtype = generation_dtype(device, "auto")              # bf16 on a CUDA GPU with bf16, None on CPU
    enable_cuda_fast_paths(device)                        # TF32 matmuls on CUDA; a no-op on CPU
    model = AutoModel.from_pretrained(path, **attention_kwargs(device, AutoModel, config))

The choices, and why:
- `default_dtype`: bfloat16 on CUDA where `torch.cuda.is_bf16_supported()` (Ampere and later), float16
  on older CUDA GPUs (half the memory of fp32 and their tensor cores' type; T5 keeps its fp16-unsafe
  `wo` layers in fp32 itself), float32 on CPU (CPU bf16 matmuls are slow or emulated on most CPUs).
- `generation_dtype` ("auto" as a dtype setting): the default dtype on CUDA, and on CPU None, "as
  loaded", which is what every CPU path did before these defaults, so CPU outputs stay bit-identical.
- TF32 and SDPA attention are switched on only for CUDA devices, for the same reason.
Every function here reads CUDA state only when handed a CUDA device, so it is safe to call on any machine.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lora_module.config import DTYPE_NAMES
from lora_module.errors import SettingsError

AUTO = "auto"
ATTENTION_IMPLEMENTATION = "sdpa"  # torch's scaled_dot_product_attention: flash/mem-efficient kernels


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> cuda if available, else cpu; anything else as torch.device."""
    if str(device) == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on a CUDA GPU that supports it, float16 on an older CUDA GPU, float32 elsewhere."""
    if resolve_device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def generation_dtype(device: str | torch.device, requested: str | None) -> str | None:
    """The dtype name to load weights in for inference: an explicit name wins; "auto" (or None) is the
    device's default on CUDA and None (the dtype the weights were saved in) on CPU."""
    if requested not in (None, AUTO):
        if requested not in DTYPE_NAMES:
            raise SettingsError(f"dtype must be 'auto' or one of {list(DTYPE_NAMES)}, got {requested!r}")
        return requested
    if resolve_device(device).type != "cuda":
        return None
    return str(default_dtype(device)).removeprefix("torch.")


def enable_cuda_fast_paths(device: str | torch.device) -> bool:
    """Let fp32 matmuls use TF32 tensor cores on CUDA (torch's "high" precision); True if switched on.
    A no-op returning False on any other device, so CPU numerics never change."""
    if resolve_device(device).type != "cuda":
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def attention_kwargs(device: str | torch.device, auto_class: Any, config: Any) -> dict[str, str]:
    """`from_pretrained` kwargs choosing SDPA attention on CUDA when the model class supports it; {} on CPU
    and for models without SDPA (transformers raises if asked for a kernel a model lacks)."""
    if resolve_device(device).type != "cuda":
        return {}
    if not getattr(model_class_of(auto_class, config), "_supports_sdpa", False):
        return {}
    return {"attn_implementation": ATTENTION_IMPLEMENTATION}


def model_class_of(auto_class: Any, config: Any) -> type | None:
    """The class `auto_class.from_pretrained` builds for `config`; None where it maps none (remote code)."""
    mapping = getattr(auto_class, "_model_mapping", None)
    return None if mapping is None or config is None else mapping.get(type(config), None)


def local_cuda_index() -> int:
    """The CUDA device this process trains on: its DDP local rank (0 for a single process)."""
    return int(os.environ.get("LOCAL_RANK", "0"))
