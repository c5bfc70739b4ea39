"""Batched, deterministic generation for the three kinds of model the evaluation compares.

A `ModelSpec` names a model to evaluate: the untouched base (`kind="base"`, a Hub name or a
folder), a LoRA adapter over a base (`kind="lora"`, an adapter folder; the base comes from its
`adapter_config.json` unless given) or a fully fine-tuned model folder (`kind="full"`).
`load_model_for_spec` turns it into `(model, tokenizer)`; adapters are merged into the base
before generating, so LoRA costs nothing at inference. `generate` then decodes prompts in
length-sorted batches under `torch.inference_mode` and returns texts in the original order.

    from lora_module.generation import GenerationConfig, ModelSpec, generate, load_model_for_spec
    model, tok = load_model_for_spec(ModelSpec("lora", "lora", "runs/x/adapter"))
    texts = generate(model, tok, prompts, GenerationConfig(batch_size=16, num_beams=1))
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

MODEL_KINDS = ("base", "lora", "full")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# "org/name" or "name": what a Hugging Face Hub id looks like (anything else must exist on disk).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


class ModelLoadError(RuntimeError):
    """A model spec that cannot be loaded (missing folder, not an adapter, wrong base)."""


@dataclass
class GenerationConfig:
    """How to decode: batching, length limits and search. Defaults are greedy decoding."""

    batch_size: int = 16
    """Prompts per `generate` call."""
    max_new_tokens: int = 128
    """Upper bound on generated tokens per example."""
    num_beams: int = 1
    """Beam width; 1 means greedy decoding."""
    max_source_length: int | None = 512
    """Prompts are truncated to this many tokens; None keeps the tokenizer's own limit."""
    sort_by_length: bool = True
    """Batch prompts of similar length together (less padding); outputs keep the input order."""
    merge_adapter: bool = True
    """Merge LoRA weights into the base before generating (faster; no effect on other kinds)."""
    device: str = "auto"
    """'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    dtype: str | None = None
    """Weights dtype for generation: None (as loaded), 'float32', 'bfloat16' or 'float16'."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens", "num_beams"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GenerationConfig.{name} must be an integer >= 1, got {value!r}")
        if self.max_source_length is not None and (
            not isinstance(self.max_source_length, int) or self.max_source_length < 1
        ):
            raise ValueError(
                "GenerationConfig.max_source_length must be an integer >= 1 or None, "
                f"got {self.max_source_length!r}"
            )
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise ValueError(
                f"GenerationConfig.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
            )
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(
                f"GenerationConfig.dtype must be None or one of {list(_DTYPES)}, got {self.dtype!r}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationConfig:
        """Build from a mapping; unknown keys are an error that lists the valid ones."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown GenerationConfig keys {unknown}; valid keys: {valid}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class ModelSpec:
    """One model to evaluate: a display name, its kind and where it lives."""

    name: str
    """Short name used in file names and report rows (letters, digits, '_', '-', '.')."""
    kind: str
    """'base' (untouched model), 'lora' (adapter folder) or 'full' (fine-tuned model folder)."""
    path: str
    """base: Hub name or folder; lora: adapter folder (or a training output with adapter/); full: folder."""
    base: str | None = None
    """lora only: base model to load instead of adapter_config.json's base_model_name_or_path."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _SAFE_NAME.fullmatch(self.name):
            raise ValueError(
                f"ModelSpec.name {self.name!r} is not valid: use letters, digits, '_', '-', '.' "
                "(it becomes a file name), starting with a letter or digit"
            )
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"ModelSpec.kind {self.kind!r} is not valid; valid kinds: {list(MODEL_KINDS)}")
        self.path = str(self.path)
        if not self.path:
            raise ValueError(f"ModelSpec.path is empty for model {self.name!r}")
        if self.base is not None and self.kind != "lora":
            raise ValueError(f"ModelSpec.base is only used with kind='lora', got kind={self.kind!r}")

    def resolved_path(self) -> Path | str:
        """The folder to load, accepting a training output dir (with adapter/ or model/) too."""
        p = Path(self.path)
        if self.kind == "lora":
            if not p.exists():
                raise ModelLoadError(f"model {self.name!r}: adapter folder {p} does not exist")
            if not (p / "adapter_config.json").exists() and (p / "adapter" / "adapter_config.json").exists():
                p = p / "adapter"
            if not (p / "adapter_config.json").exists():
                raise ModelLoadError(
                    f"model {self.name!r}: {p} is not an adapter folder (no adapter_config.json); "
                    "kind='lora' needs a PEFT-format adapter directory"
                )
            return p
        if self.kind == "full":
            if not p.exists():
                raise ModelLoadError(f"model {self.name!r}: model folder {p} does not exist")
            if not (p / "config.json").exists() and (p / "model" / "config.json").exists():
                p = p / "model"
            if not (p / "config.json").exists():
                raise ModelLoadError(
                    f"model {self.name!r}: {p} has no config.json; kind='full' needs a folder written "
                    "by save_pretrained (or a training output dir with model/)"
                )
            return p
        return _local_or_hub(self.path, self.name)


def _local_or_hub(path: str, name: str) -> Path | str:
    p = Path(path)
    if p.exists():
        return p
    if path.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(path):
        raise ModelLoadError(f"model {name!r}: folder {path} does not exist (and it is not a Hub model id)")
    return path


@dataclass
class LoadedModel:
    """A model ready to generate, its tokenizer, and what the report should know about it."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    info: dict[str, Any] = field(default_factory=dict)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_tokenizer(candidates: Sequence[Path | str | None], name: str) -> PreTrainedTokenizerBase:
    errors = []
    for c in candidates:
        if c is None:
            continue
        try:
            return AutoTokenizer.from_pretrained(str(c))
        except (OSError, ValueError, TypeError) as e:
            errors.append(f"{c}: {type(e).__name__}: {str(e)[:200]}")
    raise ModelLoadError(f"model {name!r}: no tokenizer could be loaded; tried {errors}")


# Loading is serialised within a process: transformers builds models under a process-wide
# meta-device patch, so modules another thread creates meanwhile (a LoRA layer, a second model)
# come out empty ("Cannot copy out of meta tensor"). Generation itself runs concurrently.
_LOAD_LOCK = threading.Lock()


def load_model_with_info(
    spec: ModelSpec, gen: GenerationConfig | None = None, tokenizer_path: Path | str | None = None
) -> LoadedModel:
    """Load `spec` for generation; `info` holds fingerprints, parameter counts and sources.

    The tokenizer comes from `tokenizer_path` if given (the prepared data's tokenizer), else
    from the model (for lora: the adapter folder, then the base). Safe to call from several threads.
    """
    with _LOAD_LOCK:
        return _load_model_with_info(spec, gen, tokenizer_path)


def _load_model_with_info(
    spec: ModelSpec, gen: GenerationConfig | None, tokenizer_path: Path | str | None
) -> LoadedModel:
    from lora_module import (
        AdapterLoadError,
        FingerprintMismatchError,
        LoraModel,
        base_fingerprint,
        load_base_model,
    )

    gen = gen or GenerationConfig()
    path = spec.resolved_path()
    info: dict[str, Any] = {"name": spec.name, "kind": spec.kind, "path": str(path)}
    dtype = _DTYPES[gen.dtype] if gen.dtype else None

    if spec.kind == "lora":
        from lora_module import read_adapter_config

        adapter_dir = Path(path)
        adapter_cfg = read_adapter_config(adapter_dir)
        base_name = spec.base or adapter_cfg.get("base_model_name_or_path")
        if not base_name:
            raise ModelLoadError(
                f"model {spec.name!r}: {adapter_dir / 'adapter_config.json'} names no "
                "base_model_name_or_path; pass the base explicitly (ModelSpec.base / --lora-base)"
            )
        try:
            base_path = _local_or_hub(str(base_name), spec.name)
            base = load_base_model(str(base_path), torch_dtype=dtype)
        except (ModelLoadError, OSError) as e:
            raise ModelLoadError(
                f"model {spec.name!r}: cannot load the base {base_name} of adapter {adapter_dir} ({e}); "
                "pass the right base with ModelSpec.base / --lora-base"
            ) from e
        try:
            lora = LoraModel.from_pretrained(base, str(adapter_dir))
        except FingerprintMismatchError as e:
            raise FingerprintMismatchError(
                f"model {spec.name!r}: adapter {adapter_dir} was trained on a different base than "
                f"{base_path} (set ModelSpec.base / --lora-base to the right base model): {e}"
            ) from e
        except AdapterLoadError as e:
            raise AdapterLoadError(
                f"model {spec.name!r}: adapter {adapter_dir} does not fit base {base_path}: {e}"
            ) from e
        info["base"] = str(base_path)
        info["base_fingerprint"] = lora.base_fingerprint()
        weights = adapter_dir / "adapter_model.safetensors"
        if weights.exists():
            info["adapter_sha256"] = file_sha256(weights)
            info["adapter_bytes"] = weights.stat().st_size
            info["trainable_params"] = _safetensors_numel(weights)
        info["total_params"] = sum(p.numel() for p in lora.model.parameters())
        info["adapter_config"] = {
            k: adapter_cfg.get(k) for k in ("r", "lora_alpha", "target_modules", "use_rslora", "task_type")
        }
        model: torch.nn.Module = lora.merge_and_unload() if gen.merge_adapter else lora
        info["merged"] = gen.merge_adapter
        tokenizer = _load_tokenizer([tokenizer_path, adapter_dir, base_path], spec.name)
    else:
        try:
            model = load_base_model(str(path), torch_dtype=dtype)
        except OSError as e:
            raise ModelLoadError(f"model {spec.name!r}: cannot load {path}: {e}") from e
        fp = base_fingerprint(model)
        info["base_fingerprint" if spec.kind == "base" else "model_fingerprint"] = fp
        info["total_params"] = sum(p.numel() for p in model.parameters())
        # The untouched base trains nothing; a full fine-tune trains every weight.
        info["trainable_params"] = 0 if spec.kind == "base" else info["total_params"]
        tokenizer = _load_tokenizer([tokenizer_path, path], spec.name)

    model.to(gen.resolved_device())
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def _safetensors_numel(path: Path) -> int:
    """Number of values stored in a safetensors file (read from the header, no tensor loading)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            count = 1
            for dim in f.get_slice(key).get_shape():
                count *= int(dim)
            total += count
    return total


def load_model_for_spec(
    spec: ModelSpec, gen: GenerationConfig | None = None, tokenizer_path: Path | str | None = None
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """`(model, tokenizer)` for a spec, in eval mode on the configured device (adapters merged)."""
    loaded = load_model_with_info(spec, gen, tokenizer_path)
    return loaded.model, loaded.tokenizer


def _unwrap(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model behind a possibly unmerged LoraModel."""
    from lora_module import LoraModel

    return model.model if isinstance(model, LoraModel) else model


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    config: GenerationConfig | None = None,
) -> list[str]:
    """Decode every prompt deterministically; returns one text per prompt, in input order.

    Seq2seq models return the decoder output. Causal models are fed left-padded prompts and
    the prompt tokens are cut from the output, so only the continuation is returned.
    """
    config = config or GenerationConfig()
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got a single string")
    if len(prompts) == 0:
        return []
    hf_model = _unwrap(model)
    is_seq2seq = bool(getattr(hf_model.config, "is_encoder_decoder", False))
    device = next(hf_model.parameters()).device
    model.eval()

    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token; cannot batch prompts")

    max_len = config.max_source_length
    # Over-long prompts: seq2seq keeps the start (as the data stage does), causal keeps the end,
    # where the prompt hands over to the answer ("Summary:").
    saved_side = tokenizer.truncation_side
    tokenizer.truncation_side = "right" if is_seq2seq else "left"
    try:
        encoded = tokenizer(
            list(prompts), truncation=max_len is not None, max_length=max_len, add_special_tokens=True
        )["input_ids"]
    finally:
        tokenizer.truncation_side = saved_side
    order = list(range(len(prompts)))
    if config.sort_by_length:
        # Longest first: the biggest batch runs first, so running out of memory shows up at once.
        order.sort(key=lambda i: -len(encoded[i]))

    outputs: list[str | None] = [None] * len(prompts)
    for start in range(0, len(order), config.batch_size):
        batch_idx = order[start : start + config.batch_size]
        seqs = [encoded[i] for i in batch_idx]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, T]
        attention = torch.zeros((len(seqs), width), dtype=torch.long)  # [B, T]
        for row, s in enumerate(seqs):
            if is_seq2seq:
                input_ids[row, : len(s)] = torch.tensor(s)
                attention[row, : len(s)] = 1
            else:
                # Left padding: every prompt ends at column `width`, so generation continues it.
                input_ids[row, width - len(s) :] = torch.tensor(s)
                attention[row, width - len(s) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=config.max_new_tokens,
            num_beams=config.num_beams,
            do_sample=False,
            pad_token_id=pad_id,
        )  # seq2seq: [B, new]; causal: [B, T + new]
        if not is_seq2seq:
            out = out[:, width:]
        texts = tokenizer.batch_decode(out, skip_special_tokens=True)
        for i, text in zip(batch_idx, texts, strict=True):
            outputs[i] = text.strip()
    return [o if o is not None else "" for o in outputs]
