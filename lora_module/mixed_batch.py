"""Mixed-adapter batches: row i of a batch goes through adapter `adapter_names[i]`, on one base.

    # what LoraModel.generate(input_ids=..., adapter_names=[...]) does:
    with mixed_batch(lora_model, ["summary", "topic", BASE_ROW]):
        out = lora_model.model.generate(input_ids=...)

Many tasks served in one batch on one base, as PEFT's `adapter_names`. The LoRA layers themselves
(`layers.LoraLinear`) know nothing about it: for the duration of the block each layer's `forward`
is replaced by `mixed_forward` bound to that batch's row layout, and restored afterwards.

One adapter plus bare-base rows takes PEFT's grouped arithmetic (`_mixed_batch_forward`: each
adapter's rows in turn), bit for bit. From `STACKED_MIN_ADAPTERS` distinct adapters on, each layer
instead runs two batched matmuls over per-row weights (fewer kernels: 0.84x -> 0.89x of a merged
model's rows/s at 2 tasks, bench_serving); the weights are gathered per row at forward time from
one zero-padded copy per adapter, so a batch holds one extra copy of its adapters, not one per row.
A batch with a DoRA adapter always takes the grouped path (DoRA rescales each row of a layer's output by
its own magnitude / norm, which the stacked matmuls do not hold): PEFT's arithmetic for DoRA too.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lora_module.errors import LoraConfigError
from lora_module.layers import LoraLinear

# The adapter name of a row that runs on the bare base (PEFT's name for it).
BASE_ROW = "__base__"

# From this many distinct adapters in a batch on, the per-row weights path (see the module docstring).
STACKED_MIN_ADAPTERS = 2

RowGroups = list[tuple[str, slice | torch.Tensor]]


@dataclass(frozen=True)
class RowWeights:
    """Every adapter's A and scaled B of a mixed batch, zero-padded to the largest rank, and which of
    them each row uses (the last slot is all zeros: a row without an adapter adds exactly nothing)."""

    a_t: torch.Tensor
    """Per adapter, A transposed: [adapters + 1, in, r_max]."""
    b_t: torch.Tensor
    """Per adapter, B transposed times its scaling: [adapters + 1, r_max, out]."""
    index: torch.Tensor
    """Per row, its adapter's slot: [rows]."""


def row_groups(names: list[str], device: torch.device) -> RowGroups:
    """(adapter, rows) per distinct adapter in `names` (BASE_ROW left out); rows is a slice where they
    are contiguous (a caller that sorts its rows by adapter gets views, no gathers), else an index
    tensor on `device`."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    out: RowGroups = []
    for name, rows in groups.items():
        if name == BASE_ROW:
            continue
        contiguous = rows[-1] - rows[0] == len(rows) - 1
        out.append((name, slice(rows[0], rows[-1] + 1) if contiguous else torch.tensor(rows, device=device)))
    return out


def row_weights(layer: LoraLinear, slots: list[str], device: torch.device) -> RowWeights:
    """RowWeights of `layer` for rows using adapters `slots` (BASE_ROW, or an adapter the layer
    lacks: zeros)."""
    names = [n if n in layer.lora_A else None for n in slots]
    present = sorted({n for n in names if n is not None})
    r_max = max(layer.lora_A[n].weight.shape[0] for n in present)
    dtype = layer.lora_A[present[0]].weight.dtype
    a_t = torch.zeros(len(present) + 1, layer.in_features, r_max, device=device, dtype=dtype)
    b_t = torch.zeros(len(present) + 1, r_max, layer.out_features, device=device, dtype=dtype)
    for i, n in enumerate(present):
        r = layer.lora_A[n].weight.shape[0]
        a_t[i, :, :r] = layer.lora_A[n].weight.t()  # [in, r]
        b_t[i, :r] = layer.lora_B[n].weight.t() * layer.scaling[n]  # [r, out]
    index = torch.tensor([present.index(n) if n is not None else len(present) for n in names], device=device)
    return RowWeights(a_t, b_t, index)


def mixed_forward(layer: LoraLinear, groups: RowGroups, weights: RowWeights | None, x: torch.Tensor,
                  *args: Any, **kwargs: Any) -> torch.Tensor:
    """`layer`'s output with each row through its own adapter: per-row weights when given (for
    [rows, tokens, in] inputs), else each group of rows in turn (PEFT's arithmetic); adapters the
    layer does not hold (BASE_ROW included) add nothing to their rows."""
    result = layer.base_layer(x, *args, **kwargs)
    result_dtype = result.dtype
    if weights is not None and x.dim() == 3 and x.shape[0] == weights.index.shape[0]:
        # Two batched matmuls whatever the number of adapters; the second adds into the base's output
        # (eval only: dropout is the identity).
        hidden = torch.bmm(x.to(weights.a_t.dtype), weights.a_t[weights.index])  # [rows, tokens, r_max]
        if result_dtype == weights.b_t.dtype:
            return torch.baddbmm(result, hidden, weights.b_t[weights.index])
        return result + torch.bmm(hidden, weights.b_t[weights.index]).to(result_dtype)
    for name, rows in groups:
        if name not in layer.lora_A:
            continue
        lora_a = layer.lora_A[name]
        sub = x[rows].to(lora_a.weight.dtype)
        if name in layer.lora_magnitude_vector:
            delta = layer.dora_extra(name, sub, result[rows])
        else:
            delta = layer.lora_B[name](lora_a(layer.lora_dropout[name](sub))) * layer.scaling[name]
        delta = delta.to(result_dtype)
        if isinstance(rows, slice):  # contiguous rows: a view, no gather/scatter
            result[rows] += delta
        else:
            result.index_add_(0, rows, delta)
    return result


def check_mixed_batch(model: Any, names: Sequence[str]) -> None:
    """LoraConfigError unless `model` (a LoraModel) can run a mixed batch over adapters `names`."""
    unknown = sorted(set(names) - set(model.adapters) - {BASE_ROW})
    if unknown:
        raise LoraConfigError(f"unknown adapter(s) {unknown} in adapter_names; adapters on this model: "
                              f"{list(model.adapters)} (or {BASE_ROW!r} for the bare base)")
    if model.model.training:
        raise LoraConfigError("adapter_names (mixed-adapter batches) is for inference: call eval() first")
    if model.merged_adapter is not None:
        raise LoraConfigError(f"adapter {model.merged_adapter!r} is merged into the base weights, so every "
                              "row would carry it: unmerge_adapter() before a mixed-adapter batch")


@contextlib.contextmanager
def mixed_batch(model: Any, adapter_names: Sequence[str], num_beams: int = 1) -> Iterator[Any]:
    """Inside the block row i of every batch of `model` (a LoraModel) goes through adapter
    `adapter_names[i]` (BASE_ROW: the bare base), whatever the active adapter. With beam search
    (`num_beams` > 1) the decoder's rows are repeated per beam while an encoder keeps one row per
    input, as in transformers' generate. Inference only; no adapter may be merged."""
    names = list(adapter_names)
    check_mixed_batch(model, names)
    device = next(model.model.parameters()).device
    per_beam = [n for n in names for _ in range(num_beams)]
    beams = row_groups(per_beam, device)
    once = row_groups(names, device) if num_beams > 1 else beams
    encoder = model.model.get_encoder() if getattr(model.model.config, "is_encoder_decoder", False) else None
    in_encoder = {id(m) for m in encoder.modules()} if encoder is not None else set()
    used = set(names) - {BASE_ROW}
    stacked = len(used) >= STACKED_MIN_ADAPTERS and not any(model.adapters[n].use_dora for n in used)
    layers = [layer for _, layer in model.lora_layers()]
    for layer in layers:
        encoder_side = id(layer) in in_encoder
        rows = names if encoder_side else per_beam
        uses = stacked and any(n in layer.lora_A for n in names)
        weights = row_weights(layer, rows, device) if uses else None
        # An instance attribute shadows the class's forward for this batch only (nn.Module.__call__ reads it).
        layer.forward = functools.partial(mixed_forward, layer, once if encoder_side else beams, weights)
    try:
        yield model
    finally:
        for layer in layers:
            vars(layer).pop("forward", None)
