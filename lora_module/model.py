"""LoraModel: LoRA adapters injected into a frozen transformers model, several named adapters per base.

    from lora_module import LoraConfig, LoraModel
    lm = LoraModel(base, LoraConfig(r=8, lora_alpha=16))      # adapter "default", active and trainable
    lm.save_pretrained("out/adapter")                         # PEFT format (+ base fingerprint)
    lm = LoraModel.from_pretrained(fresh_base, "out/adapter")  # atomic, fingerprint-checked

Only the active adapter's weights are trainable (`requires_grad`); the base is always frozen.
Switching adapters touches only the small adapter matrices, never the base weights. The exception is
a PiSSA/OLoRA init (`init_lora_weights`, lora_module/init.py): as in PEFT it subtracts the initial
adapter from the base weights, so such an adapter stays alone on its base (delete_adapter adds it
back), and save_pretrained writes it converted to a plain LoRA adapter for the unmodified base.
Selection keys (all-linear, layers_to_transform, rank_pattern, modules_to_save, ...) follow PEFT's
rules: lora_module/selection.py.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_module import adapter_io, selection
from lora_module import init as lora_init
from lora_module.config import LoraConfig, check_rank_fits, mutates_base
from lora_module.errors import AdapterLoadError, LoraConfigError
from lora_module.layers import LoraLinear, dequantized_linear, is_linear4bit
from lora_module.mixed_batch import mixed_batch
from lora_module.names import check_name

logger = logging.getLogger(__name__)

def _param_count(p: torch.Tensor) -> int:
    # A Params4bit stores two 4-bit values per byte; count the logical weight.
    state = getattr(p, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None else p.numel()


def _features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a target layer, already wrapped or not."""
    layer = getattr(module, "base_layer", module)
    return layer.in_features, layer.out_features


class LoraModel(nn.Module):
    """A transformers model with LoRA layers injected in place; forwards and generates like the model."""

    def __init__(self, model: nn.Module, config: LoraConfig | None, adapter_name: str = "default") -> None:
        super().__init__()
        self.model = model
        self.adapters: dict[str, LoraConfig] = {}
        self._active: str | None = None
        self._merged: str | None = None
        self._disabled = False
        self._trainable: dict[str, bool] = {}
        # PiSSA/OLoRA adapters: module path -> (A0, B0), what their init took out of the base weights.
        self._initial: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        if config is not None:  # fail on a bad name or target before freezing anything
            self._check_new_name(adapter_name, LoraConfigError)
            self._plan_new(config)
        self._was_trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        for p in model.parameters():
            p.requires_grad_(False)
        # Record the base's fingerprint now, before any merge can change the weights.
        if getattr(model, adapter_io.FINGERPRINT_ATTR, None) is None:
            setattr(model, adapter_io.FINGERPRINT_ATTR, adapter_io.compute_fingerprint(model))
        if config is not None:
            self.add_adapter(adapter_name, config)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)  # config, device, generation_config, ... like PeftModel

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The model's forward; `adapter_names` (one per row, BASE_ROW for none) mixes adapters in a batch."""
        if adapter_names is None:
            return self.model(*args, **kwargs)
        with self.mixed_batch(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The model's generate; `adapter_names` as in forward (like PEFT's `generate(adapter_names=...)`)."""
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        with self.mixed_batch(adapter_names, num_beams=int(kwargs.get("num_beams") or 1)):
            return self.model.generate(*args, **kwargs)

    # ---- layers ------------------------------------------------------------------------------
    def lora_layers(self) -> Iterator[tuple[str, LoraLinear]]:
        """(module path, layer) for every LoRA-wrapped layer, paths relative to `self.model`."""
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLinear):
                yield name, module

    def _replace(self, path: str, new: nn.Module) -> None:
        parent_path, _, child = path.rpartition(".")
        setattr(self.model.get_submodule(parent_path), child, new)

    def _wrap(self, path: str) -> LoraLinear:
        module = self.model.get_submodule(path)
        if isinstance(module, LoraLinear):
            return module
        layer = LoraLinear(module)
        self._replace(path, layer)
        return layer

    def _drop_adapter_from_layers(self, name: str) -> None:
        """Remove `name` from every layer; layers left without adapters become the plain base layer again."""
        for path, layer in list(self.lora_layers()):
            if name in layer.lora_A:
                layer.delete_adapter(name)
            if not layer.adapter_names:
                self._replace(path, layer.base_layer)
        selection.drop_copies(self.model, name)

    def _plan_new(self, config: LoraConfig) -> tuple[LoraConfig, list[str], list[str]]:
        """(resolved config, LoRA layer paths, modules_to_save paths) of a new adapter; changes nothing."""
        resolved, paths = selection.resolve_targets(self.model, config)
        saved = selection.modules_to_save_paths(self.model, resolved.modules_to_save)
        if resolved.modules_to_save and not saved:
            raise LoraConfigError(f"modules_to_save {resolved.modules_to_save!r} matched no module of "
                                  f"{type(self.model).__name__} (a module path must end with one of them)")
        return resolved, paths, saved

    def _check_new_name(self, name: str, error: type[Exception]) -> None:
        check_name("adapter name", name, error)
        if hasattr(nn.ModuleDict, name):  # "keys", "update", ...: would shadow a ModuleDict method
            raise error(f"invalid adapter name {name!r}: it is the name of a torch ModuleDict method")
        if name in self.adapters:
            raise error(f"adapter {name!r} already exists (adapters: {list(self.adapters)}); delete it first")

    def _sync_layers(self) -> None:
        """Point every layer at the active adapter (None while disabled or where it has no weights)."""
        for _, layer in self.lora_layers():
            use = self._active if not self._disabled and self._active in layer.lora_A else None
            layer.active_adapter = use
        active = None if self._disabled else self._active
        selection.sync_copies(self.model, active, self._trainable.get(active, False))

    def _sync_trainable(self) -> None:
        for _, layer in self.lora_layers():
            for name in layer.adapter_names:
                train = name == self._active and self._trainable.get(name, False)
                for p in layer.adapter_parameters(name):
                    p.requires_grad_(train)

    # ---- named adapters --------------------------------------------------------------------
    @property
    def active_adapter(self) -> str | None:
        return self._active

    @property
    def merged_adapter(self) -> str | None:
        return self._merged

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        """Inject a fresh adapter, initialised as `config.init_lora_weights` says (default: A Kaiming-uniform,
        B zeros), with its modules_to_save copies. It becomes active only if none is."""
        self._check_new_name(name, LoraConfigError)
        self._check_base_untouched(name, config.init_lora_weights)
        resolved, paths, saved = self._plan_new(config)  # validates before any module is touched
        # Only new adapters: a saved adapter of a larger rank still loads, as in PEFT.
        check_rank_fits(resolved, {p: _features(self.model.get_submodule(p)) for p in paths})
        initial: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        try:
            layers = {path: self._wrap(path) for path in paths}
            lora_init.check_init(resolved, list(layers.values()))
            for path, layer in layers.items():  # layer by layer: random draws in PEFT's order
                layer.add_adapter(name, resolved.for_module(path))
                start = lora_init.init_adapter(layer, name, resolved.for_module(path))
                if start is not None:
                    initial[path] = start
            selection.add_copies(self.model, name, saved)
        except BaseException:
            self._restore_base(name, initial)
            self._drop_adapter_from_layers(name)
            raise
        if initial:
            self._initial[name] = initial
        self._record(name, resolved, trainable=True)

    def _check_base_untouched(self, name: str, init: Any) -> None:
        """A PiSSA/OLoRA adapter changes the base weights every other adapter runs on: it must be alone."""
        mutating = next(iter(self._initial), None)
        if mutating is not None or (mutates_base(init) and self.adapters):
            culprit = mutating or name
            init = self.adapters[mutating].init_lora_weights if mutating else init
            raise LoraConfigError(
                f"cannot add adapter {name!r}: adapter {culprit!r} uses init_lora_weights={init!r}, which "
                "changes the base weights other adapters run on; save it (written as plain LoRA) and reload"
            )

    def _restore_base(self, name: str, initial: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for path, layer in self.lora_layers():
            if path in initial:
                lora_init.restore_base(layer, name, initial[path])

    def _record(self, name: str, config: LoraConfig, trainable: bool) -> None:
        """Register an adapter whose layers are in place; it becomes active only if none is (like PEFT)."""
        self.adapters[name] = config
        self._trainable[name] = trainable
        if self._active is None:
            self.set_adapter(name)
        else:
            self._sync_layers()
            self._sync_trainable()

    def set_adapter(self, name: str) -> None:
        """Make `name` the adapter used by forward/generate (and the only trainable one)."""
        if name not in self.adapters:
            raise LoraConfigError(f"unknown adapter {name!r}; adapters on this model: {list(self.adapters)}")
        if self._merged is not None and self._merged != name:
            warnings.warn(f"unmerging adapter {self._merged!r} to activate {name!r}", UserWarning,
                          stacklevel=2)
            self.unmerge_adapter()
        self._active = name
        self._sync_layers()
        self._sync_trainable()

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name`; if it was active, the model runs as the base until set_adapter()."""
        if name not in self.adapters:
            raise LoraConfigError(f"unknown adapter {name!r}; adapters on this model: {list(self.adapters)}")
        self._restore_base(name, self._initial.pop(name, {}))
        self._drop_adapter_from_layers(name)
        del self.adapters[name]
        del self._trainable[name]
        if self._merged == name:
            self._merged = None
        if self._active == name:
            self._active = None
        self._sync_layers()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[LoraModel]:
        """Inside the block the model behaves exactly as the base (a merged adapter is unmerged meanwhile)."""
        was_merged = self._merged
        self.unmerge_adapter()
        self._disabled = True
        self._sync_layers()
        try:
            yield self
        finally:
            self._disabled = False
            self._sync_layers()
            if was_merged is not None:
                self.merge_adapter()

    def mixed_batch(self, adapter_names: Sequence[str], num_beams: int = 1
                    ) -> contextlib.AbstractContextManager[LoraModel]:
        """A block in which row i of every batch goes through adapter `adapter_names[i]` (BASE_ROW: the
        bare base), as PEFT's `adapter_names`; inference only (`lora_module.mixed_batch`)."""
        saving = sorted({n for n in adapter_names if n in self.adapters and self.adapters[n].modules_to_save})
        if saving:
            raise LoraConfigError(f"adapter {saving[0]!r} has modules_to_save, which mixed-adapter batches "
                                  "do not support; run its rows in a batch of their own (set_adapter)")
        return mixed_batch(self, adapter_names, num_beams)

    # ---- merge -------------------------------------------------------------------------------
    def merge_adapter(self) -> None:
        """Add the active adapter into the base weights (fp32 math, cast back); a second call is a no-op."""
        self._merge(warn=True)

    def _merge(self, warn: bool) -> None:
        if self._active is None:
            raise LoraConfigError(
                f"no active adapter to merge; call set_adapter() first (adapters: {list(self.adapters)})"
            )
        if self._disabled:
            raise LoraConfigError("cannot merge inside disable_adapter()")
        if self._merged == self._active:
            return
        self.unmerge_adapter()
        n4 = 0
        for _, layer in self.lora_layers():
            if self._active in layer.lora_A:
                n4 += is_linear4bit(layer.base_layer)
                layer.merge(self._active)
        self._merged = self._active
        if n4 and warn:
            _warn(f"merge_adapter: {n4} 4-bit layers were dequantized to 16/32-bit nn.Linear to hold the "
                  "merged weights (unmerge restores the original 4-bit layers)", stacklevel=4)

    def unmerge_adapter(self) -> None:
        """Subtract the merged adapter from the base weights again; no-op when nothing is merged."""
        for _, layer in self.lora_layers():
            layer.unmerge()
        self._merged = None

    def merge_and_unload(self, dtype: torch.dtype | None = None) -> nn.Module:
        """Merge the active adapter and return the plain transformers model (no LoRA layers left).

        4-bit layers come back dequantized as nn.Linear in `dtype` (default: their compute dtype), with a
        warning: the returned model is not quantized. This LoraModel holds no adapters afterwards.
        """
        if self._active is not None and not self._disabled:
            self._merge(warn=False)  # one warning below covers the merged and the other 4-bit layers
        dequantized = 0
        for path, layer in list(self.lora_layers()):
            base = layer.base_layer
            if layer._quantized_base:
                dequantized += 1
                base = base.to(dtype) if dtype is not None else base
            self._replace(path, base)
        selection.unload_copies(self.model, None if self._disabled else self._active)
        for path, module in list(self.model.named_modules()):
            if is_linear4bit(module):
                self._replace(path, dequantized_linear(module, dtype))
                dequantized += 1
        if dequantized:
            _warn(f"merge_and_unload: dequantized {dequantized} 4-bit layers into 16/32-bit nn.Linear "
                  "layers; the returned model is NOT quantized (re-quantizing would round merged weights)")
            if hasattr(getattr(self.model, "config", None), "quantization_config"):
                delattr(self.model.config, "quantization_config")
            if hasattr(self.model, adapter_io.QUANTIZATION_ATTR):
                delattr(self.model, adapter_io.QUANTIZATION_ATTR)
        if hasattr(self.model, adapter_io.FINGERPRINT_ATTR):
            delattr(self.model, adapter_io.FINGERPRINT_ATTR)  # the merged weights are no longer that base
        for name, p in self.model.named_parameters():
            p.requires_grad_(name in self._was_trainable)
        self.adapters.clear()
        self._trainable.clear()
        self._initial.clear()
        self._active = self._merged = None
        return self.model

    # ---- adapter I/O -------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's keys: `base_model.model.<path>.lora_A.weight`, ... (DoRA:
        `<path>.lora_magnitude_vector`, without `.weight`, as PEFT writes it)."""
        name = self._adapter_or_active(adapter_name)
        out = {}
        for path, layer in self.lora_layers():
            if name in layer.lora_A:
                out[f"{adapter_io.KEY_PREFIX}{path}.lora_A.weight"] = layer.lora_A[name].weight
                out[f"{adapter_io.KEY_PREFIX}{path}.lora_B.weight"] = layer.lora_B[name].weight
                if name in layer.lora_magnitude_vector:
                    key = f"{adapter_io.KEY_PREFIX}{path}.{adapter_io.MAGNITUDE_KEY}"
                    out[key] = layer.lora_magnitude_vector[name].weight
        for key, value in selection.copies_state_dict(self.model, name).items():
            out[f"{adapter_io.KEY_PREFIX}{key}"] = value  # modules_to_save: `<path>.weight`, as PEFT
        return out

    def _adapter_or_active(self, adapter_name: str | None) -> str:
        name = adapter_name if adapter_name is not None else self._active
        if name is None or name not in self.adapters:
            raise LoraConfigError(f"unknown adapter {name!r}; adapters on this model: {list(self.adapters)}")
        return name

    def save_pretrained(self, path: str | Path, adapter_name: str | None = None,
                        base_model_name_or_path: str | None = None, metadata: dict | None = None) -> Path:
        """Write adapter_config.json + adapter_model.safetensors (PEFT format, plus base_fingerprint).

        A PiSSA/OLoRA adapter is written converted to plain LoRA for the unmodified base (rank 2r,
        `lora_module.init.convert_to_plain_lora`), so the file fits the base its fingerprint names."""
        name = self._adapter_or_active(adapter_name)
        tensors, config = self.adapter_state_dict(name), self.adapters[name]
        if name in self._initial:
            tensors, config = lora_init.convert_to_plain_lora(tensors, self._initial[name], config,
                                                              adapter_io.KEY_PREFIX)
        return adapter_io.save_adapter(
            self.model, Path(path), config, tensors,
            fingerprint=self.base_fingerprint(), adapter_name=name,
            base_model_name_or_path=base_model_name_or_path, metadata=metadata,
        )

    def load_adapter(self, path: str | Path, adapter_name: str = "default", is_trainable: bool = False,
                     force: bool = False) -> None:
        """Load a PEFT-format adapter as `adapter_name`; atomic (any error leaves the model unchanged).

        Like PEFT, it becomes active only if no adapter is active; use set_adapter() to switch.
        """
        self._check_new_name(adapter_name, AdapterLoadError)
        self._check_base_untouched(adapter_name, True)
        plan = adapter_io.plan_adapter_load(self.model, path, force=force)
        self._install(adapter_name, plan, is_trainable)

    def _install(self, name: str, plan: adapter_io.AdapterPlan, is_trainable: bool) -> None:
        try:
            with torch.no_grad():
                for path, (weight_a, weight_b) in plan.weights.items():
                    layer = self._wrap(path)
                    layer.add_adapter(name, plan.config.for_module(path))
                    layer.lora_A[name].weight.copy_(weight_a)  # [r, in]
                    layer.lora_B[name].weight.copy_(weight_b)  # [out, r]
                    if path in plan.magnitudes:
                        layer.lora_magnitude_vector[name].weight.copy_(plan.magnitudes[path])  # [out]
                selection.add_copies(self.model, name, list(plan.saved_modules))
                for path, state in plan.saved_modules.items():
                    self.model.get_submodule(path).modules_to_save[name].load_state_dict(state)
        except BaseException:
            self._drop_adapter_from_layers(name)
            raise
        self._record(name, plan.config, is_trainable)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | Path, adapter_name: str = "default",
                        is_trainable: bool = False, force: bool = False) -> LoraModel:
        """Wrap `model` and load the adapter at `path` as the active adapter (model untouched on error)."""
        if isinstance(model, LoraModel):
            model.load_adapter(path, adapter_name, is_trainable=is_trainable, force=force)
            model.set_adapter(adapter_name)
            return model
        plan = adapter_io.plan_adapter_load(model, path, force=force)  # validate before touching the model
        had_fingerprint = hasattr(model, adapter_io.FINGERPRINT_ATTR)
        lora_model = cls(model, None)
        try:
            lora_model._install(adapter_name, plan, is_trainable)
        except BaseException:
            for name, p in model.named_parameters():
                p.requires_grad_(name in lora_model._was_trainable)
            if not had_fingerprint:
                delattr(model, adapter_io.FINGERPRINT_ATTR)
            raise
        return lora_model

    # ---- reporting ---------------------------------------------------------------------------
    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; 4-bit weights count as their logical size."""
        trainable = total = 0
        for p in self.parameters():
            n = _param_count(p)
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> str:
        """PEFT-style one-line summary; printed and returned."""
        trainable, total = self.trainable_parameters()
        percent = 100 * trainable / total
        line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}"
        print(line)
        return line

    def base_fingerprint(self) -> str:
        """Fingerprint of the base weights this model wraps (recorded before any merge)."""
        return adapter_io.recorded_fingerprint(self.model)


def base_fingerprint(model: nn.Module) -> str:
    """Stable hash of a base model's weights (a LoraModel: of the base it wraps; the recorded one
    if the model carries it, e.g. NF4 bases)."""
    inner = model.model if isinstance(model, LoraModel) else model
    return adapter_io.recorded_fingerprint(inner)


def get_lora_model(model: nn.Module, config: LoraConfig | None = None,
                   adapter_name: str = "default") -> LoraModel:
    """PEFT-style helper: `get_peft_model(model, config)` -> LoraModel with a fresh trainable adapter."""
    return LoraModel(model, config or LoraConfig(), adapter_name)


def _warn(message: str, stacklevel: int = 3) -> None:
    """Log and warn: the log reaches pipeline logs, the warning reaches an interactive user."""
    logger.warning(message)
    warnings.warn(message, UserWarning, stacklevel=stacklevel)
