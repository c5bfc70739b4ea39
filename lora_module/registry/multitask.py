"""Register one model that serves several tasks' adapters on one base (mixed-task batches).

    lora-pipeline register-multitask --tasks summary topic        # -> models:/lora-tasks@champion
    lora-pipeline serve-model models:/lora-tasks@champion --port 5001

The logged pyfunc model (`serving.multitask.LoraMultiTaskModel`) names its tasks, not their
versions: each task's champion is resolved by alias when the model loads and re-resolved while it
serves (`task=3` pins a version, `task@alias` follows another alias). Every task must resolve, in
the registry at `--tracking-uri`, and all must share one base, recorded portably (`bases`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc

from lora_module import contracts
from lora_module.contracts import CHAMPION
from lora_module.errors import ArgumentParser, PipelineError
from lora_module.redact import redact_text
from lora_module.registry.bases import BaseRecord, ensure_base_logged
from lora_module.registry.retry import RegistryUnavailableError
from lora_module.registry.servable import one_line
from lora_module.registry.store import NotRegisteredError, download_adapter
from lora_module.registry.tracking import configure_tracking, ensure_experiment
from lora_module.serving.multitask import TaskRef, multitask_signature
from lora_module.serving.pyfunc import (
    MULTI_TASK_CODE,
    MULTI_TASK_ENTRY,
    copy_code,
    entry_code,
    pip_requirements,
)

MULTITASK_EXPERIMENT = "lora-multitask"
DEFAULT_MULTITASK_NAME = "lora-tasks"


class MultiTaskRegistrationError(PipelineError, ValueError):
    """The tasks cannot share one registered model (a task without that version, different bases), or
    the registry failed while registering it."""


def _resolve_refs(client: Any, uri: str, refs: list[TaskRef], tmp: Path) -> BaseRecord:
    """Check every task resolves in the registry at `uri` and all share one base; the base's record
    (logged once if local)."""
    from lora_module.adapter_io import read_adapter_config

    bases: dict[str, str] = {}
    record = None
    for ref in refs:
        try:
            reg = download_adapter(f"models:/{ref.model}", tmp / ref.task, ref.version, ref.alias, uri)
        except NotRegisteredError as e:
            raise MultiTaskRegistrationError(redact_text(f"task {ref.task!r}: {e}")) from e
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

    refs = [TaskRef.parse(t) for t in tasks]
    uri = configure_tracking(tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with tempfile.TemporaryDirectory(prefix="lora-multitask-") as tmp_name:
        tmp = Path(tmp_name)
        record = _resolve_refs(client, uri, refs, tmp / "adapters")  # before anything is written
        spec_dir = tmp / contracts.MULTITASK_ARTIFACT
        spec_dir.mkdir()
        spec = {"tasks": [r.__dict__ for r in refs]}
        (spec_dir / contracts.TASKS_FILE).write_text(json.dumps(spec, indent=2))
        (tmp / "entry.py").write_text(entry_code(MULTI_TASK_ENTRY))
        experiment_id = ensure_experiment(client, uri, MULTITASK_EXPERIMENT)
        run = client.create_run(experiment_id, run_name=f"{name}-" + "-".join(r.task for r in refs),
                                tags={contracts.TAG_TASKS: " ".join(r.describe() for r in refs)})
        logged = client.create_logged_model(experiment_id, name=contracts.MULTITASK_ARTIFACT,
                                            source_run_id=run.info.run_id)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            info = Model.log(
                artifact_path=None, name=contracts.MULTITASK_ARTIFACT, flavor=mlflow.pyfunc,
                run_id=run.info.run_id, model_id=logged.model_id, python_model=str(tmp / "entry.py"),
                artifacts={contracts.MULTITASK_ARTIFACT: str(spec_dir),
                           contracts.BASE_ARTIFACT: str(record.write(tmp / contracts.BASE_ARTIFACT))},
                code_paths=[str(copy_code(tmp / "code", MULTI_TASK_CODE))], signature=multitask_signature(),
                pip_requirements=pip_requirements())
        client.set_terminated(run.info.run_id, "FINISHED")
    version = mlflow.register_model(info.model_uri, name).version
    client.set_registered_model_alias(name, alias, version)
    return f"models:/{name}/{version}"


def build_parser() -> ArgumentParser:
    """The `register-multitask` command."""
    p = ArgumentParser(prog="lora-pipeline register-multitask", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", required=True,
                   help="tasks: NAME (its @champion, followed while serving), NAME@ALIAS, "
                        "or NAME=VERSION (pinned)")
    p.add_argument("--name", default=DEFAULT_MULTITASK_NAME,
                   help="registered model name (default %(default)s)")
    p.add_argument("--alias", default=CHAMPION, help="alias given to the new version (default %(default)s)")
    p.add_argument("--tracking-uri", help="MLflow tracking/registry URI (if not given: $MLFLOW_TRACKING_URI, "
                   "else the SQLite store under the pipeline home)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`lora-pipeline register-multitask --tasks ...`."""
    from mlflow.exceptions import MlflowException

    args = build_parser().parse_args(argv)
    try:
        print(redact_text(register_multitask(args.tasks, args.name, args.alias, args.tracking_uri)))
    except MlflowException as e:  # an unreachable registry's message names its URI: masked, one line
        raise MultiTaskRegistrationError(
            redact_text(f"registering {args.name!r}: the MLflow registry failed: {one_line(e)}")) from e
    except RegistryUnavailableError as e:
        raise RegistryUnavailableError(redact_text(str(e))) from e
    return 0
