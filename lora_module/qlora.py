"""Base-model loading and QLoRA: NF4 quantization of a model's linear layers with bitsandbytes.

    base = load_base_model("google/flan-t5-base", quantize="nf4")   # 4-bit base, fingerprint recorded
    model = LoraModel(base, LoraConfig(r=32, lora_alpha=32))

bitsandbytes >= 0.50 runs NF4 layers on the CPU as well as on CUDA, so this path is tested in CI.
The fingerprint of the full-precision weights is recorded on the model *before* quantizing, so an
adapter trained on the NF4 base loads onto the fp32 base of the same weights and vice versa.

Where CUDA is available and the base is a local folder of safetensors, the 4-bit base is loaded
straight onto the GPU by transformers (`BitsAndBytesConfig`: NF4, double quantization, bf16 compute
where the GPU has it, SDPA attention) and never exists in full precision; its fingerprint is then
streamed from the checkpoint files (`checkpoint_fingerprint`, equal to `compute_fingerprint` of the
loaded full-precision model). Without CUDA, or where the checkpoint cannot be read that way (a Hub id,
.bin weights, renamed keys), the base is loaded in full precision and quantized as below.

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

from lora_module.adapter_io import FINGERPRINT_ATTR, QUANTIZATION_ATTR, compute_fingerprint, hash_weights
from lora_module.device import attention_kwargs, default_dtype, local_cuda_index, model_class_of
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
    device: str | torch.device | None = None,
) -> nn.Module:
    """Load a seq2seq (config.is_encoder_decoder) or causal LM; optionally quantize it to NF4.

    Remote code runs only with trust_remote_code=True. With quantize="nf4" the fingerprint is taken
    from the full-precision weights first; `torch_dtype` is then also the 4-bit layers' compute dtype
    (None: bf16 where the GPU supports it on the CUDA path, fp32 on the CPU path). `device`, the device
    the model will run on, picks SDPA attention on CUDA (lora_module.device); it does not move the model.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise LoraConfigError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    check_model_source(name_or_path)
    dtype = _resolve_dtype(torch_dtype)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    if quantize == "nf4" and torch.cuda.is_available():
        fingerprint = checkpoint_fingerprint(name_or_path, auto, config, dtype, trust_remote_code)
        if fingerprint is not None:
            return _load_nf4_on_cuda(name_or_path, auto, config, dtype=dtype, double_quant=double_quant,
                                     fingerprint=fingerprint, trust_remote_code=trust_remote_code)
        logger.info("load_base_model: %s is not a local safetensors checkpoint whose fingerprint can be "
                    "streamed; loading it in full precision and quantizing it to NF4 on the CPU",
                    name_or_path)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if device is not None:
        kwargs.update(attention_kwargs(device, auto, config))
    model = auto.from_pretrained(
        str(name_or_path), config=config, trust_remote_code=trust_remote_code, **kwargs
    )
    model.eval()
    if quantize is None and dtype == torch.float16:
        # fp16 rounds some weights away from their bf16 rounding, so hashing the loaded values would call
        # this base "another base" for every adapter trained on it: hash the checkpoint's own values.
        fingerprint = checkpoint_fingerprint(name_or_path, auto, config, None, trust_remote_code)
        if fingerprint is not None:
            setattr(model, FINGERPRINT_ATTR, fingerprint)
    if quantize == "nf4":
        quantize_nf4(model, double_quant=double_quant, compute_dtype=dtype or torch.float32)
    return model


def _keep_in_fp32(model_or_class: object) -> set[str]:
    """Module names (last name part) the model keeps in fp32 whatever the load dtype (T5: `wo`)."""
    return {*(getattr(model_or_class, "_keep_in_fp32_modules", None) or ()),
            *(getattr(model_or_class, "_keep_in_fp32_modules_strict", None) or ())}


def checkpoint_fingerprint(name_or_path: str | Path, auto_class: type, config: object,
                           dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> str | None:
    """`compute_fingerprint` of `auto_class.from_pretrained(name_or_path, dtype=dtype)`, read from the
    folder's safetensors one tensor at a time, without materialising the model; None where that cannot be
    exact: not a local folder of safetensors, or a parameter whose checkpoint key (or a tied alias's) is
    missing or has another shape (transformers would initialise or convert it)."""
    folder = Path(name_or_path).expanduser()
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    with torch.device("meta"):  # names, shapes and tied weights only: no memory
        skeleton = auto_class.from_config(config, trust_remote_code=trust_remote_code)
    where: dict[str, tuple[Path, tuple[int, ...]]] = {}  # checkpoint key -> (file, shape), from the headers
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            where.update((key, (file, tuple(f.get_slice(key).get_shape()))) for key in f.keys())
    aliases: dict[int, list[str]] = {}
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    keep = _keep_in_fp32(skeleton)
    entries = {}
    for name, p in skeleton.named_parameters():
        key = next((n for n in [name, *aliases[id(p)]] if n in where), None)
        if key is None or where[key][1] != tuple(p.shape):
            return None
        cast = dtype if dtype is not None and not keep.intersection(name.split(".")) else None
        entries[name] = lambda file=where[key][0], key=key, cast=cast: _read_tensor(file, key, cast)
    return hash_weights(entries)


def _read_tensor(file: Path, key: str, dtype: torch.dtype | None) -> torch.Tensor:
    """One checkpoint tensor, in `dtype` when given (as from_pretrained(dtype=...) would hold it)."""
    with safe_open(str(file), framework="pt") as f:
        tensor = f.get_tensor(key)
    return tensor if dtype is None else tensor.to(dtype)


def _load_nf4_on_cuda(name_or_path: str | Path, auto_class: type, config: object, *,
                      dtype: torch.dtype | None, double_quant: bool, fingerprint: str,
                      trust_remote_code: bool) -> nn.Module:
    """The NF4 base quantized by transformers while loading onto this process's GPU (never in full
    precision on the host); carries the full-precision `fingerprint` and quantize_nf4's record."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    compute_dtype = dtype or default_dtype("cuda")
    model_class = model_class_of(auto_class, config)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=sorted({*ALWAYS_SKIP, *_keep_in_fp32(model_class)}),
    )
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = auto_class.from_pretrained(
        str(name_or_path), config=config, trust_remote_code=trust_remote_code,
        quantization_config=quantization, device_map={"": local_cuda_index()},
        **attention_kwargs("cuda", auto_class, config), **kwargs,
    )
    model.eval()
    count = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    setattr(model, FINGERPRINT_ATTR, fingerprint)
    setattr(model, QUANTIZATION_ATTR, {
        "quant_type": "nf4", "double_quant": double_quant,
        "compute_dtype": str(compute_dtype).removeprefix("torch."), "layers": count,
    })
    logger.info("load_base_model: %d linear layers loaded as NF4 on cuda:%d (double_quant=%s, "
                "compute_dtype=%s)", count, local_cuda_index(), double_quant, compute_dtype)
    return model
