"""Which modules an adapter touches, by PEFT's rules, and the full trainable copies of `modules_to_save`.

    config, paths = resolve_targets(model, config)   # LoRA layers: paths relative to the transformers model
    add_copies(model, "default", modules_to_save_paths(model, config.modules_to_save))

Targets follow PEFT's `check_target_module_exists`: a regex must match the whole module path; a listed
name matches a path equal to it (then layers_to_transform does not apply, as in PEFT) or ending in
`.name` (then only layers whose index is in layers_to_transform); exclude_modules and the modules of
modules_to_save are never targets.

Two presets name layers by role, whatever the architecture calls them (`lora.target_modules: attention`
in a training config; the rank sweep's layer sets):
- "all-linear" (PEFT's own shorthand, `_maybe_include_all_linear_layers`): every nn.Linear / Conv1D
  layer but the output layer (lm_head).
- "attention": every linear layer directly inside an attention block (a module whose class name holds
  "Attention"): T5 q, k, v, o (self- and cross-attention), Llama / Qwen / Mistral q_proj, k_proj,
  v_proj, o_proj. PEFT has no such preset: its per-model defaults (TRANSFORMERS_MODELS_TO_LORA_TARGET_
  MODULES_MAPPING, what `target_modules: null` gives, e.g. T5 q, v) are a subset of it. We chose the
  whole block because that is what "attention only" means in LoRA studies and in the rank sweep.
Both resolve to plain names (or full paths), so the saved adapter_config.json loads in PEFT alike.
A preset shadows the regex of the same name (a module path that is exactly "attention").

`modules_to_save` follows PEFT's ModulesToSaveWrapper: each module whose path ends with one of the
names is wrapped; the wrapper holds `original_module` (frozen) and one full copy per adapter under
`modules_to_save.<adapter>`, uses the active adapter's copy in forward, and is saved as
`base_model.model.<path>.<parameter>`.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_module.config import LoraConfig, default_target_modules
from lora_module.errors import LoraConfigError
from lora_module.layers import LoraLinear

ALL_LINEAR = "all-linear"
ATTENTION = "attention"
TARGET_PRESETS = (ATTENTION, ALL_LINEAR)
# Path parts inside an adapter layer or a modules_to_save wrapper: never targets themselves.
_ADAPTER_PARTS = frozenset({
    "base_layer", "lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector", "original_module",
    "modules_to_save",
})


def inside_adapter_layer(name: str) -> bool:
    """True for a path inside a LoRA layer or a modules_to_save wrapper."""
    return any(part in _ADAPTER_PARTS for part in name.split("."))


def _linear_paths(model: nn.Module) -> list[str]:
    # Conv1D (GPT-2's transposed linear) counts as linear, as in PEFT; resolve_targets then refuses it
    # in one line, since our layers wrap nn.Linear only.
    return [
        name for name, m in model.named_modules()
        if name and isinstance(m, nn.Linear | LoraLinear | Conv1D) and not inside_adapter_layer(name)
    ]


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct last name parts of the linear layers of `model` (what `target_modules` can name)."""
    return sorted({path.rsplit(".", 1)[-1] for path in _linear_paths(model)})


# ---- LoRA targets ------------------------------------------------------------------------------
def _layer_index_ok(config: LoraConfig, path: str) -> bool:
    """PEFT's layers_to_transform filter: the first index after layers_pattern (or after the first
    numbered path part) must be one of layers_to_transform."""
    indexes = config.layers_to_transform
    if indexes is None or indexes == []:
        return True
    match = None
    if not config.layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        patterns = config.layers_pattern
        patterns = [patterns] if isinstance(patterns, str) else patterns
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indexes if isinstance(indexes, int) else index in indexes


def is_target(config: LoraConfig, path: str) -> bool:
    """PEFT's check_target_module_exists for module `path` (targets already resolved: not None)."""
    exclude = config.exclude_modules
    if isinstance(exclude, str) and re.fullmatch(exclude, path):
        return False
    if isinstance(exclude, list) and (path in exclude or any(path.endswith(f".{e}") for e in exclude)):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", path) for m in config.modules_to_save or ()):
        return False
    targets = config.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    if path in targets:
        return True
    return any(path.endswith(f".{t}") for t in targets) and _layer_index_ok(config, path)


def _as_names(model: nn.Module, paths: set[str]) -> list[str]:
    """The shortest target list that selects exactly `paths`: their leaf names when those select no
    other module, else the full paths."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    everything = [name for name, _ in model.named_modules() if name and not inside_adapter_layer(name)]
    by_leaves = {p for p in everything if any(p == leaf or p.endswith(f".{leaf}") for leaf in leaves)}
    return leaves if by_leaves == paths else sorted(paths)


def _all_linear(model: nn.Module) -> list[str]:
    """PEFT's "all-linear": every linear layer but the output embeddings."""
    paths = set(_linear_paths(model))
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    paths -= {name for name, m in model.named_modules() if output is not None and m is output}
    return _as_names(model, paths)


def _attention(model: nn.Module) -> list[str]:
    """The "attention" preset: the linear layers whose parent module is an attention block."""
    linear = set(_linear_paths(model))
    blocks = [name for name, m in model.named_modules() if "Attention" in type(m).__name__]
    paths = {p for p in linear if p.rpartition(".")[0] in blocks}
    if not paths:
        raise LoraConfigError(
            f"target_modules {ATTENTION!r} found no linear layer inside an attention block (a module whose "
            f"class name holds 'Attention') of {type(model).__name__}; list the layers instead: "
            f"{linear_module_names(model)}"
        )
    return _as_names(model, paths)


def preset_targets(model: nn.Module, preset: str) -> list[str]:
    """The layer names preset `preset` ("attention" or "all-linear", any case) selects in `model`."""
    key = preset.lower()
    if key not in TARGET_PRESETS:
        raise LoraConfigError(f"target preset must be one of {list(TARGET_PRESETS)}, got {preset!r}")
    return _attention(model) if key == ATTENTION else _all_linear(model)


def resolve_targets(model: nn.Module, config: LoraConfig) -> tuple[LoraConfig, list[str]]:
    """(config with concrete target_modules, paths of the linear layers the adapter goes on); raises
    LoraConfigError naming the model's linear layers when the targets select none or a non-linear one."""
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        targets = default_target_modules(model_type)
        if targets is None:
            raise LoraConfigError(
                f"no default target_modules for model_type {model_type!r}; set LoraConfig.target_modules "
                f"to some of this model's linear layers (or 'all-linear'): {linear_module_names(model)}"
            )
    elif isinstance(targets, str) and targets.lower() in TARGET_PRESETS:
        targets = preset_targets(model, targets)
    resolved = LoraConfig(**{**config.to_dict(), "target_modules": targets})
    paths = []
    for name, module in model.named_modules():
        if not name or inside_adapter_layer(name) or not is_target(resolved, name):
            continue
        if isinstance(module, nn.Linear | LoraLinear):
            paths.append(name)
        elif not isinstance(targets, str):  # a regex may sweep up containers; a listed name may not
            raise LoraConfigError(
                f"target_modules {targets!r} names {name!r}, a {type(module).__name__}; only nn.Linear and "
                f"bitsandbytes Linear4bit layers can take LoRA. Linear layers: {linear_module_names(model)}"
            )
    if not paths:
        raise LoraConfigError(
            f"target_modules {targets!r} matched no linear layer of {type(model).__name__} (after "
            "exclude_modules / layers_to_transform / modules_to_save); linear layers in this model: "
            f"{linear_module_names(model)}"
        )
    return resolved, paths


# ---- modules_to_save ---------------------------------------------------------------------------
class ModulesToSave(nn.Module):
    """PEFT's ModulesToSaveWrapper: a frozen original module and one full trainable copy per adapter."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None

    def _current(self) -> nn.Module:
        name = self.active_adapter
        return self.modules_to_save[name] if name in self.modules_to_save else self.original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._current()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Model code reads attributes of the wrapped module (lm_head.weight, embed_tokens.num_embeddings).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self._current(), name)


def modules_to_save_paths(model: nn.Module, names: list[str] | None) -> list[str]:
    """Paths of the modules `names` selects (PEFT: the path ends with the name, as a plain string)."""
    if not names:
        return []
    paths = [
        key for key, _ in model.named_modules(remove_duplicate=False)
        if key and not inside_adapter_layer(key) and any(key.endswith(n) for n in names)
    ]
    nested = [p for p in paths if any(p.startswith(f"{q}.") for q in paths)]
    if nested:
        raise LoraConfigError(f"modules_to_save {names!r} selects {nested[0]!r} inside another selected "
                              "module; name only the outer one")
    return paths


def _check_copyable(model: nn.Module, path: str) -> nn.Module:
    module = model.get_submodule(path)
    original = module.original_module if isinstance(module, ModulesToSave) else module
    if isinstance(original, LoraLinear):
        raise LoraConfigError(f"modules_to_save selects {path!r}, which another adapter adapts with LoRA; "
                              "a module is either a LoRA target or saved in full, not both")
    if any(getattr(p, "quant_state", None) is not None for p in original.parameters()):
        raise LoraConfigError(f"modules_to_save selects {path!r}, a 4-bit quantized module, which cannot be "
                              "trained in full; leave it out of modules_to_save")
    return module


def add_copies(model: nn.Module, adapter: str, paths: list[str]) -> None:
    """Wrap each module at `paths` (once) and give it a full copy for `adapter` (frozen until synced)."""
    for path in paths:  # check all before changing any
        _check_copyable(model, path)
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            _replace(model, path, module)
        duplicate = copy.deepcopy(module.original_module)
        duplicate.requires_grad_(False)
        module.modules_to_save[adapter] = duplicate


def wrappers(model: nn.Module) -> list[tuple[str, ModulesToSave]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ModulesToSave)]


def drop_copies(model: nn.Module, adapter: str) -> None:
    """Remove `adapter`'s copies; a wrapper left with none becomes its original module again."""
    for path, wrapper in wrappers(model):
        if adapter in wrapper.modules_to_save:
            del wrapper.modules_to_save[adapter]
        if not len(wrapper.modules_to_save):
            _replace(model, path, wrapper.original_module)


def sync_copies(model: nn.Module, active: str | None, trainable: bool) -> None:
    """Forward through `active`'s copies (None: the originals); only those train, if `trainable`."""
    for _, wrapper in wrappers(model):
        wrapper.active_adapter = active
        for name, module in wrapper.modules_to_save.items():
            module.requires_grad_(trainable and name == active)


def unload_copies(model: nn.Module, active: str | None) -> None:
    """Put back, in place of every wrapper, `active`'s copy where it has one, else the original."""
    for path, wrapper in wrappers(model):
        copies = wrapper.modules_to_save
        _replace(model, path, copies[active] if active in copies else wrapper.original_module)


def copies_state_dict(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """`adapter`'s copies as `<path>.<parameter or buffer>` (PEFT's keys without `base_model.model.`)."""
    return {
        f"{path}.{key}": value
        for path, wrapper in wrappers(model) if adapter in wrapper.modules_to_save
        for key, value in wrapper.modules_to_save[adapter].state_dict().items()
    }


def expected_copy_keys(model: nn.Module, path: str) -> dict[str, tuple[int, ...]]:
    """State-dict keys (and shapes) a saved copy of the module at `path` must have."""
    module = _check_copyable(model, path)
    original = module.original_module if isinstance(module, ModulesToSave) else module
    return {key: tuple(value.shape) for key, value in original.state_dict().items()}


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path), child, new)
