"""MLflow model registry: every trained adapter becomes a version of its task's registered model.

    from lora_module.registry import register_adapter, load_registered
    res = register_adapter("dialogsum", "runs/x/adapter", report_path="runs/x/eval/report.json",
                           train_dir="runs/x")
    res.version, res.alias, res.decision["reason"]
    model, tokenizer = load_registered("dialogsum")          # models:/dialogsum-lora@champion

Command line: `python -m lora_module.registry.cli --help` (list, show, register, promote,
demote, predict).

Tracking: the store of a `lora_module.home.PipelineHome` (`register_adapter(..., home=...)`, else
`PipelineHome.from_env()`): `$MLFLOW_TRACKING_URI` (for example an `http://` server) or the
embedded SQLite file `<home>/mlflow.db` with artifacts in `<home>/mlartifacts/<experiment>`.

One registration = one MLflow run in the task's experiment `lora-<task>`, beside its training
runs (params from the resolved training config, loss curves, ROUGE metrics and report files) +
the adapter logged as a pyfunc model
(`registry_pyfunc.LoraAdapterModel`) + a new version of `<task>-lora` carrying lineage tags and
the report's Markdown table as description. The promotion gate (`registry_gate.decide_promotion`)
then gives the version the `champion` or `challenger` alias. Every MLflow call is retried with
exponential backoff; when the registry stays down the error names its URI and nothing on disk is
touched, so the same call can be re-run later.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from lora_module.home import PipelineHome, artifact_location_for, ensure_store_folder, experiment_name_for
from lora_module.registry.gate import (
    CHAMPION,
    Decision,
    RegistryUnavailableError,
    RetryPolicy,
    decide_promotion,
)
from lora_module.registry.inputs import RegistrationInputs, read_inputs
from lora_module.registry.pyfunc import log_adapter_model


_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")
_DESCRIPTION_LIMIT = 5000  # the registry's description column is String(5000)


# ---- tracking -----------------------------------------------------------------------------------
def configure_tracking(uri: str | None = None) -> str:
    """Point MLflow's tracking and registry at `uri` (default: `PipelineHome.from_env()`'s); returns it."""
    uri = ensure_store_folder(uri or PipelineHome.from_env().tracking_uri)
    # Our RetryPolicy does the retrying; MLflow's own transport retries (7 by default, about four
    # minutes per call) would hide an outage inside one attempt. Explicit settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def model_name_for(task: str) -> str:
    """Registered model name of a task: `<task>-lora`."""
    return f"{task}-lora"


def ensure_experiment(
    client: MlflowClient, uri: str, name: str, artifact_location: str | None = None
) -> str:
    """The id of experiment `name`, created if missing; artifact root `artifact_location_for` unless given."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        location = artifact_location or artifact_location_for(uri, name)
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
        return client.get_experiment_by_name(name).experiment_id  # a concurrent registration won


def ensure_task_experiment(home: PipelineHome, task: str) -> str:
    """Create the MLflow store and the experiment of `task` up front (training, registration); its id.

    For callers that then start runs concurrently: two processes opening a fresh SQLite store at
    once both run its schema migrations (one fails), and two runs creating one experiment collide.
    """
    uri = configure_tracking(home.tracking_uri)
    name = home.experiment(task)
    return ensure_experiment(MlflowClient(tracking_uri=uri), uri, name, home.artifact_location(name))


def _ensure_registered_model(client: MlflowClient, name: str, task: str) -> None:
    try:
        client.create_registered_model(name, tags={"task": task},
                                       description=f"LoRA adapters for task {task!r}")
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


@contextlib.contextmanager
def _model_lock(name: str, lock_dir: Path) -> Iterator[None]:
    """Serialise the read-champion / decide / set-alias sequence of one registered model.

    MLflow has no compare-and-set on aliases, so two registrations deciding at once could both
    move `champion`. An flock on a file under the pipeline home covers threads and processes on
    this machine (each `open` is its own lock owner); registrations from several machines into one
    server are not serialised by it.
    """
    lock_dir.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^\w.-]", "_", name)
    with open(lock_dir / f"{safe}.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- registration -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegistrationResult:
    """What one `register_adapter` call created."""

    model_name: str
    """Registered model name (`<task>-lora` unless given)."""
    version: str
    """The new version number."""
    alias: str
    """Alias the version received: 'champion' or 'challenger'."""
    decision: dict[str, Any]
    """`Decision.to_dict()` of the promotion gate."""
    run_id: str
    """MLflow run holding params, metrics, report files and the logged model."""
    tracking_uri: str
    """Where it was registered."""

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}/{self.version}"


def champion_info(client: MlflowClient, name: str, metric: str) -> dict[str, Any] | None:
    """The current champion's metric, test-data fingerprint and version (None: no champion)."""
    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as e:
        if e.error_code in _NOT_FOUND:
            return None
        raise
    tags = mv.tags or {}
    return {
        metric: tags.get(f"rouge.{metric}"),
        "data_fingerprint": tags.get("eval_data_fingerprint"),
        "version": mv.version,
    }


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _log_params_and_files(client: MlflowClient, run_id: str, inp: RegistrationInputs, call) -> None:
    params = [Param(k, v) for k, v in inp.params.items()]
    for chunk in _chunks(params, 100):  # MLflow's per-request limit
        call(lambda c=chunk: client.log_batch(run_id, params=c), "log params")
    for artifact_path, files in (("evaluation", inp.report_files), ("training", inp.train_files)):
        for f in files:
            call(lambda f=f, p=artifact_path: client.log_artifact(run_id, str(f), p), f"upload {f.name}")


def _log_metrics(client: MlflowClient, run_id: str, inp: RegistrationInputs, call) -> None:
    # Logged after the model on purpose: log_model copies every metric history of the run onto
    # the logged model, one request per metric.
    metrics = [Metric(k, v, inp.timestamp_ms, step) for k, v, step in inp.metrics]
    for chunk in _chunks(metrics, 1000):
        call(lambda c=chunk: client.log_batch(run_id, metrics=c), "log metrics")


def _create_version(client: MlflowClient, name: str, run_id: str, model_id: str, tags: dict[str, str],
                    description: str) -> str:
    # Idempotent under retries: a request that reached the server before the connection broke
    # already created the version; a second one would leave a duplicate.
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if existing:
        return str(existing[0].version)
    mv = client.create_model_version(
        name, source=f"models:/{model_id}", run_id=run_id, tags=tags, description=description,
        model_id=model_id,
    )
    return str(mv.version)


def register_adapter(
    task: str,
    adapter_dir: str | os.PathLike,
    report_path: str | os.PathLike | None = None,
    train_dir: str | os.PathLike | None = None,
    data_fingerprint: str | None = None,
    model_name: str | None = None,
    metric: str = "rougeL",
    tracking_uri: str | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    candidate: str | None = None,
    max_backoff: float = 30.0,
    home: PipelineHome | None = None,
) -> RegistrationResult:
    """Log, register and gate one adapter; returns the new version and the gate's decision.

    `adapter_dir`: PEFT-format folder (or a training output holding `adapter/`); `report_path`:
    `report.json` of `build_report` (or its folder); `train_dir`: training output with
    `config.yaml` / `metrics.json`; `candidate`: the report's model name for this adapter (found
    by adapter checksum, else the only `lora` model). Without a report the version is registered
    but only ever a challenger. `home`: the pipeline home (its store unless `tracking_uri` is
    given, its lock folder); None: `PipelineHome.from_env()`. Raises RegistryUnavailableError
    after `retries` retries.
    """
    inp = read_inputs(task, adapter_dir, report_path, train_dir, data_fingerprint, metric,
                      tokenizer_dir=tokenizer_dir, candidate=candidate)
    name = model_name or model_name_for(task)
    home = home or PipelineHome.from_env()
    uri = configure_tracking(tracking_uri or home.tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    policy = RetryPolicy(retries=retries, backoff=backoff, max_backoff=max_backoff)

    def call(fn, what: str):
        return policy.call(fn, what, uri)

    try:
        return _register(client, uri, name, inp, metric, call, home.locks_dir)
    except RegistryUnavailableError as e:
        raise RegistryUnavailableError(
            f"{e}. Nothing on disk was changed: the adapter ({inp.adapter_dir}) and report "
            f"({inp.report_path or 'none'}) are kept; re-run the registration (register_adapter or "
            "`python -m lora_module.registry.cli register ...`) once the registry is reachable"
        ) from e


def _register(client: MlflowClient, uri: str, name: str, inp: RegistrationInputs, metric: str,
              call: Callable[..., Any], lock_dir: Path) -> RegistrationResult:
    task = inp.task
    experiment = experiment_name_for(task)
    experiment_id = call(lambda: ensure_experiment(client, uri, experiment),
                         f"create experiment {experiment}")
    inp.copy_training_curves(client, uri, call)
    run = call(lambda: client.create_run(experiment_id, run_name=f"register-{task}", tags=inp.run_tags),
               "create run")
    run_id = run.info.run_id
    try:
        _log_params_and_files(client, run_id, inp, call)
        logged = call(lambda: log_adapter_model(run_id, inp.adapter_dir, inp.tokenizer_dir),
                      "log adapter model")
        _log_metrics(client, run_id, inp, call)
        call(lambda: _ensure_registered_model(client, name, task), f"create registered model {name}")
        with _model_lock(name, lock_dir):
            champion = call(lambda: champion_info(client, name, metric), "read champion")
            decision = decide_promotion(inp.candidate_metrics, inp.base_metrics, champion, metric)
            tags = {**inp.version_tags, **decision.as_tags(), "run_id": run_id}
            version = call(
                lambda: _create_version(client, name, run_id, logged.model_id, tags, inp.description(
                    _DESCRIPTION_LIMIT)), f"create version of {name}")
            call(lambda: client.set_registered_model_alias(name, decision.alias, version),
                 f"set alias {decision.alias} on {name} v{version}")
        print(f"{name} v{version}: {decision.summary()}")
        call(lambda: client.set_tag(run_id, "registered_version", f"{name}/{version}"), "tag run")
        call(lambda: client.set_terminated(run_id, "FINISHED"), "finish run")
    except BaseException:
        with contextlib.suppress(Exception):  # best effort: the registry may be the thing that failed
            client.set_terminated(run_id, "FAILED")
        raise
    return RegistrationResult(name, version, decision.alias, decision.to_dict(), run_id, uri)
