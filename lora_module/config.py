"""LoraConfig: the validated settings of one LoRA adapter, and per-architecture default targets.

Reads the `adapter_config.json` written by PEFT or by us (`LoraConfig.from_dict`), ignoring the
PEFT keys that only matter when an adapter is first initialised and refusing PEFT features this
implementation does not have (DoRA, rank patterns, modules_to_save, ...) instead of silently
loading them as plain LoRA. Torch-free, so it is cheap to import.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from lora_module.errors import LoraConfigError, SettingsError

logger = logging.getLogger(__name__)

# Defaults when `target_modules` is None, keyed by `config.model_type` (as in PEFT's mapping).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **{t: ["q", "v"] for t in ("t5", "mt5", "umt5", "longt5", "switch_transformers")},
    **{
        t: ["q_proj", "v_proj"]
        for t in (
            "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
            "gemma3_text", "opt", "bart", "mbart", "gptj", "gpt_neo", "stablelm", "olmo", "olmo2", "smollm3",
        )
    },
}

# Weight dtypes a base model can be loaded in, by the name configs use (torch attribute names).
DTYPE_NAMES = ("float32", "bfloat16", "float16")

# Keys of adapter_config.json that carry no meaning for an adapter being loaded (bookkeeping, or
# options that only choose how fresh weights are initialised).
_IGNORED_KEYS = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "kasa_config", "monteclora_config", "arrow_config", "megatron_config", "megatron_core",
    "qalora_group_size", "ensure_weight_tying", "base_fingerprint", "lora_pipeline",
})

# PEFT options that change what an adapter computes: accepted only at their neutral value.
_NEUTRAL_PEFT_KEYS: dict[str, Any] = {
    "fan_in_fan_out": False, "use_dora": False, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {},
    "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "layer_replication": None,
    "exclude_modules": None, "trainable_token_indices": None, "target_parameters": None, "use_qalora": False,
    "use_bdlora": None, "alora_invocation_tokens": None, "velora_config": None,
}


def _is_neutral(value: Any) -> bool:
    return value in (None, False, {}, [], "")


@dataclass
class LoraConfig:
    """Settings of one LoRA adapter: out = W x + scaling * B A dropout(x)."""

    r: int = 8
    """Rank of the update B A (>= 1)."""
    lora_alpha: float = 16
    """Numerator of the scaling: alpha / r (or alpha / sqrt(r) with rsLoRA); > 0."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input, 0 <= p < 1."""
    target_modules: list[str] | str | None = None
    """Module names to adapt: a list matches name suffixes (like PEFT), a str is a regex matched against the
    full module path; None picks the architecture default (T5: q, v; Llama-style: q_proj, v_proj)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r."""
    bias: str = "none"
    """Which biases to train; only "none" is supported (PEFT's default)."""

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise LoraConfigError(f"LoraConfig.r must be an integer >= 1, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, int | float):
            raise LoraConfigError(f"LoraConfig.lora_alpha must be a number > 0, got {self.lora_alpha!r}")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise LoraConfigError(
                f"LoraConfig.lora_alpha must be a finite number > 0, got {self.lora_alpha!r}"
            )
        if not isinstance(self.lora_dropout, int | float) or not 0.0 <= self.lora_dropout < 1.0:
            raise LoraConfigError(
                f"LoraConfig.lora_dropout must be a probability with 0 <= p < 1, got {self.lora_dropout!r}"
            )
        if not isinstance(self.use_rslora, bool):
            raise LoraConfigError(f"LoraConfig.use_rslora must be true or false, got {self.use_rslora!r}")
        if self.bias != "none":
            raise LoraConfigError(
                f"LoraConfig.bias must be 'none' (the only supported value), got {self.bias!r}"
            )
        self.target_modules = _check_targets(self.target_modules)

    @property
    def scaling(self) -> float:
        """Factor applied to B A x: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, strict: bool = True) -> LoraConfig:
        """Build from a dict such as adapter_config.json (PEFT's or ours).

        PEFT bookkeeping keys are ignored; PEFT features we do not implement raise unless they hold
        their neutral value. Any other unknown key raises; with `strict=False` (used when reading an
        adapter written by a newer PEFT) an unknown key holding a neutral value is ignored with a log line.
        """
        if not isinstance(d, dict):
            raise LoraConfigError(f"LoraConfig.from_dict expects a dict, got {type(d).__name__}")
        fields = cls.field_names()
        if d.get("peft_type", "LORA") != "LORA":
            raise LoraConfigError(
                f"peft_type must be 'LORA' (only LoRA adapters are supported), got {d['peft_type']!r}"
            )
        unsupported, unknown = [], []
        for key, value in d.items():
            if key in fields or key in _IGNORED_KEYS:
                continue
            if key in _NEUTRAL_PEFT_KEYS:
                if not _is_neutral(value):
                    unsupported.append(f"{key}={value!r}")
            elif strict or not _is_neutral(value):
                unknown.append(key)
            else:
                logger.info("ignoring unknown adapter config key %r with neutral value %r", key, value)
        if unsupported:
            neutral = ", ".join(f"{k}={v!r}" for k, v in _NEUTRAL_PEFT_KEYS.items())
            raise LoraConfigError(
                f"unsupported LoRA option(s) {', '.join(unsupported)}: this implementation supports plain "
                f"LoRA only, so these must be absent or neutral ({neutral})"
            )
        if unknown:
            raise LoraConfigError(f"unknown LoraConfig key(s) {sorted(unknown)}; valid keys: {fields}")
        return cls(**{k: d[k] for k in fields if k in d})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_targets(targets: Any) -> list[str] | str | None:
    if targets is None:
        return None
    if isinstance(targets, str):
        if not targets:
            raise LoraConfigError(
                "LoraConfig.target_modules must not be an empty string (give names or a regex)"
            )
        try:
            re.compile(targets)
        except re.error as e:
            raise LoraConfigError(f"LoraConfig.target_modules regex {targets!r} does not compile: {e}") from e
        return targets
    if isinstance(targets, list | tuple | set | frozenset):
        names = sorted(targets) if isinstance(targets, set | frozenset) else list(targets)
        bad = [t for t in names if not isinstance(t, str) or not t]
        if not names or bad:
            raise LoraConfigError(
                "LoraConfig.target_modules must be a non-empty list of module names, a regex string "
                f"or None, got {targets!r}"
            )
        return names
    raise LoraConfigError(
        f"LoraConfig.target_modules must be a list of module names, a regex string or None, got {targets!r}"
    )


def default_target_modules(model_type: str | None) -> list[str] | None:
    """Architecture default targets for `config.model_type`, or None when we have none."""
    return list(DEFAULT_TARGET_MODULES[model_type]) if model_type in DEFAULT_TARGET_MODULES else None


def matches_target(module_name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a regex must match the full module path; a name matches itself or a `.name` suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def torch_dtype(name: str | None) -> Any:
    """The torch dtype called `name` (one of DTYPE_NAMES); None stays None (keep the checkpoint's dtype)."""
    if name is None:
        return None
    if name not in DTYPE_NAMES:
        raise LoraConfigError(f"dtype must be None or one of {list(DTYPE_NAMES)}, got {name!r}")
    import torch  # here, not at the top: this module stays torch-free to import

    return getattr(torch, name)


def dataclass_from_dict(cls: type, d: dict[str, Any], error: type[Exception] = SettingsError) -> Any:
    """`cls(**d)` for a settings dataclass; an unknown key is an error that lists the valid ones."""
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise error(f"unknown {cls.__name__} keys {unknown}; valid keys: {valid}")
    return cls(**d)
