"""Registration registers only what can be served: the adapter is opened, loaded and run first.

    from lora_module.registry.servable import check_servable, check_task
    check_servable(adapter_dir, tokenizer_dir)        # ServabilityError (one line) if it cannot serve
    check_task("topic", "summary-lora", "summary", adapter_task=None, allow=False)  # TaskMismatchError

`check_servable` takes the folders exactly as they will be logged (`RegistrationInputs.files_to_log`),
loads them as evaluation does (`evaluation.generation.load_model_with_info`, unmerged) and generates
through serving's predict path (`serving.predictor.AdapterPredictor`): the base the
adapter names is loaded, the adapter's tensors are read (a truncated file, NaN/inf values, shapes
that do not fit and a base with another weights fingerprint are refused by `lora_module.adapter_io`),
every module its config targets must have its tensors, and one row is generated with a few new
tokens under the adapter's own prompt settings. `register_adapter` calls it before any registry
call, so a failure creates no run, no version and moves no alias.

`check_task` refuses to add an adapter of one task to another task's registered model (the model's
`task` tag, the adapter sidecar's `task`) unless explicitly allowed; an allowed mismatch is recorded
on the version (`TAG_TASK_MISMATCH`).
"""

from __future__ import annotations

from pathlib import Path

from lora_module.errors import PipelineError

SMOKE_TEXT = "A short check that the adapter loads and generates before it is registered."
"""The one row the load-and-generate check generates from (the adapter's template is applied)."""
SMOKE_NEW_TOKENS = 4


class ServabilityError(PipelineError, ValueError):
    """An adapter that would fail to load or generate where it is served (nothing was registered)."""


class TaskMismatchError(PipelineError, ValueError):
    """An adapter registered under a model of another task without explicit permission."""


def one_line(error: BaseException) -> str:
    """An error's message on one line (some loaders list their problems on several)."""
    return " ".join(str(error).split()) or type(error).__name__


def check_servable(adapter_dir: Path, tokenizer_dir: Path | None = None) -> str:
    """Load `adapter_dir` on the base it names, check every targeted module has its tensors, generate
    one row; returns the generated text. ServabilityError, naming the folder, on any failure."""
    from lora_module import FingerprintMismatchError, read_adapter_config
    from lora_module.evaluation.generation import GenerationConfig, ModelSpec, load_model_with_info
    from lora_module.serving.predictor import AdapterPredictor, prompt_settings

    spec = ModelSpec(name="registration-check", kind="lora", path=str(adapter_dir))
    try:
        # Evaluation's loader: the adapter's recorded base, the tokenizer serving would pick, and a lock
        # (transformers' loading is not thread-safe; registrations may run in threads).
        loaded = load_model_with_info(spec, GenerationConfig(merge_adapter=False), tokenizer_dir)
        predictor = AdapterPredictor(loaded.model, loaded.tokenizer, prompt_settings(adapter_dir))
    except FingerprintMismatchError as e:
        config = read_adapter_config(adapter_dir)
        raise ServabilityError(
            f"adapter {adapter_dir} records base fingerprint {str(config.get('base_fingerprint'))[:12]}, but "
            f"the base it names ({config.get('base_model_name_or_path')}) has other weights, so it was not "
            "registered: set base_model_name_or_path in adapter_config.json to the base it was trained on"
        ) from e
    except Exception as e:  # whatever stops serving from loading it stops the registration
        raise ServabilityError(
            f"adapter {adapter_dir} cannot be served, so it was not registered: {one_line(e)}") from e
    _check_complete(predictor.model, adapter_dir)
    try:
        texts = predictor.predict([SMOKE_TEXT], {"max_new_tokens": SMOKE_NEW_TOKENS})
    except Exception as e:
        raise ServabilityError(
            f"adapter {adapter_dir} loads but fails to generate, so it was not registered: {one_line(e)}"
        ) from e
    if len(texts) != 1 or not isinstance(texts[0], str):
        raise ServabilityError(f"adapter {adapter_dir} generated {texts!r} for one row; expected one text")
    return texts[0]


def _check_complete(lora_model: object, adapter_dir: Path) -> None:
    """Every linear layer the adapter's config targets in this base has its lora_A / lora_B tensors
    (a file missing some loads without a word, and those layers then do nothing)."""
    from lora_module import read_adapter_config
    from lora_module.config import LoraConfig
    from lora_module.layers import LoraLinear
    from lora_module.selection import resolve_targets

    raw = read_adapter_config(adapter_dir)
    if not raw.get("target_modules"):
        return  # very old PEFT configs: the targets are whatever the file holds
    base = lora_model.model
    _, paths = resolve_targets(base, LoraConfig.from_dict(raw, strict=False))
    modules = dict(base.named_modules())
    missing = [p for p in paths if not isinstance(modules.get(p), LoraLinear)]
    if missing:
        raise ServabilityError(
            f"adapter {adapter_dir} is incomplete: {len(missing)} of the {len(paths)} layers its config "
            f"targets ({raw['target_modules']}) have no lora_A/lora_B tensors (first: {missing[0]}); "
            "save the adapter again from its training run")


def check_task(task: str, model_name: str, model_task: str | None, adapter_task: str | None,
               allow: bool) -> str | None:
    """None when `task` is the task of the registered model (its tag; None: a new or untagged model)
    and of the adapter (its sidecar; None: not recorded). A mismatch raises TaskMismatchError unless
    `allow`; then its description, to be recorded on the version."""
    found = []
    if model_task and model_task != task:
        found.append(f"registered model {model_name!r} is task {model_task!r}")
    if adapter_task and adapter_task != task:
        found.append(f"the adapter's sidecar says task {adapter_task!r}")
    if not found:
        return None
    what = "; ".join(found)
    if not allow:
        raise TaskMismatchError(
            f"registering task {task!r}: {what}; register it under its own task's model (--model-name), or "
            "pass --allow-task-mismatch (allow_task_mismatch=True) to register it there anyway (recorded)")
    return f"registered as task {task!r} although {what}"
