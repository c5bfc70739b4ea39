"""Batched, deterministic generation for the three kinds of model the evaluation compares.

A `ModelSpec` names a model to evaluate: the untouched base (`kind="base"`, a Hub name or a
folder), a LoRA adapter over a base (`kind="lora"`, an adapter folder; the base comes from its
`adapter_config.json` unless given) or a fully fine-tuned model folder (`kind="full"`).
`load_model_for_spec` turns it into `(model, tokenizer)`; adapters are merged into the base
before generating, so LoRA costs nothing at inference. `generate` then decodes prompts in
length-sorted batches under `torch.inference_mode` and returns texts in the original order.

    from lora_module.evaluation.generation import GenerationConfig, ModelSpec, generate, load_model_for_spec
    model, tok = load_model_for_spec(ModelSpec("lora", "lora", "runs/x/adapter"))
    texts = generate(model, tok, prompts, GenerationConfig(batch_size=16, num_beams=1))
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lora_module.config import DTYPE_NAMES, dataclass_from_dict, torch_dtype
from lora_module.device import AUTO, enable_cuda_fast_paths, generation_dtype, resolve_device
from lora_module.errors import PipelineError, SettingsError
from lora_module.files import sha256_file
from lora_module.names import check_name
from lora_module.prompt import PromptSettings

MODEL_KINDS = ("base", "lora", "full")
# The one default of each decoding setting (evaluation, the registry's pyfunc and `predict` use them).
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_NEW_TOKENS = 128
# "org/name" or "name": what a Hugging Face Hub id looks like (anything else must exist on disk).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelLoadError(PipelineError, RuntimeError):
    """A model spec that cannot be loaded (missing folder, not an adapter, wrong base)."""


@dataclass
class GenerationConfig:
    """How to decode: batching, length limits and search. Defaults are greedy decoding."""

    batch_size: int = DEFAULT_BATCH_SIZE
    """Prompts per `generate` call."""
    max_new_tokens: int | None = None
    """Upper bound on generated tokens per example. None: the target length the model was trained with
    (the prepared data's `max_target_length`); where none is recorded, DEFAULT_MAX_NEW_TOKENS."""
    num_beams: int = 1
    """Beam width; 1 means greedy decoding."""
    max_source_length: int | None = None
    """Prompts are truncated to this many tokens. None: the limit the model was trained with (the
    prepared data's manifest, in evaluation and serving); where none is recorded, no truncation."""
    sort_by_length: bool = True
    """Batch prompts of similar length together (less padding); outputs keep the input order."""
    merge_adapter: bool = True
    """Merge LoRA weights into the base before generating (faster; no effect on other kinds)."""
    device: str = "auto"
    """'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    dtype: str | None = "auto"
    """Weights dtype for generation: 'auto' (bf16 on a CUDA GPU that has it, else fp16 there; as loaded on
    CPU: lora_module.device), 'float32', 'bfloat16' or 'float16'. None: the same as 'auto'."""
    add_special_tokens: bool = True
    """Tokenize prompts with the tokenizer's special tokens. `with_settings` sets it from the prompt
    format: False for chat prompts, whose chat template already wrote BOS (no double BOS)."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "num_beams", "max_new_tokens", "max_source_length"):
            value = getattr(self, name)
            if value is None and name.startswith("max_"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                optional = " or None" if name.startswith("max_") else ""
                raise SettingsError(
                    f"GenerationConfig.{name} must be an integer >= 1{optional}, got {value!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise SettingsError(
                f"GenerationConfig.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
            )
        if not isinstance(self.add_special_tokens, bool):
            raise SettingsError(
                f"GenerationConfig.add_special_tokens must be true or false, got {self.add_special_tokens!r}")
        if self.dtype not in (None, AUTO, *DTYPE_NAMES):
            raise SettingsError(
                f"GenerationConfig.dtype must be 'auto' or one of {list(DTYPE_NAMES)}, got {self.dtype!r}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationConfig:
        """Build from a mapping; unknown keys are an error that lists the valid ones."""
        return dataclass_from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_settings(self, settings: PromptSettings) -> GenerationConfig:
        """A copy whose unset lengths are the ones the model was trained with (`settings`, from the
        prepared data's manifest); a set one that differs from them is logged as an override. Prompts
        are tokenized as the prompt format asks (`settings.add_special_tokens`)."""
        return replace(
            self,
            add_special_tokens=settings.add_special_tokens,
            max_source_length=settings.resolve("max_source_length", self.max_source_length),
            max_new_tokens=settings.resolve("max_target_length", self.max_new_tokens, "max_new_tokens")
            or DEFAULT_MAX_NEW_TOKENS,
        )

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def resolved_dtype(self) -> str | None:
        """The dtype name to load weights in on the resolved device (None: as saved)."""
        return generation_dtype(self.resolved_device(), self.dtype)


@dataclass
class ModelSpec:
    """One model to evaluate: a display name, its kind and where it lives."""

    name: str
    """Short name used in file names and report rows (lora_module.names rule: letters, digits, '_', '-')."""
    kind: str
    """'base' (untouched model), 'lora' (adapter folder) or 'full' (fine-tuned model folder)."""
    path: str
    """base: Hub name or folder; lora: adapter folder (or a training output with adapter/); full: folder."""
    base: str | None = None
    """lora only: base model to load instead of adapter_config.json's base_model_name_or_path."""
    force: bool = False
    """lora only: load the adapter even onto a base whose fingerprint differs from its training base's."""

    def __post_init__(self) -> None:
        check_name("ModelSpec.name (it becomes a file name)", self.name, SettingsError)
        if self.kind not in MODEL_KINDS:
            raise SettingsError(
                f"ModelSpec.kind {self.kind!r} is not valid; valid kinds: {list(MODEL_KINDS)}")
        self.path = str(self.path)
        if not self.path:
            raise SettingsError(f"ModelSpec.path is empty for model {self.name!r}; give a folder or Hub name")
        if self.base is not None and self.kind != "lora":
            raise SettingsError(f"ModelSpec.base is only used with kind='lora', got kind={self.kind!r}")
        if self.force and self.kind != "lora":
            raise SettingsError(f"ModelSpec.force is only used with kind='lora', got kind={self.kind!r}")

    def resolved_path(self) -> Path | str:
        """The folder to load, accepting a training output dir (with adapter/ or model/) too."""
        if self.kind == "lora":
            return self._folder_with("adapter_config.json", "adapter", "adapter folder",
                                     "it is not an adapter folder: kind='lora' needs a PEFT-format "
                                     "adapter directory")
        if self.kind == "full":
            return self._folder_with("config.json", "model", "model folder",
                                     "kind='full' needs a folder written by save_pretrained "
                                     "(or a training output dir with model/)")
        return _local_or_hub(self.path, self.name)

    def _folder_with(self, marker: str, sub: str, what: str, need: str) -> Path:
        """`path`, or `path/<sub>` (a training output), holding `marker`."""
        p = Path(self.path)
        if not p.exists():
            raise ModelLoadError(f"model {self.name!r}: {what} {p} does not exist")
        if not (p / marker).exists() and (p / sub / marker).exists():
            p = p / sub
        if not (p / marker).exists():
            raise ModelLoadError(f"model {self.name!r}: {p} has no {marker}; {need}")
        return p


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
    gen = gen or GenerationConfig()
    path = spec.resolved_path()
    info: dict[str, Any] = {"name": spec.name, "kind": spec.kind, "path": str(path)}
    if spec.kind == "lora":
        model, tokenizer = _load_lora(spec, Path(path), gen, tokenizer_path, info)
    else:
        model, tokenizer = _load_plain(spec, path, gen, tokenizer_path, info)
    model.to(gen.resolved_device())
    enable_cuda_fast_paths(gen.resolved_device())
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def _load_lora(spec: ModelSpec, adapter_dir: Path, gen: GenerationConfig, tokenizer_path: Path | str | None,
               info: dict[str, Any]) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Base + adapter (merged unless `gen.merge_adapter` is off); fills `info` with the adapter's figures."""
    from lora_module import (
        AdapterLoadError,
        FingerprintMismatchError,
        LoraModel,
        base_fingerprint,
        read_adapter_config,
    )

    adapter_cfg = read_adapter_config(adapter_dir)
    base_name = spec.base or adapter_cfg.get("base_model_name_or_path")
    if not base_name:
        raise ModelLoadError(
            f"model {spec.name!r}: {adapter_dir / 'adapter_config.json'} names no "
            "base_model_name_or_path; pass the base explicitly (ModelSpec.base / --lora-base)"
        )
    base, base_path = _load_base_of_adapter(spec, str(base_name), adapter_dir, gen)
    try:
        lora = LoraModel.from_pretrained(base, str(adapter_dir), force=spec.force)
    except FingerprintMismatchError as e:
        trained_on = str(adapter_cfg.get("base_fingerprint"))[:12]
        raise FingerprintMismatchError(
            f"model {spec.name!r}: adapter {adapter_dir} was trained on a different base than {base_path} "
            f"(fingerprint {trained_on}, this base {base_fingerprint(base)[:12]}); "
            "pass the right base with --lora-base (ModelSpec.base), or --force (ModelSpec.force=True) to "
            "evaluate it on this base anyway"
        ) from e
    except AdapterLoadError as e:
        raise AdapterLoadError(
            f"model {spec.name!r}: adapter {adapter_dir} does not fit base {base_path}: {e}"
        ) from e
    info["base"] = str(base_path)
    info["base_fingerprint"] = lora.base_fingerprint()
    weights = adapter_dir / "adapter_model.safetensors"
    if weights.exists():
        info["adapter_sha256"] = sha256_file(weights)
        info["adapter_bytes"] = weights.stat().st_size
        info["trainable_params"] = _safetensors_numel(weights)
    info["total_params"] = sum(p.numel() for p in lora.model.parameters())
    info["adapter_config"] = {
        k: adapter_cfg.get(k) for k in ("r", "lora_alpha", "target_modules", "use_rslora", "task_type")
    }
    model: torch.nn.Module = lora.merge_and_unload() if gen.merge_adapter else lora
    info["merged"] = gen.merge_adapter
    return model, _load_tokenizer([tokenizer_path, adapter_dir, base_path], spec.name)


def _load_base_of_adapter(spec: ModelSpec, base_name: str, adapter_dir: Path,
                          gen: GenerationConfig) -> tuple[torch.nn.Module, Path | str]:
    from lora_module import load_base_model

    try:
        base_path = _local_or_hub(base_name, spec.name)
        return load_base_model(str(base_path), torch_dtype=torch_dtype(gen.resolved_dtype()),
                               device=gen.resolved_device()), base_path
    except (ModelLoadError, OSError) as e:
        raise ModelLoadError(
            f"model {spec.name!r}: cannot load the base {base_name} of adapter {adapter_dir} ({e}); "
            "pass the right base with ModelSpec.base / --lora-base"
        ) from e


def _load_plain(spec: ModelSpec, path: Path | str, gen: GenerationConfig, tokenizer_path: Path | str | None,
                info: dict[str, Any]) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """An untouched base or a fully fine-tuned model; fills `info` with its fingerprint and sizes."""
    from lora_module import base_fingerprint, load_base_model

    try:
        model = load_base_model(str(path), torch_dtype=torch_dtype(gen.resolved_dtype()),
                               device=gen.resolved_device())
    except OSError as e:
        raise ModelLoadError(f"model {spec.name!r}: cannot load {path}: {e}") from e
    info["base_fingerprint" if spec.kind == "base" else "model_fingerprint"] = base_fingerprint(model)
    info["total_params"] = sum(p.numel() for p in model.parameters())
    # The untouched base trains nothing; a full fine-tune trains every weight.
    info["trainable_params"] = 0 if spec.kind == "base" else info["total_params"]
    return model, _load_tokenizer([tokenizer_path, path], spec.name)


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


def unwrap_model(model: torch.nn.Module) -> PreTrainedModel:
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
    hf_model = unwrap_model(model)
    is_seq2seq = bool(getattr(hf_model.config, "is_encoder_decoder", False))
    device = next(hf_model.parameters()).device
    model.eval()

    pad_id = pad_token_id(tokenizer)

    encoded = encode_prompts(tokenizer, prompts, config.max_source_length, is_seq2seq,
                             add_special_tokens=config.add_special_tokens)
    order = list(range(len(prompts)))
    if config.sort_by_length:
        # Longest first: the biggest batch runs first, so running out of memory shows up at once.
        order.sort(key=lambda i: -len(encoded[i]))

    outputs: list[str | None] = [None] * len(prompts)
    for start in range(0, len(order), config.batch_size):
        batch_idx = order[start : start + config.batch_size]
        input_ids, attention = pad_batch([encoded[i] for i in batch_idx], pad_id, left=not is_seq2seq)
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
            num_beams=config.num_beams,
            do_sample=False,
            pad_token_id=pad_id,
        )  # seq2seq: [B, new]; causal: [B, T + new]
        if not is_seq2seq:
            out = out[:, input_ids.shape[1] :]
        texts = tokenizer.batch_decode(out, skip_special_tokens=True)
        for i, text in zip(batch_idx, texts, strict=True):
            outputs[i] = text.strip()
    return [o if o is not None else "" for o in outputs]


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id prompts are padded with: the pad token, else the eos token (causal LMs often lack a pad)."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise ModelLoadError(f"tokenizer {type(tokenizer).__name__} has neither a pad token nor an eos "
                             "token, so prompts cannot be batched; save the model with a tokenizer that "
                             "has one")
    return pad_id


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_len: int | None,
                   is_seq2seq: bool, add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids per prompt, cut to `max_len` (None: not cut); without the tokenizer's special tokens
    when `add_special_tokens` is off (chat prompts: `PromptSettings.add_special_tokens`)."""
    # Over-long prompts: seq2seq keeps the start (as the data stage does), causal keeps the end,
    # where the prompt hands over to the answer ("Summary:").
    saved_side = tokenizer.truncation_side
    tokenizer.truncation_side = "right" if is_seq2seq else "left"
    try:
        return tokenizer(
            list(prompts), truncation=max_len is not None, max_length=max_len,
            add_special_tokens=add_special_tokens,
        )["input_ids"]
    finally:
        tokenizer.truncation_side = saved_side


def pad_batch(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], attention_mask [B, T]) of one batch, padded to its longest row."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        # Left padding (causal): every prompt ends at column `width`, so generation continues it.
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        input_ids[row, cols] = torch.tensor(s)
        attention[row, cols] = 1
    return input_ids, attention
