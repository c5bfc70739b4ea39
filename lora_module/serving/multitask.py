"""Many tasks' registered adapters on one base, rows of different tasks in ONE batch.

    from lora_module.serving.multitask import MultiTaskPredictor, TaskRef
    mt = MultiTaskPredictor.load([TaskRef.parse("summary"), TaskRef.parse("topic=3")])
    mt.predict(["summary", "topic", "summary"], ["#Person1#: ...", "...", "..."])

Each task's adapter is loaded under its own name onto one LoraModel; `predict` applies each task's
prompt template and length limits (recorded in its adapter's sidecar), then
generates all rows together with per-row adapters (`LoraModel.generate(adapter_names=...)`, the
same arithmetic as PEFT's mixed batches; `predictor.generate_rows`). A row is a text or a
conversation (`messages`, rendered with the task's prompt format). Decoding is greedy unless
`num_beams` or `temperature` is given; rows of one batch generate up to the longest row's
`max_new_tokens` and each row is cut to its own (for greedy decoding that is exactly what generating
it alone gives). Requests are held to `limits` (`predictor.ServingLimits`).

New champions without a restart: a task named by alias (`summary` = `summary-lora@champion`) is
re-resolved at most every `refresh_seconds` (default 60; 0: on every request; None: never) and on
a request with `refresh=True`; a new version is downloaded and hot-loaded (adapters are small),
and the old one dropped. A version that fails to load (registry away, another base) is logged and
the previous one keeps serving. A pinned task (`summary=3`) never changes.

`LoraMultiTaskModel` is the pyfunc model `lora-pipeline register-multitask` logs (inputs and
settings: `serving.pyfunc`'s docstring).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

from lora_module import contracts
from lora_module.contracts import CHAMPION
from lora_module.errors import PipelineError
from lora_module.names import check_name
from lora_module.prompt import PromptSettings
from lora_module.registry.bases import BaseRecord, resolve_base
from lora_module.registry.store import download_adapter
from lora_module.registry.tracking import configure_tracking, model_name_for
from lora_module.serving.predictor import (
    Output,
    PredictInputError,
    Row,
    RowJob,
    ServingLimits,
    check_row,
    generate_rows,
    inference_base,
    parse_params,
    prompt_settings,
    render_rows,
    row_chars,
)
from lora_module.serving.pyfunc import bad_request, frame_rows, param_specs, row_columns, served_base

logger = logging.getLogger(__name__)

REFRESH_ENV = "LORA_REFRESH_SECONDS"
DEFAULT_REFRESH_SECONDS = 60.0


class TaskSpecError(PipelineError, ValueError):
    """A task spec that is not `task`, `task@alias` or `task=version`, or repeated tasks."""


@dataclass(frozen=True)
class TaskRef:
    """Which registered version serves a task."""

    task: str
    """The task name rows carry in their `task` column."""
    model: str
    """Registered model name (default `<task>-lora`)."""
    alias: str | None = CHAMPION
    """Alias resolved at load and on refresh; None when `version` pins one."""
    version: str | None = None
    """A pinned version number, never refreshed."""

    @classmethod
    def parse(cls, spec: str) -> TaskRef:
        """`task` (its champion), `task@alias` or `task=version`."""
        if "=" in spec:
            task, version = spec.split("=", 1)
            if not version.isdigit():
                raise TaskSpecError(f"task spec {spec!r}: the version after '=' must be a number")
            return cls(check_name("task name", task), model_name_for(task), None, version)
        task, _, alias = spec.partition("@")
        return cls(check_name("task name", task), model_name_for(task), alias or CHAMPION)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskRef:
        return cls(**d)

    def describe(self) -> str:
        return f"models:/{self.model}" + (f"/{self.version}" if self.version else f"@{self.alias}")


@dataclass
class TaskState:
    """A loaded task: its adapter's name on the shared model, the version, prompt settings, tokenizer."""

    adapter: str
    version: str
    prompt: PromptSettings
    tokenizer: Any


class MultiTaskPredictor:
    """One base model, one adapter per task, mixed-task batches (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, refs: list[TaskRef], force: bool = False,
                 refresh_seconds: float | None = DEFAULT_REFRESH_SECONDS,
                 limits: ServingLimits | None = None, tracking_uri: str | None = None) -> None:
        tasks = [r.task for r in refs]
        if not tasks or len(set(tasks)) != len(tasks):
            raise TaskSpecError(f"give one or more distinct tasks, got {tasks}")
        self.model, self.tokenizer, self.force = model, tokenizer, force
        self.refs = {r.task: r for r in refs}
        self.refresh_seconds, self.limits = refresh_seconds, limits or ServingLimits()
        self.tracking_uri = tracking_uri
        self.states: dict[str, TaskState] = {}
        self._lock = threading.RLock()  # the model's adapter set is shared state: load xor generate
        self._next_check = 0.0
        self.is_seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))

    @classmethod
    def load(cls, refs: list[TaskRef], base: str | None = None, **options: Any) -> MultiTaskPredictor:
        """Resolve every task, load the base once (`base`, else as `bases.resolve_base` says for the
        first task's adapter) and every adapter onto it; `options`: the constructor's keywords."""
        from lora_module import LoraModel

        base = base or resolve_base(None) or base_of(refs[0], options.get("tracking_uri"))
        base_model, device = inference_base(base)  # CUDA with bf16 where available, as saved on CPU
        model = LoraModel(base_model, None).eval()
        model.to(device)
        predictor = cls(model, _tokenizer(base), refs, **options)
        for ref in refs:
            predictor.attach(ref.task, ref.version)
        predictor._next_check = time.monotonic() + (predictor.refresh_seconds or 0)
        return predictor

    @property
    def versions(self) -> dict[str, str]:
        """Task -> the version serving it now."""
        return {task: state.version for task, state in self.states.items()}

    def attach(self, task: str, version: str | None = None) -> TaskState:
        """Download `task`'s version (default: its ref's) and load it, replacing the one serving now."""
        from transformers import AutoTokenizer

        ref = self.refs[task]
        with tempfile.TemporaryDirectory(prefix="lora-multitask-") as tmp:
            reg = download_adapter(f"models:/{ref.model}", tmp, version or ref.version, ref.alias,
                                   self.tracking_uri)
            tokenizer = AutoTokenizer.from_pretrained(str(reg.tokenizer_dir)) if reg.tokenizer_dir else None
            state = TaskState(f"{task}-v{reg.version}", reg.version, prompt_settings(reg.adapter_dir),
                              tokenizer or self.tokenizer)
            with self._lock:
                old = self.states.get(task)
                if old is not None and old.version == state.version:
                    return old
                self.model.load_adapter(reg.adapter_dir, state.adapter, force=self.force)
                self.states[task] = state
                if old is not None:
                    self.model.delete_adapter(old.adapter)
        logger.info("task %s: serving %s version %s", task, ref.model, state.version)
        return state

    def refresh(self, now: bool = False) -> dict[str, str]:
        """Re-resolve the aliases when due (or `now`) and hot-load changed versions; {task: new version}."""
        from mlflow import MlflowClient

        if not now and (self.refresh_seconds is None or time.monotonic() < self._next_check):
            return {}
        self._next_check = time.monotonic() + (self.refresh_seconds or 0)
        uri = configure_tracking(self.tracking_uri)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        changed = {}
        for task, ref in self.refs.items():
            if ref.version is not None:
                continue
            try:
                version = str(client.get_model_version_by_alias(ref.model, ref.alias).version)
                if version != self.states[task].version:
                    changed[task] = self.attach(task, version).version
            except Exception as e:  # noqa: BLE001 - keep serving the loaded version; retried when next due
                logger.warning("task %s: could not refresh %s (%s: %s); still serving version %s", task,
                               ref.describe(), type(e).__name__, e, self.states[task].version)
        return changed

    @property
    def max_input_chars(self) -> int:
        """Characters of one row's input at most (`limits.max_input_chars`)."""
        return self.limits.max_input_chars

    @max_input_chars.setter
    def max_input_chars(self, value: int) -> None:
        self.limits = replace(self.limits, max_input_chars=value)

    def check_rows(self, tasks: list[Any], rows: list[Any]) -> list[Row]:
        """The rows as texts and checked conversations; PredictInputError naming the first bad row
        (unknown task, neither text nor messages, too long) or a request with too many rows."""
        if len(tasks) != len(rows):
            raise PredictInputError(f"{len(tasks)} tasks for {len(rows)} texts: give one task per text")
        checked = []
        for i, (task, row) in enumerate(zip(tasks, rows, strict=True)):
            if task not in self.refs:
                raise PredictInputError(f"row {i}: unknown task {task!r}; tasks served: {sorted(self.refs)}")
            if not isinstance(row, str) and not isinstance(row, list | tuple):
                raise PredictInputError(f"row {i}: text must be a string, got {type(row).__name__}")
            checked.append(check_row(row, f"row {i}"))
        self.limits.check_rows([row_chars(row) for row in checked])
        return checked

    def predict(self, tasks: list[str], rows: list[Row], params: dict[str, Any] | None = None) -> list[str]:
        """One output per row (a text or a conversation), in order; `params`: predict params
        (`predictor.PREDICT_PARAMS`) and refresh."""
        return [o.text for o in self.generate(tasks, rows, params)]

    def generate(self, tasks: list[str], rows: list[Row], params: dict[str, Any] | None = None,
                 on_tokens: list[Callable[[list[int]], None] | None] | None = None) -> list[Output]:
        """`predict`, with each row's finish reason and token counts; `on_tokens`: per row, what is
        called each step with the row's generated ids (`RowJob.on_tokens`: streaming)."""
        deadline = self.limits.deadline()
        params = {k: v for k, v in (params or {}).items() if v is not None}
        refresh = bool(params.pop("refresh", False))
        rows = self.check_rows(tasks, rows)
        gen, sampling = parse_params(params)
        self.refresh(now=refresh)
        with self._lock:
            per_task = {t: gen.with_settings(self.states[t].prompt) for t in set(tasks)}
            self.limits.check_decoding([per_task[t].max_new_tokens for t in tasks], gen.num_beams)
            calls = on_tokens or [None] * len(rows)
            jobs = [self._job(task, row, per_task[task], call)
                    for task, row, call in zip(tasks, rows, calls, strict=True)]
            return generate_rows(self.model, jobs, gen.batch_size, self.is_seq2seq, sampling, deadline)

    def _job(self, task: str, row: Row, gen: Any, on_tokens: Callable[[list[int]], None] | None) -> RowJob:
        from lora_module.evaluation.generation import encode_prompts

        state = self.states[task]
        prompt = render_rows(replace(state.prompt, max_source_length=gen.max_source_length), [row],
                             state.tokenizer)[0]
        ids = encode_prompts(state.tokenizer, [prompt], gen.max_source_length, self.is_seq2seq,
                             add_special_tokens=gen.add_special_tokens)[0]
        return RowJob(state.adapter, ids, gen.max_new_tokens, gen.num_beams, state.tokenizer, on_tokens)


def base_of(ref: TaskRef, tracking_uri: str | None) -> str:
    """The base a task's adapter was trained on, resolved for this machine (`bases.resolve_base`)."""
    from lora_module import read_adapter_config

    with tempfile.TemporaryDirectory(prefix="lora-multitask-") as tmp:
        reg = download_adapter(f"models:/{ref.model}", tmp, ref.version, ref.alias, tracking_uri)
        config = read_adapter_config(reg.adapter_dir)
        record = BaseRecord.read(reg.base_dir)
        if record is None:
            record = BaseRecord(str(config.get("base_model_name_or_path")),
                                str(config.get("base_fingerprint")))
        return str(resolve_base(record))


def _tokenizer(base: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base))


def multitask_signature() -> ModelSignature:
    """Input: a string column `task` and a row's input (`pyfunc.row_columns`: `text` or `messages`);
    output: one string per row; the predict params + `refresh`."""
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "task"), *row_columns()]),
        outputs=Schema([ColSpec(DataType.string)]),
        params=ParamSchema([*param_specs(), ParamSpec("refresh", DataType.boolean, False)]),
    )


def rows_from_input(model_input: Any) -> tuple[list[Any], list[Any]]:
    """(tasks, rows) from a DataFrame / records / dict of columns with `task` and `text` or `messages`."""
    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    missing = [c for c in ("task", "text") if c not in frame.columns]
    if missing and (missing != ["text"] or "messages" not in frame.columns):
        raise PredictInputError(f"input needs columns 'task' and 'text' (or 'messages'); missing {missing} "
                                f"(got {list(frame.columns)})")
    return frame["task"].tolist(), frame_rows(frame)


def _setting(config: dict[str, Any], key: str, env: str, default: Any, kind: type) -> Any:
    value = config.get(key, os.environ.get(env))
    return default if value in (None, "") else kind(value)


class LoraMultiTaskModel(mlflow.pyfunc.PythonModel):
    """pyfunc model of many tasks on one base; inputs and settings: the module docstring."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = dict(context.model_config or {})
        spec = json.loads((Path(context.artifacts[contracts.MULTITASK_ARTIFACT]) / contracts.TASKS_FILE)
                          .read_text())
        refresh = _setting(config, "refresh_seconds", REFRESH_ENV, DEFAULT_REFRESH_SECONDS, float)
        self.predictor = MultiTaskPredictor.load(
            [TaskRef.from_dict(r) for r in spec["tasks"]], base=served_base(context, config),
            force=bool(config.get("force", False)), refresh_seconds=None if refresh < 0 else refresh,
            limits=ServingLimits.from_config(config),
        )

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> list[str]:
        from lora_module.prompt import PromptError

        try:
            tasks, texts = rows_from_input(model_input)
            return self.predictor.predict(tasks, texts, params)
        except (PredictInputError, PromptError) as e:  # bad rows or params, a template too long
            raise bad_request(e) from e
