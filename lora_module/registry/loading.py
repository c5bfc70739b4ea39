"""Load registered adapters back: one task's champion on its base, or several tasks on one base.

    from lora_module.registry import load_registered, MultiTaskModel
    model, tokenizer = load_registered("dialogsum")          # models:/dialogsum-lora@champion
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from lora_module.names import check_name
from lora_module.registry.bases import BaseRecord, resolve_base
from lora_module.registry.gate import CHAMPION, RetryPolicy
from lora_module.registry.register import _NOT_FOUND, configure_tracking, model_name_for


# ---- loading ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegisteredAdapter:
    """A registered version downloaded to disk."""

    name: str
    """Registered model name."""
    version: str
    """Version number (resolved from the alias if one was asked for)."""
    adapter_dir: Path
    """The downloaded PEFT-format adapter folder."""
    tokenizer_dir: Path | None
    """The tokenizer shipped with the version, if any."""
    tags: dict[str, str]
    """The version's tags (lineage, ROUGE figures, gate decision)."""
    prompt_dir: Path | None = None
    """The folder holding the prompt settings logged with the version, if any (pyfunc.PROMPT_FILE)."""
    base_dir: Path | None = None
    """The folder holding the version's base record, if any (`bases.BASE_FILE`)."""

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def parse_model_ref(ref: str, version: str | int | None = None, alias: str | None = CHAMPION
                    ) -> tuple[str, str | None, str | None]:
    """A task name or `models:/<name>[/<version>|@<alias>]` -> (name, version, alias); an explicit
    `version` wins over any alias."""
    if ref.startswith("models:/"):
        rest = ref.removeprefix("models:/")
        if "@" in rest:
            name, alias = rest.split("@", 1)
        elif "/" in rest:
            name, version = rest.rsplit("/", 1)
        else:
            name = rest
    else:
        name = model_name_for(ref)
    if version is not None:
        return name, str(version), None
    if not alias:
        raise ValueError(f"give a version or an alias for {ref!r}")
    return name, None, alias


def download_adapter(
    task_or_uri: str,
    dst: str | os.PathLike,
    version: str | int | None = None,
    alias: str | None = CHAMPION,
    tracking_uri: str | None = None,
    retries: int = 3,
    backoff: float = 1.0,
) -> RegisteredAdapter:
    """Download a registered version (by version number, else by alias) into `dst`."""
    uri = configure_tracking(tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    policy = RetryPolicy(retries=retries, backoff=backoff)
    name, version, alias = parse_model_ref(task_or_uri, version, alias)

    def lookup():
        if version is not None:
            return client.get_model_version(name, version)
        return client.get_model_version_by_alias(name, alias)

    try:
        mv = policy.call(lookup, f"look up {name} {'v' + version if version else '@' + str(alias)}", uri)
    except MlflowException as e:
        if e.error_code in _NOT_FOUND:
            what = f"version {version}" if version is not None else f"alias {alias!r}"
            raise LookupError(f"registered model {name!r} has no {what} at {uri}: {e.message}") from e
        raise
    local = Path(policy.call(
        lambda: mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(dst), tracking_uri=uri),
        f"download {name} v{mv.version}", uri))
    tokenizer, prompt, base = (local / "artifacts" / part for part in ("tokenizer", "prompt", "base"))
    return RegisteredAdapter(name, str(mv.version), local / "artifacts" / "adapter",
                             tokenizer if tokenizer.is_dir() else None, dict(mv.tags or {}),
                             prompt if prompt.is_dir() else None, base if base.is_dir() else None)


def load_registered(
    task_or_uri: str,
    version: str | int | None = None,
    alias: str | None = CHAMPION,
    base: Any = None,
    force: bool = False,
    tracking_uri: str | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    quantize: str | None = None,
) -> tuple[Any, Any]:
    """`(LoraModel, tokenizer)` of a registered adapter, ready to generate.

    `task_or_uri`: a task (`<task>-lora@champion` by default) or a `models:/` URI; `base`: a
    folder / Hub id / loaded model to use instead of the adapter's recorded base (`quantize="nf4"`
    loads it in 4 bit). A base with a different weights fingerprint raises
    FingerprintMismatchError unless `force`. `load_predictor` also gives the prompt settings.
    """
    predictor = _load(task_or_uri, version, alias, base, force, tracking_uri, retries, backoff, quantize)
    return predictor.model, predictor.tokenizer


def load_predictor(task_or_uri: str, **options: Any) -> Any:
    """A registered adapter with the prompt settings it was trained with (`pyfunc.AdapterPredictor`,
    whose `predict` applies them); `options`: the keyword arguments of `load_registered`."""
    return _load(task_or_uri, **options)


def _load(task_or_uri: str, version: str | int | None = None, alias: str | None = CHAMPION, base: Any = None,
          force: bool = False, tracking_uri: str | None = None, retries: int = 3, backoff: float = 1.0,
          quantize: str | None = None) -> Any:
    from lora_module.registry.pyfunc import AdapterPredictor, load_adapter_with_base, read_prompt_settings

    with tempfile.TemporaryDirectory(prefix="lora-registry-") as tmp:
        reg = download_adapter(task_or_uri, tmp, version, alias, tracking_uri, retries, backoff)
        if base is None:  # the recorded folder, else the logged copy, else the Hub id (`bases`)
            base = resolve_base(BaseRecord.read(reg.base_dir))
        model, tokenizer = load_adapter_with_base(reg.adapter_dir, base=base, force=force,
                                                  tokenizer_dir=reg.tokenizer_dir, quantize=quantize)
        return AdapterPredictor(model, tokenizer, read_prompt_settings(reg.prompt_dir))


class MultiTaskModel:
    """One base model in memory, one registered adapter per task, switched per `generate` call.

        mt = MultiTaskModel("path/to/base")
        mt.attach("summary"); mt.attach("topic", alias="challenger")
        mt.generate("summary", ["..."]); mt.generate("topic", ["..."]); mt.generate(None, ["..."])  # base

    Outputs equal those of each adapter loaded alone (`load_registered`): only the active
    adapter's LoRA branch runs. Calls are serialised by a lock (the active adapter is shared state).
    Rows of several tasks in one batch, prompt templates applied, champions followed while serving:
    `lora_module.registry.multitask.MultiTaskPredictor` (what the served multi-task model runs).
    """

    def __init__(self, base: Any, tokenizer_dir: str | os.PathLike | None = None,
                 tracking_uri: str | None = None, force: bool = False, retries: int = 3,
                 backoff: float = 1.0) -> None:
        import threading

        from transformers import AutoTokenizer

        from lora_module import LoraModel, load_base_model

        self.base_model = load_base_model(str(base)) if isinstance(base, str | os.PathLike) else base
        is_path = isinstance(base, str | os.PathLike)
        tok_src = tokenizer_dir or (base if is_path else self.base_model.name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(tok_src))
        self.model = LoraModel(self.base_model, None)
        self.tracking_uri, self.force, self.retries, self.backoff = tracking_uri, force, retries, backoff
        self.versions: dict[str, RegisteredAdapter] = {}
        self._tokenizers: dict[str, Any] = {}
        self._lock = threading.Lock()

    @staticmethod
    def adapter_name(task: str) -> str:
        return check_name("task name", task)

    @property
    def tasks(self) -> list[str]:
        return list(self.versions)

    def attach(self, task: str, alias: str | None = CHAMPION, version: str | int | None = None,
               model_uri: str | None = None) -> RegisteredAdapter:
        """Download the task's registered adapter and add it under the task's name."""
        from transformers import AutoTokenizer

        if task in self.versions:
            raise ValueError(f"task {task!r} is already attached ({self.versions[task].model_uri}); "
                             "detach it first")
        with tempfile.TemporaryDirectory(prefix="lora-registry-") as tmp:
            reg = download_adapter(model_uri or task, tmp, version, alias, self.tracking_uri, self.retries,
                                   self.backoff)
            with self._lock:
                self.model.load_adapter(reg.adapter_dir, self.adapter_name(task), force=self.force)
            if reg.tokenizer_dir is not None:
                self._tokenizers[task] = AutoTokenizer.from_pretrained(str(reg.tokenizer_dir))
        self.versions[task] = reg
        return reg

    def detach(self, task: str) -> None:
        with self._lock:
            self.model.delete_adapter(self.adapter_name(task))
        self.versions.pop(task)
        self._tokenizers.pop(task, None)

    def generate(self, task: str | None, texts: list[str], **generation: Any) -> list[str]:
        """Generate with `task`'s adapter (None: the bare base); `generation`: GenerationConfig fields."""
        from lora_module.evaluation.generation import GenerationConfig, generate

        config = GenerationConfig(**generation)
        with self._lock:
            if task is None:
                with self.model.disable_adapter():
                    return generate(self.model, self.tokenizer, texts, config)
            if task not in self.versions:
                raise KeyError(f"task {task!r} is not attached; attached tasks: {self.tasks}")
            self.model.set_adapter(self.adapter_name(task))
            return generate(self.model, self._tokenizers.get(task, self.tokenizer), texts, config)
