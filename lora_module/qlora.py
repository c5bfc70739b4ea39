"""Base-model loading and QLoRA: NF4 quantization of a model's linear layers with bitsandbytes.

    base = load_base_model("google/flan-t5-base", quantize="nf4")   # 4-bit base, fingerprint recorded
    model = LoraModel(base, LoraConfig(r=32, lora_alpha=32))

bitsandbytes >= 0.50 runs NF4 layers on the CPU as well as on CUDA, so this path is tested in CI.
The fingerprint of the full-precision weights is recorded on the model *before* quantizing, so an
adapter trained on the NF4 base loads onto the fp32 base of the same weights and vice versa.

bitsandbytes' AVX512-BF16 CPU path (taken in eval without grad) is switched off for every 4-bit layer
made here: it fails when in_features is not a multiple of the 64 block size, computes in bf16 whatever
the compute dtype, and rewrites the stored weight lossily in place (merges and the base fingerprint
would change after one forward). These layers therefore dequantize and compute in their compute dtype
on every CPU, as on CPUs without that path, at the price of its speed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from lora_module.adapter_io import FINGERPRINT_ATTR, QUANTIZATION_ATTR, compute_fingerprint
from lora_module.errors import LoraConfigError
from lora_module.layers import LoraLinear

logger = logging.getLogger(__name__)

QUANTIZE_CHOICES = (None, "nf4")
# Never quantized: the output head (its precision matters most and it is often tied to embeddings).
ALWAYS_SKIP = ("lm_head",)


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    valid = ("float32", "float16", "bfloat16")
    if dtype not in valid:
        raise LoraConfigError(f"torch_dtype must be a torch.dtype or one of {valid}, got {dtype!r}")
    return getattr(torch, dtype)


def quantize_nf4(model: nn.Module, *, double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                 skip_modules: tuple[str, ...] = ()) -> nn.Module:
    """Replace the model's nn.Linear layers (except lm_head, the model's keep-in-fp32 modules and
    `skip_modules`, matched on the last name part) by bitsandbytes NF4 Linear4bit layers, in place."""
    import bitsandbytes as bnb

    if getattr(model, QUANTIZATION_ATTR, None) is not None:
        raise LoraConfigError("model is already quantized")
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise LoraConfigError("quantize the base model before adding LoRA adapters, not after")
    if getattr(model, FINGERPRINT_ATTR, None) is None:
        setattr(model, FINGERPRINT_ATTR, compute_fingerprint(model))
    # T5 keeps `wo` in fp32 and casts activations to wo.weight.dtype, which would be uint8 for a
    # 4-bit weight: transformers' own bitsandbytes path skips these modules too.
    keep = {*(getattr(model, "_keep_in_fp32_modules", None) or ()),
            *(getattr(model, "_keep_in_fp32_modules_strict", None) or ())}
    skip = {*ALWAYS_SKIP, *keep, *skip_modules}
    count = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.rsplit(".", 1)[-1] in skip:
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4",
                              device="meta")
        q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False,
                                     compress_statistics=double_quant, quant_type="nf4", module=q)
        if module.bias is not None:
            q.bias = module.bias
        q = q.to(module.weight.device)  # Params4bit quantizes when moved to a real device
        q.train(module.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
        count += 1
    if count == 0:
        logger.warning("quantize_nf4: no nn.Linear layer to quantize in %s", type(model).__name__)
    setattr(model, QUANTIZATION_ATTR, {
        "quant_type": "nf4", "double_quant": double_quant,
        "compute_dtype": str(compute_dtype).removeprefix("torch."), "layers": count,
    })
    logger.info("quantize_nf4: %d linear layers -> NF4 (double_quant=%s, compute_dtype=%s)",
                count, double_quant, compute_dtype)
    return model


def is_quantized(model: nn.Module) -> bool:
    """True if quantize_nf4 (or load_base_model(quantize="nf4")) quantized this model."""
    return getattr(model, QUANTIZATION_ATTR, None) is not None


def load_base_model(
    name_or_path: str | Path, *, quantize: str | None = None, double_quant: bool = True,
    torch_dtype: torch.dtype | str | None = None, trust_remote_code: bool = False,
) -> nn.Module:
    """Load a seq2seq (config.is_encoder_decoder) or causal LM; optionally quantize it to NF4.

    Remote code runs only with trust_remote_code=True. With quantize="nf4" the fingerprint is taken
    from the full-precision weights first; `torch_dtype` is then also the 4-bit layers' compute dtype.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise LoraConfigError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    dtype = _resolve_dtype(torch_dtype)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = auto.from_pretrained(
        str(name_or_path), config=config, trust_remote_code=trust_remote_code, **kwargs
    )
    model.eval()
    if quantize == "nf4":
        quantize_nf4(model, double_quant=double_quant, compute_dtype=dtype or torch.float32)
    return model
