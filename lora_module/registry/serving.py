"""Serving registered adapters: the multi-task registered model and the one command that serves.

    lora-pipeline register-multitask --tasks summary topic        # -> models:/lora-tasks@champion
    lora-pipeline serve-model models:/lora-tasks@champion --port 5001
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
      -d '{"dataframe_records": [{"task": "summary", "text": "#Person1#: ..."}],
           "params": {"max_new_tokens": 32}}'

`register-multitask` logs one pyfunc model per base (`LoraMultiTaskModel`) that names its tasks, not
their versions: each task's champion is resolved by alias when the model loads and re-resolved while
it serves (`multitask.MultiTaskPredictor`; `task=3` pins a version). Its base is recorded portably
(`bases`). `serve-model` runs `mlflow models serve --env-manager local` with this interpreter's
`bin` on PATH (MLflow execs `uvicorn` by name) and the tracking URI exported, so it works from a
fresh shell on any machine that reaches the tracking server.

Settings of a served model (model_config keys in-process; environment variables for `serve-model`):
`base` / `LORA_BASE_MODEL_PATH` (a base folder or Hub id instead of the recorded one),
`refresh_seconds` / `LORA_REFRESH_SECONDS` (alias re-resolution period, default 60; 0: every request;
negative: never), `max_input_chars` / `LORA_MAX_INPUT_CHARS` (longer texts get a 400, default 20000),
`force` (load onto a base with another fingerprint).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

from lora_module.errors import PipelineError
from lora_module.registry.bases import BASE_ENV, BaseRecord, ensure_base_logged, resolve_base
from lora_module.registry.gate import CHAMPION
from lora_module.registry.multitask import (
    DEFAULT_MAX_INPUT_CHARS,
    DEFAULT_REFRESH_SECONDS,
    MultiTaskPredictor,
    TaskRef,
)
from lora_module.registry.pyfunc import GENERATION_PARAMS, bad_request, copy_code_files, pip_requirements

MULTITASK_EXPERIMENT = "lora-multitask"
DEFAULT_MULTITASK_NAME = "lora-tasks"
TASKS_FILE = "tasks.json"
REFRESH_ENV, MAX_CHARS_ENV = "LORA_REFRESH_SECONDS", "LORA_MAX_INPUT_CHARS"


class MultiTaskRegistrationError(PipelineError, ValueError):
    """The tasks cannot share one registered model (a task without that version, different bases)."""


def multitask_signature() -> ModelSignature:
    """Input: string columns `task` and `text`; output: one string per row; decoding params + `refresh`."""
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "task"), ColSpec(DataType.string, "text")]),
        outputs=Schema([ColSpec(DataType.string)]),
        params=ParamSchema([*(ParamSpec(k, DataType.long, None) for k in GENERATION_PARAMS),
                            ParamSpec("refresh", DataType.boolean, False)]),
    )


_MODEL_CODE = """\
import mlflow

from lora_module.registry.serving import LoraMultiTaskModel

mlflow.models.set_model(LoraMultiTaskModel())
"""


def _setting(config: dict[str, Any], key: str, env: str, default: Any, kind: type) -> Any:
    value = config.get(key, os.environ.get(env))
    return default if value in (None, "") else kind(value)


class LoraMultiTaskModel(mlflow.pyfunc.PythonModel):
    """pyfunc model of many tasks on one base; inputs and settings: the module docstring."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = dict(context.model_config or {})
        spec = json.loads((Path(context.artifacts["multitask"]) / TASKS_FILE).read_text())
        refresh = _setting(config, "refresh_seconds", REFRESH_ENV, DEFAULT_REFRESH_SECONDS, float)
        self.predictor = MultiTaskPredictor.load(
            [TaskRef.from_dict(r) for r in spec["tasks"]],
            base=resolve_base(BaseRecord.read(context.artifacts.get("base")), config.get("base")),
            force=bool(config.get("force", False)), refresh_seconds=None if refresh < 0 else refresh,
            max_input_chars=_setting(config, "max_input_chars", MAX_CHARS_ENV, DEFAULT_MAX_INPUT_CHARS, int),
        )

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> list[str]:
        try:
            tasks, texts = rows_from_input(model_input)
            self.predictor.check_rows(tasks, texts)
        except (TypeError, ValueError) as e:
            raise bad_request(e) from e
        try:
            return self.predictor.predict(tasks, texts, params)
        except ValueError as e:  # bad params, a template the text cannot fill
            raise bad_request(e) from e


def rows_from_input(model_input: Any) -> tuple[list[Any], list[Any]]:
    """(tasks, texts) from a DataFrame / records / dict of columns with `task` and `text`."""
    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    missing = [c for c in ("task", "text") if c not in frame.columns]
    if missing:
        raise ValueError(f"input needs columns 'task' and 'text'; missing {missing} "
                         f"(got {list(frame.columns)})")
    return frame["task"].tolist(), frame["text"].tolist()


def _resolve_refs(client: Any, refs: list[TaskRef], tmp: Path) -> BaseRecord:
    """Check every task resolves and all share one base; the base's record (logged once if local)."""
    from lora_module import read_adapter_config
    from lora_module.registry.loading import download_adapter

    bases: dict[str, str] = {}
    record = None
    for ref in refs:
        try:
            reg = download_adapter(f"models:/{ref.model}", tmp / ref.task, ref.version, ref.alias)
        except LookupError as e:
            raise MultiTaskRegistrationError(f"task {ref.task!r}: {e}") from e
        config = read_adapter_config(reg.adapter_dir)
        bases[ref.task] = str(config.get("base_fingerprint"))
        record = record or BaseRecord.read(reg.base_dir) or ensure_base_logged(
            str(config.get("base_model_name_or_path")), bases[ref.task], client)
    if len(set(bases.values())) > 1:
        shown = {task: fp[:12] for task, fp in bases.items()}
        raise MultiTaskRegistrationError(f"the tasks' champions use different bases (fingerprints {shown}); "
                                         "one multi-task model serves one base: register one per base")
    return record


def register_multitask(tasks: Sequence[str], name: str = DEFAULT_MULTITASK_NAME, alias: str = CHAMPION,
                       tracking_uri: str | None = None) -> str:
    """Register a new version of `name` serving `tasks` (`task`, `task@alias`, `task=version`), give it
    `alias`; returns its `models:/name/version`."""
    from mlflow import MlflowClient
    from mlflow.models import Model

    from lora_module.registry.register import configure_tracking, ensure_experiment

    refs = [TaskRef.parse(t) for t in tasks]
    uri = configure_tracking(tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment_id = ensure_experiment(client, uri, MULTITASK_EXPERIMENT)
    with tempfile.TemporaryDirectory(prefix="lora-multitask-") as tmp_name:
        tmp = Path(tmp_name)
        record = _resolve_refs(client, refs, tmp / "adapters")
        (tmp / "multitask").mkdir()
        spec = {"tasks": [r.__dict__ for r in refs]}
        (tmp / "multitask" / TASKS_FILE).write_text(json.dumps(spec, indent=2))
        (tmp / "entry.py").write_text(_MODEL_CODE)
        code = copy_code_files(tmp / "code", ("lora_module.registry.serving",))
        run = client.create_run(experiment_id, run_name=f"{name}-" + "-".join(r.task for r in refs),
                                tags={"tasks": " ".join(r.describe() for r in refs)})
        logged = client.create_logged_model(experiment_id, name="multitask", source_run_id=run.info.run_id)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            info = Model.log(
                artifact_path=None, name="multitask", flavor=mlflow.pyfunc, run_id=run.info.run_id,
                model_id=logged.model_id, python_model=str(tmp / "entry.py"),
                artifacts={"multitask": str(tmp / "multitask"), "base": str(record.write(tmp / "base"))},
                code_paths=[str(code / "lora_module")], signature=multitask_signature(),
                pip_requirements=pip_requirements())
        client.set_terminated(run.info.run_id, "FINISHED")
    version = mlflow.register_model(info.model_uri, name).version
    client.set_registered_model_alias(name, alias, version)
    return f"models:/{name}/{version}"


def serve_command(model_uri: str, host: str, port: int, workers: int) -> list[str]:
    """The `mlflow models serve` line, run by this interpreter (so its environment's MLflow serves)."""
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
            "-h", host, "-p", str(port), "-w", str(workers)]


def serve_env(tracking_uri: str, base: str | None, refresh_seconds: float | None) -> dict[str, str]:
    """The environment of the server: this interpreter's bin first on PATH, the tracking URI, settings."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["MLFLOW_TRACKING_URI"] = env["MLFLOW_REGISTRY_URI"] = tracking_uri
    if base:
        env[BASE_ENV] = base
    if refresh_seconds is not None:
        env[REFRESH_ENV] = str(refresh_seconds)
    return env


def _check_model(uri: str, model_uri: str) -> None:
    """Fail in one line before starting a server for a model the registry does not have."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from lora_module.registry.loading import parse_model_ref

    if not model_uri.startswith("models:/"):
        return
    name, version, alias = parse_model_ref(model_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        if version is not None:
            client.get_model_version(name, version)
        else:
            client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        raise LookupError(f"{model_uri} is not in the registry at {uri}: {e.message}") from e


def cmd_serve(args: argparse.Namespace) -> int:
    from lora_module.registry.register import configure_tracking

    uri = configure_tracking(args.tracking_uri)
    _check_model(uri, args.model_uri)
    cmd = serve_command(args.model_uri, args.host, args.port, args.workers)
    print(f"serving {args.model_uri} (registry {uri}) on http://{args.host}:{args.port}/invocations",
          flush=True)
    os.execve(cmd[0], cmd, serve_env(uri, args.base, args.refresh_seconds))
    return 0  # not reached: execve replaces this process


def cmd_register(args: argparse.Namespace) -> int:
    print(register_multitask(args.tasks, args.name, args.alias, args.tracking_uri))
    return 0


TRACKING_HELP = "MLflow URI (default: $MLFLOW_TRACKING_URI, else the pipeline home's)"


def build_parser() -> argparse.ArgumentParser:
    """The `register-multitask` and `serve-model` commands."""
    p = argparse.ArgumentParser(prog="lora-pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("register-multitask", help="register one model serving several tasks on one base")
    s.add_argument("--tasks", nargs="+", required=True,
                   help="tasks: NAME (its @champion, followed while serving), NAME@ALIAS, "
                        "or NAME=VERSION (pinned)")
    s.add_argument("--name", default=DEFAULT_MULTITASK_NAME,
                   help="registered model name (default %(default)s)")
    s.add_argument("--alias", default=CHAMPION, help="alias given to the new version (default %(default)s)")
    s.add_argument("--tracking-uri", help=TRACKING_HELP)
    s.set_defaults(func=cmd_register)
    s = sub.add_parser("serve-model", help="serve a registered model over HTTP (mlflow models serve)")
    s.add_argument("model_uri", help="models:/NAME@ALIAS, models:/NAME/VERSION (one task or lora-tasks)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    s.add_argument("--port", type=int, default=5001, help="port (default %(default)s)")
    s.add_argument("--workers", type=int, default=1, help="server processes, each with its own model "
                   "(default %(default)s)")
    s.add_argument("--base", help=f"base folder or Hub id instead of the recorded one (sets {BASE_ENV}; "
                   "if not given: the recorded folder, else its logged copy, else the Hub id)")
    s.add_argument("--refresh-seconds", type=float, help=f"alias re-resolution period of a multi-task "
                   f"model (sets {REFRESH_ENV}; default {DEFAULT_REFRESH_SECONDS:g}; negative: never)")
    s.add_argument("--tracking-uri", help=TRACKING_HELP)
    s.set_defaults(func=cmd_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`lora-pipeline register-multitask|serve-model ...` (argv starts with the command)."""
    from mlflow.exceptions import MlflowException

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LookupError as e:
        raise MultiTaskRegistrationError(str(e)) from e
    except MlflowException as e:
        raise MultiTaskRegistrationError(e.message) from e
