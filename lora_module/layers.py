"""LoraLinear: a frozen nn.Linear (or bitsandbytes Linear4bit) plus named low-rank adapters.

out = base(x) + lora_B(lora_A(dropout(x))) * scaling, computed in the adapter's dtype (fp32 by
default) and cast back, with the same operation order as PEFT's `lora.Linear` so outputs agree
bit-for-bit in fp32. Parameter names contain `lora_A` / `lora_B`, keyed by adapter name:
`<path>.lora_A.<adapter>.weight`, exactly like PEFT. A DoRA adapter (`use_dora`) also has a
magnitude vector, `<path>.lora_magnitude_vector.<adapter>.weight`; its math is in dora.py.
"""

from __future__ import annotations

import copy
import math
import sys
from typing import Any

import torch
from torch import nn

from lora_module import dora
from lora_module.config import LoraConfig


def is_linear4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes Linear4bit. bitsandbytes is only consulted if something imported it:
    without the import no such layer can exist, and importing it costs seconds."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def _is_power_of_two(value: float) -> bool:
    """True for 2**k (k any integer): scaling by it is exact in floating point (barring over/underflow)."""
    return value > 0 and math.frexp(value)[0] == 0.5


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """fp32 copy of a Linear4bit's weight, shape [out, in]; the layer itself is left as it is."""
    import bitsandbytes as bnb

    data, state = module.weight.data, module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bnb repacked this weight for its AVX512-BF16 CPU kernel (a layer not made by quantize_nf4, which
        # turns that off). bnb has no public dequantize for that layout, and its inverse (0.50.2) re-quantizes
        # a double-quant absmax and leaves a plain one in the packed [in/blocksize, out] order: use it for the
        # weight layout only, on a copy of the state whose absmax is already in bnb's flat per-block order.
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        state = copy.deepcopy(state)
        state.absmax = state.absmax.T.reshape(-1).float()  # the bf16 values the packed kernel computes with
        state.original_nested = False
        data, state = _convert_weight_packed_for_cpu_inverse(data, state)
    return bnb.functional.dequantize_4bit(data, state).float()


def dequantized_linear(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain nn.Linear with the dequantized weights of a Linear4bit (dtype: its compute dtype or fp32)."""
    dtype = dtype or getattr(module, "compute_dtype", None) or torch.float32
    weight = dequantize_weight(module)  # [out, in] fp32
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                       device="meta", dtype=dtype)
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
    return linear


class LoraLinear(nn.Module):
    """Wraps a frozen linear layer; holds one (A, B, dropout, scaling) per adapter name."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        # While a 4-bit base is merged, base_layer is a dequantized copy; the original is kept here
        # (outside the module tree, so it is neither saved nor counted) to make unmerge exact.
        self._quantized_base: list[nn.Module] = []
        # Row norms of a merged DoRA adapter: unmerging needs them and cannot recover them from the sum.
        self._merged_norm: torch.Tensor | None = None

    # Model code sometimes reads `layer.weight` (T5 checks wo.weight.dtype): answer with the base's.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def add_adapter(self, name: str, config: LoraConfig, dtype: torch.dtype = torch.float32) -> None:
        """Create A (Kaiming-uniform, as nn.Linear and PEFT) and B (zeros) for `name` on the base's device,
        and for DoRA the magnitude vector (see init_dora_magnitude)."""
        device = self.base_layer.weight.device
        lora_a = nn.Linear(self.in_features, config.r, bias=False, device=device, dtype=dtype)  # [r, in]
        lora_b = nn.Linear(config.r, self.out_features, bias=False, device=device, dtype=dtype)  # [out, r]
        if config.init_lora_weights is True:  # other inits: lora_module.init, on nn.Linear's draws as PEFT
            nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_b.weight)
        self.lora_A[name] = lora_a
        self.lora_B[name] = lora_b
        p = config.lora_dropout
        self.lora_dropout[name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.scaling[name] = config.scaling
        if config.use_dora:
            self.init_dora_magnitude(name, dtype)

    def init_dora_magnitude(self, name: str, dtype: torch.dtype = torch.float32) -> None:
        """(Re)set DoRA's magnitude of `name` to ||W + scaling B A|| per output row, as PEFT does after the
        adapter's A and B are initialised: call it again after anything that changes W, A or B at init."""
        self.lora_magnitude_vector[name] = dora.initial_magnitude(
            self._base_weight(), self.lora_A[name], self.lora_B[name], self.scaling[name], dtype)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of adapter `name`: A, B and, for DoRA, the magnitude vector."""
        modules = [self.lora_A[name], self.lora_B[name]]
        if name in self.lora_magnitude_vector:
            modules.append(self.lora_magnitude_vector[name])
        return [p for module in modules for p in module.parameters()]

    def _base_weight(self) -> torch.Tensor:
        """The base weight W [out, in]: the parameter itself, or an fp32 dequantized copy of a 4-bit one."""
        if is_linear4bit(self.base_layer):
            return dequantize_weight(self.base_layer)
        return self.base_layer.weight

    def delete_adapter(self, name: str) -> None:
        if self.merged_adapter == name:
            self.unmerge()
        for container in (self.lora_A, self.lora_B, self.lora_dropout):
            del container[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        del self.scaling[name]
        if self.active_adapter == name:
            self.active_adapter = None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if name is None or name == self.merged_adapter:
            return result
        # PEFT's lora.Linear.forward computes result + B(A(dropout(x))) * scaling; ours gives the same
        # bits in fp32 (outputs and gradients) with fewer passes over the [tokens, out] activations.
        torch_result_dtype = result.dtype
        lora_a = self.lora_A[name]
        if x.dtype != lora_a.weight.dtype:
            x = x.to(lora_a.weight.dtype)
        if name in self.lora_magnitude_vector:
            return (result + self.dora_extra(name, x, result)).to(torch_result_dtype)
        hidden = lora_a(self.lora_dropout[name](x))  # [..., r]
        scaling = self.scaling[name]
        if _is_power_of_two(scaling):
            # Multiplying by a power of two only moves the exponent, so it commutes exactly with B's
            # matmul: scale the r-wide hidden instead of the out-wide product (out/r times fewer
            # values, forward and backward), or not at all when alpha == r.
            lora_out = self.lora_B[name](hidden if scaling == 1.0 else hidden * scaling)
        else:
            lora_out = self.lora_B[name](hidden) * scaling
        if lora_out.dtype == torch_result_dtype:
            # In place: the base's output is not saved for its backward (a linear layer saves its
            # input), so this skips allocating and writing a second [tokens, out] tensor.
            return result.add_(lora_out)
        return (result + lora_out).to(torch_result_dtype)

    def dora_extra(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What DoRA adapter `name` adds to the base output `result` for `x` (in the adapter's dtype)."""
        return dora.dora_extra(
            x, result, lora_a=self.lora_A[name], lora_b=self.lora_B[name], dropout=self.lora_dropout[name],
            scaling=self.scaling[name], magnitude=self.lora_magnitude_vector[name].weight,
            weight=self._base_weight().to(x.dtype), bias=self.base_layer.bias, training=self.training)

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B @ A in fp32, shape [out, in]; as PEFT, also for DoRA (whose merge rescales rows)."""
        weight_a = self.lora_A[name].weight.float()  # [r, in]
        weight_b = self.lora_B[name].weight.float()  # [out, r]
        return (weight_b @ weight_a) * self.scaling[name]

    def merge(self, name: str) -> None:
        """Add adapter `name` into the base weight (fp32 math, cast back); a DoRA adapter also rescales each
        row by magnitude / norm (PEFT's formula). Merging it again is a no-op."""
        if self.merged_adapter == name:
            return
        if self.merged_adapter is not None:
            self.unmerge()
        with torch.no_grad():
            if is_linear4bit(self.base_layer):
                # A 4-bit weight cannot hold the sum without re-quantizing (which rounds it): keep a
                # dequantized 16/32-bit copy for the merged state and the quantized original for unmerge.
                self._quantized_base = [self.base_layer]
                self.base_layer = dequantized_linear(self.base_layer)
            weight = self.base_layer.weight
            delta = self.get_delta_weight(name).to(weight.device)
            if name in self.lora_magnitude_vector:
                magnitude = self.lora_magnitude_vector[name].weight.to(weight.device)
                merged, self._merged_norm = dora.merged_weight(weight.float(), delta, magnitude)
            else:
                merged = weight.float() + delta
            weight.copy_(merged.to(weight.dtype))
        self.merged_adapter = name

    def unmerge(self) -> None:
        """Take the merged adapter out again (exact restore for 4-bit bases). No-op when nothing is merged."""
        name = self.merged_adapter
        if name is None:
            return
        with torch.no_grad():
            if self._quantized_base:
                self.base_layer = self._quantized_base.pop()
            else:
                weight = self.base_layer.weight
                delta = self.get_delta_weight(name).to(weight.device)
                if name in self.lora_magnitude_vector:
                    magnitude = self.lora_magnitude_vector[name].weight.to(weight.device)
                    restored = dora.unmerged_weight(weight.float(), delta, magnitude, self._merged_norm)
                else:
                    restored = weight.float() - delta
                weight.copy_(restored.to(weight.dtype))
        self._merged_norm = None
        self.merged_adapter = None

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapter}, merged={self.merged_adapter}"
