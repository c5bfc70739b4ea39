"""How a new adapter's A and B start (PEFT's `init_lora_weights`), and the conversion that turns a
base-mutating init (PiSSA, OLoRA) into a plain LoRA adapter for the unmodified base.

    initial = init_adapter(layer, "default", config)  # after layer.add_adapter; (A0, B0) for PiSSA/OLoRA
    tensors, config = convert_to_plain_lora(tensors, {path: initial}, config)   # at save

PiSSA and OLoRA set A0, B0 from W's SVD / QR and subtract scaling * B0 A0 from W, exactly as PEFT
(same operations, so the same bits in fp32; `pissa_niter_K` draws from torch's generator like PEFT).
Trained, the adapter computes W - s B0 A0 + s B A. Written as is, it would need that modified base;
`convert_to_plain_lora` writes instead the rank-2r delta [A; A0], [B, -B0] with lora_alpha doubled
(times sqrt 2 with rsLoRA), so the scaling and s (B A - B0 A0) are unchanged: PEFT's
`save_pretrained(path_initial_model_for_weight_conversion=...)`, file for file.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_module.config import LoraConfig, mutates_base, pissa_niter
from lora_module.errors import LoraConfigError
from lora_module.layers import LoraLinear, is_linear4bit

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_init(config: LoraConfig, layers: list[LoraLinear]) -> None:
    """Refuse, before any layer is touched, an init this core cannot run on these layers."""
    init = config.init_lora_weights
    if init in ("eva", "mica"):
        raise LoraConfigError(
            f"init_lora_weights={init!r} needs PEFT's data-driven initialisation, which this core does not "
            "run (adapters made with it load fine); use True, 'gaussian', 'pissa' or 'olora'"
        )
    if not mutates_base(init):
        return
    for layer in layers:
        base = layer.base_layer
        if is_linear4bit(base) or base.weight.dtype not in _FLOAT_DTYPES:
            raise LoraConfigError(
                f"init_lora_weights={init!r} changes the base weights, which needs a 16/32-bit base: this "
                f"layer's weight is {'4-bit' if is_linear4bit(base) else base.weight.dtype}; initialise on "
                "the unquantized model, or use init_lora_weights=True"
            )


def init_adapter(layer: LoraLinear, name: str, config: LoraConfig
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Set adapter `name`'s A and B as PEFT's init `config.init_lora_weights` does (layer.add_adapter has
    made them: Kaiming A and zero B for True, nn.Linear's random init otherwise); for PiSSA and OLoRA
    also subtract scaling * B A from the base weight and return copies of (A0, B0)."""
    init = config.init_lora_weights
    weight_a, weight_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    initial = None
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(weight_a, std=1 / config.r)
            nn.init.zeros_(weight_b)
        elif init == "orthogonal":
            _orthogonal(weight_a, weight_b, config.r)
        elif mutates_base(init):
            initial = _pissa_or_olora(layer, name, init, config)
    if config.use_dora and init is not True:
        layer.init_dora_magnitude(name)  # PEFT sets DoRA's magnitude after the init of A and B
    return initial


def _orthogonal(weight_a: torch.Tensor, weight_b: torch.Tensor, r: int) -> None:
    """PEFT's orthogonal_init: A and B from one random orthogonal r x r matrix (r even)."""
    if r % 2:
        raise LoraConfigError(f"init_lora_weights='orthogonal' needs an even r, got r={r}")
    q, _ = torch.linalg.qr(torch.randn(r, r))
    in_features, out_features = weight_a.shape[1], weight_b.shape[0]
    a = torch.randn(in_features, r // 2).mm(q[0::2, :]).T / 10.0
    b = torch.randn(r // 2, out_features).T.mm(q[1::2, :]) / 10.0
    weight_a.copy_(a)
    weight_b.copy_(b)


def _pissa_or_olora(layer: LoraLinear, name: str, init: str, config: LoraConfig
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's pissa_init / olora_init: A, B from W; W <- W - scaling * B A. Returns (A0, B0)."""
    r, scaling = config.r, layer.scaling[name]
    base_weight = layer.base_layer.weight
    weight = base_weight.to(torch.float32)
    if init.lower() == "olora":
        q, r_factor = torch.linalg.qr(weight.data)
        lora_a, lora_b = r_factor[:r].contiguous(), q[:, :r].contiguous()
    else:
        niter = pissa_niter(init)
        if niter is None:
            v, s, uh = torch.linalg.svd(weight.data, full_matrices=False)
            vr, sr, uhr = v[:, :r], s[:r], uh[:r]
        else:
            vr, sr, ur = torch.svd_lowrank(weight.data, r, niter=niter)
            uhr = ur.t()
        sr = sr / scaling
        lora_a = torch.diag(torch.sqrt(sr)) @ uhr
        lora_b = vr @ torch.diag(torch.sqrt(sr))
    layer.lora_A[name].weight.data = lora_a.to(layer.lora_A[name].weight.dtype)
    layer.lora_B[name].weight.data = lora_b.to(layer.lora_B[name].weight.dtype)
    residual = weight.data - scaling * layer.lora_B[name].weight @ layer.lora_A[name].weight
    base_weight.data = residual.to(base_weight.dtype)
    return layer.lora_A[name].weight.detach().clone(), layer.lora_B[name].weight.detach().clone()


def restore_base(layer: LoraLinear, name: str, initial: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Add scaling * B0 A0 back into the base weight (undoes the init up to floating-point rounding)."""
    weight_a0, weight_b0 = initial
    weight = layer.base_layer.weight
    with torch.no_grad():
        delta = layer.scaling[name] * weight_b0.float() @ weight_a0.float()
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))


def convert_to_plain_lora(
    tensors: dict[str, torch.Tensor], initial: dict[str, tuple[torch.Tensor, torch.Tensor]],
    config: LoraConfig, key_prefix: str = "base_model.model.",
) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """PEFT's conversion of a PiSSA/OLoRA adapter (`subtract_mutated_init`): per layer at path p,
    lora_A = [A; A0] and lora_B = [B, -B0] (keys `<key_prefix><p>.lora_A.weight`, ...), r, lora_alpha and
    the patterns doubled (alpha times sqrt 2 with rsLoRA), init_lora_weights=True. Other tensors (DoRA
    is refused with these inits; modules_to_save copies) are kept as they are."""
    out = dict(tensors)
    for path, (weight_a0, weight_b0) in initial.items():
        key_a, key_b = f"{key_prefix}{path}.lora_A.weight", f"{key_prefix}{path}.lora_B.weight"
        out[key_a] = torch.cat([tensors[key_a], weight_a0.to(tensors[key_a])], dim=0)
        out[key_b] = torch.cat([tensors[key_b], -weight_b0.to(tensors[key_b])], dim=1)
    alpha = config.lora_alpha * (2**0.5 if config.use_rslora else 2)
    converted = LoraConfig(**{
        **config.to_dict(), "init_lora_weights": True, "r": config.r * 2, "lora_alpha": alpha,
        "rank_pattern": {k: 2 * v for k, v in config.rank_pattern.items()},
        "alpha_pattern": {k: 2 * v for k, v in config.alpha_pattern.items()},
    })
    return out, converted

