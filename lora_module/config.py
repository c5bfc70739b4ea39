"""LoraConfig: the validated settings of one LoRA adapter, and per-architecture default targets.

Reads the `adapter_config.json` written by PEFT or by us (`LoraConfig.from_dict`): every key PEFT
writes is honoured (r, alpha, targets, init_lora_weights, rank/alpha patterns, modules_to_save,
layers_to_transform, ...), is bookkeeping, or is refused with one line naming it, instead of being
silently loaded as plain LoRA. `LoraConfig.for_module(path)` gives one layer's r and alpha
(rank_pattern / alpha_pattern, PEFT's matching). Torch-free, so it is cheap to import.
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

# Keys of adapter_config.json that carry no meaning for what a loaded adapter computes: bookkeeping,
# settings read only together with a key checked elsewhere (megatron_core with megatron_config,
# qalora_group_size with use_qalora), and the parameters of data-driven inits, which act only through
# init_lora_weights (PEFT ignores them otherwise, and keeps them in the adapters it converts).
_IGNORED_KEYS = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "runtime_config", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "megatron_core", "qalora_group_size", "base_fingerprint", "lora_pipeline",
})

# PEFT options that change what an adapter computes: accepted only at their neutral value.
_NEUTRAL_PEFT_KEYS: dict[str, Any] = {
    "fan_in_fan_out": False, "lora_bias": False, "layer_replication": None,
    "trainable_token_indices": None, "target_parameters": None, "use_qalora": False,
    "use_bdlora": None, "alora_invocation_tokens": None, "velora_config": None, "kasa_config": None,
    "monteclora_config": None, "arrow_config": None, "megatron_config": None, "ensure_weight_tying": False,
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
    use_dora: bool = False
    """DoRA: also train a per-output-row magnitude vector (PEFT's `use_dora`; see lora_module/dora.py)."""
    bias: str = "none"
    """Which biases to train; only "none" is supported (PEFT's default)."""
    init_lora_weights: bool | str = True
    """How a new adapter starts, PEFT's values: True (Kaiming-uniform A, zero B: a no-op), False (both
    random), "gaussian" (A ~ N(0, 1/r), zero B), "orthogonal", "pissa" / "pissa_niter_<K>" (W's r principal
    singular directions; fast SVD with K iterations) or "olora" (QR of W). PiSSA and OLoRA subtract
    scaling * B A from the base weights, as PEFT does; save_pretrained then writes the adapter converted to
    a plain LoRA delta of rank 2r against the unmodified base (lora_module/init.py). "eva" and "mica"
    adapters load (their base is untouched) but cannot be initialised here."""
    modules_to_save: list[str] | None = None
    """Modules trained and saved as full copies besides the LoRA layers (PEFT's rule: every module whose
    path ends with one of these strings), e.g. ["lm_head", "embed_tokens"] after adding tokens."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt the layers with these indices (the number after `layers_pattern`, or after the first
    numbered part of the path); applies to names matched as suffixes, as in PEFT."""
    layers_pattern: list[str] | str | None = None
    """Name of the layer list whose index layers_to_transform reads ("layers", "block", ...)."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted: names matched like target_modules' list, or a regex on the full path."""
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    """Per-module r: key (a name or regex) -> r for modules whose path matches `(.*\\.)?(key)$`; first
    matching key wins (PEFT's rule)."""
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    """Per-module lora_alpha, matched like rank_pattern."""

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
        if not isinstance(self.use_dora, bool):
            raise LoraConfigError(f"LoraConfig.use_dora must be true or false, got {self.use_dora!r}")
        if self.bias != "none":
            raise LoraConfigError(
                f"LoraConfig.bias must be 'none' (the only supported value), got {self.bias!r}"
            )
        self.target_modules = _check_targets(self.target_modules)
        _check_selection(self)
        _check_init(self)

    @property
    def scaling(self) -> float:
        """Factor applied to B A x: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def for_module(self, path: str) -> LoraConfig:
        """This config with the r and lora_alpha that rank_pattern / alpha_pattern give module `path`."""
        r = self.rank_pattern.get(pattern_key(self.rank_pattern, path), self.r)
        alpha = self.alpha_pattern.get(pattern_key(self.alpha_pattern, path), self.lora_alpha)
        if r == self.r and alpha == self.lora_alpha:
            return self
        return dataclasses.replace(self, r=r, lora_alpha=alpha)

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
            key = unsupported[0].split("=", 1)[0]
            raise LoraConfigError(
                f"unsupported LoRA option(s) {', '.join(unsupported)}: this core does not implement "
                f"{key}; set it to {_NEUTRAL_PEFT_KEYS[key]!r} (PEFT's default), or use PEFT for this adapter"
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


def check_rank_fits(config: LoraConfig, widths: dict[str, tuple[int, int]]) -> None:
    """LoraConfigError naming the first layer whose rank (r, or its rank_pattern entry) exceeds its width
    min(in_features, out_features): B A then has full rank already below r, so the extra rank only adds
    parameters (r 100000 on a 32-wide layer: a "low-rank" adapter larger than the model)."""
    for path, (in_features, out_features) in widths.items():
        r, width = config.for_module(path).r, min(in_features, out_features)
        if r > width:
            raise LoraConfigError(
                f"LoraConfig.r={r} is larger than layer {path}'s width {width} (in_features={in_features}, "
                f"out_features={out_features}); use r <= {width}"
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


# ---- init_lora_weights ---------------------------------------------------------------------------
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
# Values this core can initialise a new adapter with (and load); "eva" and "mica" only load.
TRAIN_INITS = (True, False, "gaussian", "orthogonal", "pissa", "pissa_niter_<K>", "olora")
_LOAD_ONLY_INITS = ("eva", "mica")


def mutates_base(init: Any) -> bool:
    """True for the init_lora_weights values with which PEFT subtracts the initial adapter from the base
    weights (PiSSA, OLoRA, CorDA, LoRA-GA) or replaces them (LoftQ): such an adapter does not fit the
    unmodified base unless it was converted (PEFT's `path_initial_model_for_weight_conversion`)."""
    if not isinstance(init, str):
        return False
    lowered = init.lower()
    return lowered.startswith(("pissa", "corda")) or lowered in ("olora", "loftq", "lora_ga")


def pissa_niter(init: Any) -> int | None:
    """K of "pissa_niter_K" (fast-SVD PiSSA), None for any other value."""
    match = _PISSA_NITER.fullmatch(init) if isinstance(init, str) else None
    return int(match.group(1)) if match else None


def _check_init(config: LoraConfig) -> None:
    init = config.init_lora_weights
    named = init in ("gaussian", "orthogonal", "pissa", "olora", *_LOAD_ONLY_INITS)
    if not (isinstance(init, bool) or (isinstance(init, str) and (named or pissa_niter(init) is not None))):
        raise LoraConfigError(
            f"LoraConfig.init_lora_weights={init!r} is not supported; use one of {list(TRAIN_INITS)} "
            "(CorDA, LoftQ and LoRA-GA: initialise and train with PEFT, then convert with "
            "save_pretrained(out, path_initial_model_for_weight_conversion=INIT_DIR))"
        )
    if mutates_base(init) and config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise LoraConfigError(
            f"init_lora_weights={init!r} with use_rslora and rank_pattern/alpha_pattern cannot be converted "
            "to a plain LoRA adapter at save (PEFT refuses it too); drop use_rslora or the patterns"
        )
    if mutates_base(init) and config.use_dora:
        raise LoraConfigError(
            f"init_lora_weights={init!r} cannot be combined with use_dora=True (the DoRA magnitude depends on"
            " the modified base, so the adapter cannot be converted for the unmodified base); use one of them"
        )


# ---- selection keys ----------------------------------------------------------------------------
def pattern_key(patterns: dict[str, Any], path: str) -> str | None:
    """PEFT's get_pattern_key: the first key of rank_pattern / alpha_pattern matching module `path`
    as `(.*\\.)?(key)$` from the start of the path; None when none matches."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


def _check_selection(config: LoraConfig) -> None:
    """Types of the selection keys, and the combinations PEFT refuses."""
    config.modules_to_save = _check_names("modules_to_save", config.modules_to_save, regex=False)
    config.exclude_modules = _check_names("exclude_modules", config.exclude_modules, regex=True)
    config.layers_pattern = _check_names("layers_pattern", config.layers_pattern, regex=False, single=True)
    config.layers_to_transform = _check_layer_indexes(config.layers_to_transform)
    for field_name, number in (("rank_pattern", int), ("alpha_pattern", float)):
        _check_pattern(field_name, getattr(config, field_name), number)
    targets = config.target_modules
    if isinstance(targets, str) and (config.layers_to_transform is not None or config.layers_pattern):
        raise LoraConfigError(
            f"layers_to_transform / layers_pattern cannot be used with target_modules={targets!r} (a regex "
            "or 'all-linear'); list the module names instead, or put the layer numbers in the regex"
        )
    if config.layers_pattern and config.layers_to_transform is None:
        raise LoraConfigError(
            f"layers_pattern={config.layers_pattern!r} needs layers_to_transform (the layer indices to adapt)"
        )


def _check_names(field_name: str, value: Any, regex: bool, single: bool = False) -> Any:
    """None, a non-empty list of non-empty names, or (regex / single) one string."""
    if value is None or (isinstance(value, str) and value and (regex or single)):
        if isinstance(value, str) and regex:
            _compile(field_name, value)
        return value
    if isinstance(value, list | tuple | set | frozenset):
        names = sorted(value) if isinstance(value, set | frozenset) else list(value)
        if all(isinstance(n, str) and n for n in names):
            return names
    kind = "a list of module names" + (", a regex" if regex else ", one name" if single else "")
    raise LoraConfigError(f"LoraConfig.{field_name} must be {kind} or None, got {value!r}")


def _check_layer_indexes(value: Any) -> list[int] | int | None:
    def is_index(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if value is None or is_index(value):
        return value
    if isinstance(value, list | tuple) and all(is_index(v) for v in value):
        return list(value)
    raise LoraConfigError(
        f"LoraConfig.layers_to_transform must be a layer index >= 0, a list of them or None, got {value!r}"
    )


def _check_pattern(field_name: str, pattern: Any, number: type) -> None:
    what = "an integer >= 1" if number is int else "a number > 0"
    if not isinstance(pattern, dict):
        raise LoraConfigError(
            f"LoraConfig.{field_name} must be a dict of module pattern -> {what}, got {pattern!r}"
        )
    for key, value in pattern.items():
        ok = (isinstance(value, int if number is int else int | float) and not isinstance(value, bool)
              and math.isfinite(value))
        if not isinstance(key, str) or not key or not ok or not (value >= 1 if number is int else value > 0):
            raise LoraConfigError(
                f"LoraConfig.{field_name}[{key!r}] must map a non-empty module pattern to {what}, "
                f"got {value!r}"
            )
        _compile(f"{field_name} key", rf"(.*\.)?({key})$")


def _compile(what: str, regex: str) -> None:
    try:
        re.compile(regex)
    except re.error as e:
        raise LoraConfigError(f"LoraConfig.{what} {regex!r} does not compile as a regex: {e}") from e
