"""Base-model loading and QLoRA: NF4 quantization of a model's linear layers with bitsandbytes.

    base = load_base_model("google/flan-t5-base", quantize="nf4")   # 4-bit base, fingerprint recorded
    model = LoraModel(base, LoraConfig(r=32, lora_alpha=32))

bitsandbytes >= 0.50 runs NF4 layers on the CPU as well as on CUDA, so this path is tested in CI.
The fingerprint of the full-precision weights is recorded on the model *before* quantizing, so an
adapter trained on the NF4 base loads onto the fp32 base of the same weights and vice versa.

Two rules keep every 4-bit layer correct on CUDA and on every CPU (bitsandbytes 0.50.2):
- a layer whose in_features is not a multiple of the block size (64) stays in full precision, with a
  warning naming it: there a quantization block spans two rows, which bnb's CPU dequantize kernel gets
  wrong (it reads one block scale per row: 2-4x the NF4 error) and its AVX512-BF16 path rejects;
- bnb's AVX512-BF16 CPU path (eval without grad) is switched off: it computes in bf16 whatever the
  compute dtype and rewrites the stored weight lossily in place on the first forward, which would change
  merges and the base fingerprint (and bnb's undo, run by state_dict(), corrupts it without double
  quantization). Such CPUs then compute as others do, at the price of that path's speed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lora_module.adapter_io import FINGERPRINT_ATTR, QUANTIZATION_ATTR, compute_fingerprint
from lora_module.errors import BaseModelError, LoraConfigError
from lora_module.layers import LoraLinear

logger = logging.getLogger(__name__)


# The kernel bitsandbytes tries to load, on AVX512-BF16 CPUs only, while its CPU backend is imported.
BNB_KERNEL_REPO = "kernels-community/quantization-bitsandbytes"


class MissingKernelsFilter(logging.Filter):
    """Drops the import-time noise of bitsandbytes' optional CPU kernel when bnb simply keeps its own:

    - bnb's "Failed to load CPU gemm_4bit_forward from kernels-community: <cause>" warning when the cause is
      that the `kernels` package is not installed, or that the Hub is offline and the kernel is not in the
      local cache (kernels raises a ValueError or, from huggingface_hub, a LocalEntryNotFoundError);
    - kernels' "Skipping publisher trust check for '<that kernel>' ... offline mode" warning, which it
      prints before even looking in the cache (bnb's own warning then tells whether loading failed).

    quantize_nf4 turns bnb's AVX512-BF16 path off anyway, so none of these changes a result. A real failure
    (a network error while online, `kernels` installed but broken, a cached kernel that does not load) is
    still shown.
    """

    MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
    TRUST_CHECK_SKIPPED = f"Skipping publisher trust check for '{BNB_KERNEL_REPO}'"

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        if text.startswith(self.TRUST_CHECK_SKIPPED):
            return False
        if not text.startswith(self.MESSAGE):
            return True
        cause = record.args[0] if isinstance(record.args, tuple) and record.args else None
        if isinstance(cause, ModuleNotFoundError) and cause.name == "kernels":
            return False
        return not (isinstance(cause, BaseException) and _is_offline_cache_miss(cause))


def _is_offline_cache_miss(error: BaseException) -> bool:
    """True if the Hub is offline and `error`, or an error behind it, says the kernel is not cached."""
    from huggingface_hub import constants  # read at log time, as kernels does: tests and users may switch it
    from huggingface_hub.errors import LocalEntryNotFoundError

    if not constants.HF_HUB_OFFLINE:
        return False
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    # kernels raises plain ValueErrors for a version or ref missing from the cache: only the text tells
    return any(isinstance(e, LocalEntryNotFoundError)
               or (isinstance(e, ValueError | FileNotFoundError) and "local cache" in str(e)) for e in seen)


def _install_kernel_noise_filter() -> None:
    """Put the filter on the two loggers that print the noise, before anything imports bitsandbytes.

    Logger filters see only records logged on that very logger, hence one per module; getLogger hands the
    modules these same loggers when they are imported later.
    """
    noise_filter = MissingKernelsFilter()
    for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
        logging.getLogger(name).addFilter(noise_filter)


_install_kernel_noise_filter()

QUANTIZE_CHOICES = (None, "nf4")
BLOCKSIZE = 64  # NF4 values per block scale (bitsandbytes' default)
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
    `skip_modules`, matched on the last name part) by bitsandbytes NF4 Linear4bit layers, in place.
    Layers whose in_features is not a multiple of BLOCKSIZE stay as they are (see the module docstring)."""
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
    unaligned: list[str] = []  # "name (in_features=N)" of the layers kept in full precision
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.rsplit(".", 1)[-1] in skip:
            continue
        if module.in_features % BLOCKSIZE:
            unaligned.append(f"{name} (in_features={module.in_features})")
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4",
                              device="meta")
        q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, blocksize=BLOCKSIZE,
                                     compress_statistics=double_quant, quant_type="nf4", module=q)
        if module.bias is not None:
            q.bias = module.bias
        q = q.to(module.weight.device)  # Params4bit quantizes when moved to a real device
        q.support_avx512bf16_for_cpu = False  # bnb's AVX512-BF16 CPU path: see the module docstring
        q.train(module.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
        count += 1
    if unaligned:
        logger.warning("quantize_nf4: kept %d linear layers in full precision because their in_features is "
                       "not a multiple of the NF4 block size %d (bitsandbytes' CPU kernels mishandle blocks "
                       "that span rows): %s", len(unaligned), BLOCKSIZE, ", ".join(unaligned))
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


def check_model_source(name_or_path: str | Path, what: str = "base model") -> None:
    """Fail at once, naming the file, if a local model folder is missing, incomplete or corrupt.

    Without this, a missing folder reaches the Hub client ("Repo id must be in the form ...") and a
    truncated weights file fails deep inside loading without its name. Hub ids pass unchecked.
    """
    text = str(name_or_path)
    p = Path(text).expanduser()
    if not p.exists():
        if text.startswith((".", "/", "~")) or text.count("/") > 1:
            raise BaseModelError(f"{what} {text!r}: folder does not exist; give a folder written by "
                                 "save_pretrained or a Hub id such as 'google/flan-t5-base'")
        return
    if not p.is_dir() or not (p / "config.json").is_file():
        raise BaseModelError(f"{what} {text!r}: not a model folder (no config.json); give a folder written "
                             "by save_pretrained or a Hub id such as 'google/flan-t5-base'")
    weights = sorted(p.glob("*.safetensors"))
    if not weights and not any(p.glob("*.bin")):
        raise BaseModelError(f"{what} {text!r}: the folder has config.json but no weights "
                             "(model.safetensors or pytorch_model.bin); save the model again")
    for file in weights:
        try:
            with safe_open(str(file), framework="pt"):
                pass  # opening checks the header and that the file holds every tensor it declares
        except (SafetensorError, OSError) as e:
            raise BaseModelError(f"{what}: weights file {file} is truncated or corrupt ({e}); "
                                 "copy or save the model again") from e


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
    check_model_source(name_or_path)
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
