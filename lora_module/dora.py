"""DoRA (weight-decomposed low-rank adaptation, Liu et al. 2024): the math behind `use_dora`, as PEFT 0.21.

DoRA splits the adapted weight into a direction and a trained per-output-row magnitude m [out]:

    W' = m / ||W + s B A||_row * (W + s B A)          (s: the adapter's scaling; row norms, shape [out])

`LoraLinear` (layers.py) holds m per adapter in `lora_magnitude_vector[<adapter>].weight`, the in-memory
name PEFT uses; on disk the key is `base_model.model.<module path>.lora_magnitude_vector` (no `.weight`),
also as PEFT writes it. m starts as ||W + s B A||_row, so a fresh adapter changes nothing. The row norm is
treated as a constant (detached: section 4.3 of the paper), so gradients reach A, B and m only through
the numerator. This module is pure tensor math; layers.py supplies the (dequantized) base weight.

    extra = dora_extra(x, result, lora_a=..., lora_b=..., dropout=..., scaling=..., magnitude=...,
                       weight=..., bias=..., training=...)
    out = result + extra                                # what LoraLinear.forward returns for DoRA
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DoraMagnitude(nn.Module):
    """Holds one adapter's magnitude vector as `.weight` [out], so its parameter is named
    `lora_magnitude_vector.<adapter>.weight` exactly as in PEFT."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"


def weight_norm(weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """||weight + scaling * lora_weight|| per output row, shape [out] (PEFT's `get_weight_norm`)."""
    return torch.linalg.norm(weight + scaling * lora_weight, dim=1)


def initial_magnitude(weight: torch.Tensor, lora_a: nn.Linear, lora_b: nn.Linear, scaling: float,
                      dtype: torch.dtype) -> DoraMagnitude:
    """m = ||W + s B A||_row, computed in fp32 (PEFT's init for an fp32 adapter) and stored in `dtype`."""
    with torch.no_grad():
        lora_weight = lora_b.weight.float() @ lora_a.weight.float()  # [out, in]
        norm = weight_norm(weight.to(lora_weight.device, torch.float32), lora_weight, scaling)
    return DoraMagnitude(norm.to(dtype))


def dora_extra(x: torch.Tensor, result: torch.Tensor, *, lora_a: nn.Module, lora_b: nn.Module,
               dropout: nn.Module, scaling: float, magnitude: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None, training: bool) -> torch.Tensor:
    """What DoRA adds to the base output `result` (= W x + bias) for input `x` (in the adapter's dtype):
    (m/n - 1) * W x + (m/n) * s * B A x, with n the detached row norm; `weight` is W in x's dtype.

    As PEFT: without active dropout W x is `result` minus the bias; with dropout, A and W both see the
    dropped-out input, so W x is recomputed from it (the base output itself keeps the full input).
    """
    if isinstance(dropout, nn.Identity) or not training:
        base_result = result - bias if bias is not None else result
    else:
        x = dropout(x)
        base_result = F.linear(x, weight)
    with torch.no_grad():  # the norm is a constant to autograd, so B A needs no graph either
        lora_weight = (lora_b.weight @ lora_a.weight).to(x.dtype)
        norm = weight_norm(weight, lora_weight, scaling)
    mag_norm_scale = (magnitude / norm).view(1, -1)
    lora_result = lora_b(lora_a(x))
    return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling


def merged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', n): the merged weight m / n * (W + delta) and the row norm n = ||W + delta||, all fp32 [out, in];
    keep n to unmerge (it cannot be recovered from W')."""
    norm = weight_norm(weight, delta, 1.0)
    return (magnitude.float() / norm).view(-1, 1) * (weight + delta), norm


def unmerged_weight(merged: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
                    norm: torch.Tensor) -> torch.Tensor:
    """W back from a merged weight, the same delta and the norm `merged_weight` returned (PEFT's formula)."""
    return merged / (magnitude.float() / norm).view(-1, 1) - delta
