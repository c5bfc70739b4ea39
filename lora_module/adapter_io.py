"""Adapter files in PEFT's format, atomic validated loading, and the base-model fingerprint.

An adapter folder holds `adapter_config.json` (PEFT's keys only, so PEFT loads it without
"Unexpected keyword arguments" warnings), `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight` [r, in] / `.lora_B.weight` [out, r], and our sidecar
`lora_pipeline.json`, which PEFT never reads (a DoRA adapter adds `<module path>.lora_magnitude_vector`
[out], PEFT's key without `.weight`): `base_fingerprint`, the `lora_pipeline` metadata
block and `prompt`, the prompt settings the adapter was trained with (template, input column,
lengths, model type), which make the folder self-describing:

    write_prompt_settings(adapter_dir, PromptSettings.from_manifest(manifest))   # at export
    read_prompt_settings(adapter_dir)        # PromptSettings, or None when none was recorded

`read_adapter_config` returns the PEFT config with the sidecar's `base_fingerprint` and
`lora_pipeline` merged in; those keys are read from the sidecar only.

Loading is split in two: `plan_adapter_load` reads and checks everything (files, tensors, module
paths, shapes, fingerprint) without touching the model; only then does LoraModel install the
weights. An old `adapter_model.bin` is read with `torch.load(weights_only=True)`, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lora_module import selection
from lora_module.config import LoraConfig, mutates_base
from lora_module.contracts import ADAPTER_CONFIG_FILE, ADAPTER_SIDECAR_FILE, ADAPTER_WEIGHTS_FILE
from lora_module.errors import AdapterLoadError, FingerprintMismatchError, LoraConfigError
from lora_module.files import write_with
from lora_module.prompt import PromptSettings

LEGACY_WEIGHTS_FILE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
MAGNITUDE_KEY = "lora_magnitude_vector"  # DoRA's per-row magnitude: `<KEY_PREFIX><module path>.<this>`
FINGERPRINT_ATTR = "lora_base_fingerprint"  # set on a model whose weights no longer show its base (NF4)
QUANTIZATION_ATTR = "lora_quantization"
FORMAT_VERSION = 1
_SAMPLE = 1024  # values sampled per tensor for the fingerprint
_MERGED_KEYS = ("base_fingerprint", "lora_pipeline")  # sidecar keys read_adapter_config merges in
_PROMPT_KEY = "prompt"
_WRAPPER_PARTS = ("base_layer", "original_module")  # names a wrapped base module gets: hashed as unwrapped


# ---- fingerprint -------------------------------------------------------------------------------
def _logical_weight(name: str, p: torch.Tensor, owner: nn.Module) -> torch.Tensor:
    if getattr(p, "quant_state", None) is not None:
        from lora_module.layers import dequantize_weight

        return dequantize_weight(owner)
    return p.detach()


def compute_fingerprint(model: nn.Module) -> str:
    """Hash of the base weights: names, shapes and a strided sample of values rounded to bfloat16.

    LoRA tensors are skipped and `.base_layer` is dropped from names, so a wrapped model hashes like
    the plain one; the bfloat16 rounding makes fp32 and bf16 copies of one base agree. A 4-bit layer
    hashes its dequantized values (these differ from the fp32 originals: `load_base_model` therefore
    records the fingerprint before quantizing). Meta tensors contribute names and shapes only.
    """
    owners = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            owners[f"{module_name}.{param_name}" if module_name else param_name] = module
    entries = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if any(part.startswith("lora_") for part in parts) or "modules_to_save" in parts:
            continue  # adapter tensors, and the modules_to_save copies (their originals are hashed)
        clean = ".".join(part for part in parts if part not in _WRAPPER_PARTS)
        entries[clean] = lambda name=name, p=p: _logical_weight(name, p, owners[name])
    return hash_weights(entries)


def hash_weights(entries: dict[str, Callable[[], torch.Tensor]]) -> str:
    """The fingerprint of named base weights, each read only when hashed (so a caller can stream them
    from a checkpoint, one tensor in memory at a time): compute_fingerprint's hash of a model whose
    unwrapped, deduplicated parameter names are the keys."""
    digest = hashlib.sha256(f"lora-base-fingerprint-v{FORMAT_VERSION}".encode())
    for clean in sorted(entries):
        value = entries[clean]()
        digest.update(f"{clean}:{tuple(value.shape)};".encode())
        if value.device.type == "meta":
            continue
        flat = value.reshape(-1)
        sample = flat[:: max(1, flat.numel() // _SAMPLE)][:_SAMPLE]
        digest.update(sample.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def recorded_fingerprint(model: nn.Module) -> str:
    """Fingerprint of a plain (unwrapped) transformers model: the recorded one if it carries it
    (NF4 bases, a base whose adapter was merged), else computed from its weights."""
    recorded = getattr(model, FINGERPRINT_ATTR, None)
    return recorded if recorded is not None else compute_fingerprint(model)


# ---- save -------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: Path, config: LoraConfig, tensors: dict[str, torch.Tensor], *,
                 fingerprint: str, adapter_name: str, base_model_name_or_path: str | None = None,
                 metadata: dict | None = None) -> Path:
    """Write one adapter folder; returns its path. `model` is the plain transformers model (for task type)."""
    if not tensors:
        raise LoraConfigError(f"adapter {adapter_name!r} has no LoRA layers to save")
    extra = {"format_version": FORMAT_VERSION, "adapter_name": adapter_name, **(metadata or {})}
    model_config = getattr(model, "config", None)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model_config, "_name_or_path", None) or None
    payload = {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM" if getattr(model_config, "is_encoder_decoder", False) else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": config.target_modules,
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": config.init_lora_weights,
        "modules_to_save": config.modules_to_save,
        "layers_to_transform": config.layers_to_transform,
        "layers_pattern": config.layers_pattern,
        "exclude_modules": config.exclude_modules,
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
    }
    try:
        text = json.dumps(payload, indent=2, sort_keys=True)
        sidecar = json.dumps({"base_fingerprint": fingerprint, "lora_pipeline": extra}, indent=2,
                             sort_keys=True)
    except TypeError as e:
        raise TypeError(f"metadata must be JSON-serialisable, got {metadata!r}: {e}") from e
    path.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # Each file through a temporary name: a crash never leaves a half-written file under the real name.
    write_with(path / ADAPTER_WEIGHTS_FILE, lambda tmp: save_file(cpu, str(tmp), metadata={"format": "pt"}))
    write_with(path / ADAPTER_SIDECAR_FILE, lambda tmp: tmp.write_text(sidecar + "\n"))
    # The config last: its presence says the folder is complete.
    write_with(path / ADAPTER_CONFIG_FILE, lambda tmp: tmp.write_text(text + "\n"))
    return path


# ---- load ---------------------------------------------------------------------------------------
def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """adapter_config.json of an adapter folder (or the file itself), with the `base_fingerprint` and
    `lora_pipeline` keys of its `lora_pipeline.json` sidecar merged in when there is one (the same
    keys inside adapter_config.json are not ours to read: they are dropped)."""
    path = Path(path)
    file = path / ADAPTER_CONFIG_FILE if path.is_dir() else path
    if not path.exists():
        raise AdapterLoadError(f"adapter folder {path} does not exist")
    if not file.is_file():
        present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        raise AdapterLoadError(
            f"adapter folder {path} is missing {ADAPTER_CONFIG_FILE} (found: {present}); an adapter folder "
            f"holds {ADAPTER_CONFIG_FILE} and {ADAPTER_WEIGHTS_FILE}"
        )
    raw = {k: v for k, v in _read_json_object(file).items() if k not in _MERGED_KEYS}
    sidecar = _read_sidecar(file.parent / ADAPTER_SIDECAR_FILE)
    return {**raw, **{k: sidecar[k] for k in _MERGED_KEYS if k in sidecar}}


def _read_json_object(file: Path, fix: str = "") -> dict[str, Any]:
    """The JSON object in `file`, or AdapterLoadError naming the file (and `fix`, what to do about it)."""
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterLoadError(f"cannot read {file}: not valid JSON ({e}){fix}") from e
    if not isinstance(raw, dict):
        raise AdapterLoadError(f"{file} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _read_sidecar(file: Path) -> dict[str, Any]:
    """The sidecar file's JSON object ({} when there is none)."""
    if not file.is_file():
        return {}
    return _read_json_object(file, "; save the adapter again")


def read_prompt_settings(adapter_dir: str | Path) -> PromptSettings | None:
    """The prompt settings recorded in the adapter folder's sidecar; None when it records none."""
    file = Path(adapter_dir) / ADAPTER_SIDECAR_FILE
    prompt = _read_sidecar(file).get(_PROMPT_KEY)
    if prompt is None:
        return None
    if not isinstance(prompt, dict):
        raise AdapterLoadError(f"{file}: '{_PROMPT_KEY}' must be a JSON object, got {type(prompt).__name__}")
    try:
        return PromptSettings.from_dict(prompt)
    except (TypeError, ValueError) as e:
        raise AdapterLoadError(f"{file}: '{_PROMPT_KEY}' is not valid prompt settings: {e}") from e


def write_prompt_settings(adapter_dir: str | Path, settings: PromptSettings) -> Path:
    """Record `settings` in the sidecar of a saved adapter folder (replacing any recorded); returns it."""
    file = Path(adapter_dir) / ADAPTER_SIDECAR_FILE
    if not (Path(adapter_dir) / ADAPTER_CONFIG_FILE).is_file():
        raise AdapterLoadError(f"{adapter_dir} is not a saved adapter folder (no {ADAPTER_CONFIG_FILE})")
    sidecar = {**_read_sidecar(file), _PROMPT_KEY: settings.to_dict()}
    text = json.dumps(sidecar, indent=2, sort_keys=True)
    write_with(file, lambda tmp: tmp.write_text(text + "\n"))
    return file


def read_adapter_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Tensors of an adapter folder: safetensors if present, else a legacy .bin via weights_only loading."""
    path = Path(path)
    safetensors_file, legacy_file = path / ADAPTER_WEIGHTS_FILE, path / LEGACY_WEIGHTS_FILE
    if safetensors_file.is_file():
        try:
            tensors = load_file(str(safetensors_file))
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterLoadError(
                f"cannot read {safetensors_file}: the file is truncated or corrupt ({e}); "
                "save the adapter again"
            ) from e
        return tensors, safetensors_file
    if legacy_file.is_file():
        try:
            tensors = torch.load(legacy_file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise AdapterLoadError(
                f"refused to load {legacy_file}: it holds objects other than tensors, and adapters are only "
                f"loaded with torch.load(weights_only=True) ({e})"
            ) from e
        except (RuntimeError, EOFError, OSError) as e:
            raise AdapterLoadError(
                f"cannot read {legacy_file}: the file is truncated or corrupt ({e})"
            ) from e
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise AdapterLoadError(f"{legacy_file} must hold a dict of tensors, got {type(tensors).__name__}")
        return tensors, legacy_file
    present = sorted(p.name for p in path.iterdir())
    raise AdapterLoadError(
        f"adapter folder {path} is missing its weights: expected {ADAPTER_WEIGHTS_FILE} (or a legacy "
        f"{LEGACY_WEIGHTS_FILE}), found {present}"
    )


@dataclass
class AdapterPlan:
    """A fully validated adapter, ready to install: module path -> (lora_A [r, in], lora_B [out, r])."""

    path: Path
    config: LoraConfig
    raw_config: dict[str, Any]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    weights_file: Path
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)
    """DoRA: module path -> magnitude vector [out] (empty for plain LoRA)."""
    saved_modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """modules_to_save: module path -> the state dict of its full copy."""


def _check_unconverted(init: Any, config_file: Path) -> None:
    """Refuse an adapter whose init changed PEFT's base weights and that was saved unconverted."""
    if not mutates_base(init):
        return
    if str(init).lower() == "loftq":
        raise AdapterLoadError(
            f"{config_file}: init_lora_weights='loftq': PEFT replaced the base weights by their LoftQ-"
            "quantized residual, so this adapter fits only that modified base; load it with PEFT on the "
            "LoftQ base it was saved with (or merge_and_unload there and use the merged model)"
        )
    raise AdapterLoadError(
        f"{config_file}: init_lora_weights={init!r}: PEFT changed the base weights when it initialised this "
        "adapter, so it does not fit the unmodified base; convert it with PEFT, then load OUT: "
        "peft_model.save_pretrained(OUT, path_initial_model_for_weight_conversion=INIT_DIR) "
        "(INIT_DIR: the adapter saved right after initialisation)"
    )


def _split_saved_modules(model: nn.Module, names: Any, tensors: dict[str, torch.Tensor], file: Path
                         ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(the other tensors, module path -> state dict of its modules_to_save copy), after checking
    that each selected module's copy is in the file whole, with this model's shapes."""
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        return tensors, {}  # none, or a value LoraConfig refuses with its own message
    try:
        paths = selection.modules_to_save_paths(model, names)
        expected = {p: selection.expected_copy_keys(model, p) for p in paths}
    except LoraConfigError as e:
        raise AdapterLoadError(f"{file.parent / ADAPTER_CONFIG_FILE}: {e}") from e
    saved: dict[str, dict[str, torch.Tensor]] = {p: {} for p in expected}
    rest = {}
    for key, value in tensors.items():
        owner = next((p for p in expected if key.startswith(f"{KEY_PREFIX}{p}.")), None)
        if owner is None:
            rest[key] = value
        else:
            saved[owner][key[len(KEY_PREFIX) + len(owner) + 1:]] = value
    for module_path, shapes in expected.items():
        got = {k: tuple(v.shape) for k, v in saved[module_path].items()}
        if got != shapes:
            wrong = sorted(k for k in got.keys() & shapes.keys() if got[k] != shapes[k])
            raise AdapterLoadError(
                f"{file}: the modules_to_save copy of {module_path!r} does not fit this model: missing "
                f"{sorted(shapes.keys() - got.keys())}, unexpected {sorted(got.keys() - shapes.keys())}, "
                f"other shape {wrong}"
            )
    return rest, saved


def _group_by_module(tensors: dict[str, torch.Tensor], file: Path) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise AdapterLoadError(
                f"{file}: key {key!r} lacks the {KEY_PREFIX!r} prefix; expected keys like "
                f"'{KEY_PREFIX}<module path>.lora_A.weight' "
                "(PEFT would load such a file and silently ignore it)"
            )
        body = key[len(KEY_PREFIX):]
        if body.endswith(f".{MAGNITUDE_KEY}"):
            grouped.setdefault(body[: -len(MAGNITUDE_KEY) - 1], {})[MAGNITUDE_KEY] = value
            continue
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if body.endswith(suffix):
                grouped.setdefault(body[: -len(suffix)], {})[part] = value
                break
        else:
            raise AdapterLoadError(
                f"{file}: unsupported tensor {key!r}; only '<module>.lora_A.weight', "
                f"'<module>.lora_B.weight', DoRA's '<module>.{MAGNITUDE_KEY}' and the config's "
                "modules_to_save are supported (no LoRA biases or embeddings)"
            )
    return grouped


def _match_modules(model: nn.Module, grouped: dict[str, dict[str, torch.Tensor]], config: LoraConfig,
                   path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path -> (lora_A, lora_B), after checking every module exists, is linear and fits the shapes."""
    from lora_module.layers import LoraLinear

    modules = dict(model.named_modules())
    problems, weights = [], {}
    for module_path, parts in sorted(grouped.items()):
        module = modules.get(module_path)
        if module is None:
            problems.append(f"module {module_path!r} does not exist in this {type(model).__name__}")
            continue
        if not isinstance(module, nn.Linear | LoraLinear):
            problems.append(f"module {module_path!r} is a {type(module).__name__}, not a linear layer")
            continue
        missing = {"lora_A", "lora_B"} - parts.keys()
        if missing:
            problems.append(f"module {module_path!r} has no {' / '.join(sorted(missing))} tensor")
            continue
        r = config.for_module(module_path).r  # rank_pattern may give this module its own r
        expected = {"lora_A": (r, module.in_features), "lora_B": (module.out_features, r)}
        if config.use_dora:
            expected[MAGNITUDE_KEY] = (module.out_features,)
        if (MAGNITUDE_KEY in parts) != config.use_dora:
            has = "has" if MAGNITUDE_KEY in parts else "lacks"
            problems.append(f"module {module_path!r}: use_dora is {config.use_dora} in the config but the "
                            f"file {has} its {MAGNITUDE_KEY} tensor")
            continue
        for part, shape in expected.items():
            got = tuple(parts[part].shape)
            if got != shape:
                problems.append(
                    f"shape mismatch for module {module_path!r}: {part} is {got} in the file but this model "
                    f"needs {shape} (r={r}, in_features={module.in_features}, "
                    f"out_features={module.out_features})"
                )
            elif not parts[part].is_floating_point():
                problems.append(
                    f"module {module_path!r}: {part} has dtype {parts[part].dtype}, expected a float"
                )
        weights[module_path] = (parts["lora_A"], parts["lora_B"])
    if problems:
        shown = "\n  ".join(problems[:8])
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise AdapterLoadError(
            f"adapter {path} does not fit this model ({len(problems)} problem(s); was it trained for another "
            f"architecture?):\n  {shown}{more}"
        )
    return weights


def _check_finite(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Refuse NaN/inf weights: a diverged run saves them, and loaded they make every output empty."""
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise AdapterLoadError(
            f"{file}: {len(bad)} of {len(tensors)} tensors hold NaN or inf values (first: {bad[0]}); the "
            "training run that wrote it diverged: use an earlier checkpoint or retrain (lower learning_rate)"
        )


def plan_adapter_load(model: nn.Module, path: str | Path, *, force: bool = False) -> AdapterPlan:
    """Read and check an adapter folder against `model` (the transformers model, LoRA layers injected
    or not; not a LoraModel); changes nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AdapterLoadError(
            f"adapter path {path} is a file; pass the folder holding {ADAPTER_CONFIG_FILE} and "
            f"{ADAPTER_WEIGHTS_FILE}"
        )
    raw = read_adapter_config(path)
    config_file = path / ADAPTER_CONFIG_FILE
    _check_unconverted(raw.get("init_lora_weights", True), config_file)
    tensors, weights_file = read_adapter_weights(path)
    if not tensors:
        raise AdapterLoadError(f"{weights_file} holds no tensors")
    _check_finite(tensors, weights_file)
    tensors, saved_modules = _split_saved_modules(model, raw.get("modules_to_save"), tensors, weights_file)
    grouped = _group_by_module(tensors, weights_file)
    if not raw.get("target_modules"):  # very old PEFT configs: recover the names from the keys
        raw = {**raw, "target_modules": sorted({p.rsplit(".", 1)[-1] for p in grouped})}
    try:
        config = LoraConfig.from_dict(raw, strict=False)
    except LoraConfigError as e:
        raise AdapterLoadError(f"{config_file}: {e}") from e

    weights = _match_modules(model, grouped, config, path)
    magnitudes = {p: parts[MAGNITUDE_KEY] for p, parts in grouped.items() if MAGNITUDE_KEY in parts}

    saved = raw.get("base_fingerprint")
    if saved is not None and not force:
        current = recorded_fingerprint(model)
        if saved != current:
            raise FingerprintMismatchError(
                f"adapter {path} was trained on a base with fingerprint {saved}, but this base model has "
                f"fingerprint {current} (different weights); load the matching base, or pass force=True"
            )
    return AdapterPlan(path=path, config=config, raw_config=raw, weights=weights, weights_file=weights_file,
                       magnitudes=magnitudes, saved_modules=saved_modules)
