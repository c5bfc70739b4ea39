"""MLflow model registry: every trained adapter becomes a version of its task's registered model.

    from lora_module.registry import register_adapter, load_registered
    res = register_adapter("dialogsum", "runs/x/adapter", report_path="runs/x/eval/report.json",
                           train_dir="runs/x")
    res.version, res.alias, res.decision["reason"]
    model, tokenizer = load_registered("dialogsum")          # models:/dialogsum-lora@champion

Command line: `python -m lora_module.registry_cli --help` (list, show, register, promote,
demote, predict).

Tracking: `$MLFLOW_TRACKING_URI` (for example an `http://` server) or, by default, the embedded
SQLite file `<home>/mlflow.db` with artifacts in `<home>/mlartifacts`, where home is
`$LORA_PIPELINE_HOME` or `./.lora_pipeline` (the same default as the training CLI).

One registration = one MLflow run in experiment `lora-<task>` (params from the resolved training
config, loss curves, ROUGE metrics and report files) + the adapter logged as a pyfunc model
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

from lora_module.home import pipeline_home, tracking_uri
from lora_module.registry_gate import (
    CHAMPION,
    Decision,
    RegistryUnavailableError,
    RetryPolicy,
    decide_promotion,
)
from lora_module.registry_inputs import RegistrationInputs, read_inputs
from lora_module.registry_pyfunc import log_adapter_model

__all__ = [
    "CHAMPION", "Decision", "MultiTaskModel", "RegisteredAdapter", "RegistrationResult",
    "RegistryUnavailableError", "RetryPolicy", "champion_info", "configure_tracking", "decide_promotion",
    "download_adapter", "ensure_experiment", "experiment_name_for", "load_registered", "model_name_for",
    "parse_model_ref",
    "pipeline_home", "register_adapter", "tracking_uri",
]

_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")
_DESCRIPTION_LIMIT = 5000  # the registry's description column is String(5000)


# ---- tracking -----------------------------------------------------------------------------------
def configure_tracking(uri: str | None = None) -> str:
    """Point MLflow's tracking and registry at `uri` (default: `tracking_uri()`); returns it."""
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # Our RetryPolicy does the retrying; MLflow's own transport retries (7 by default, about four
    # minutes per call) would hide an outage inside one attempt. Explicit settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def artifact_location_for(uri: str, experiment: str) -> str | None:
    """Artifact root for a new experiment: `mlartifacts/<experiment>` beside a SQLite file; None
    (the server's own default, e.g. its proxied `--artifacts-destination`) for servers."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / experiment).as_uri()
    return None


def model_name_for(task: str) -> str:
    """Registered model name of a task: `<task>-lora`."""
    return f"{task}-lora"


def experiment_name_for(task: str) -> str:
    return f"lora-{task}"


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


def _ensure_registered_model(client: MlflowClient, name: str, task: str) -> None:
    try:
        client.create_registered_model(name, tags={"task": task},
                                       description=f"LoRA adapters for task {task!r}")
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


@contextlib.contextmanager
def _model_lock(name: str) -> Iterator[None]:
    """Serialise the read-champion / decide / set-alias sequence of one registered model.

    MLflow has no compare-and-set on aliases, so two registrations deciding at once could both
    move `champion`. An flock on a file under the pipeline home covers threads and processes on
    this machine (each `open` is its own lock owner); registrations from several machines into one
    server are not serialised by it.
    """
    lock_dir = pipeline_home() / "locks"
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
) -> RegistrationResult:
    """Log, register and gate one adapter; returns the new version and the gate's decision.

    `adapter_dir`: PEFT-format folder (or a training output holding `adapter/`); `report_path`:
    `report.json` of `build_report` (or its folder); `train_dir`: training output with
    `config.yaml` / `metrics.json`; `candidate`: the report's model name for this adapter (found
    by adapter checksum, else the only `lora` model). Without a report the version is registered
    but only ever a challenger. Raises RegistryUnavailableError after `retries` retries.
    """
    inp = read_inputs(task, adapter_dir, report_path, train_dir, data_fingerprint, metric,
                      tokenizer_dir=tokenizer_dir, candidate=candidate)
    name = model_name or model_name_for(task)
    uri = configure_tracking(tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    policy = RetryPolicy(retries=retries, backoff=backoff, max_backoff=max_backoff)

    def call(fn, what: str):
        return policy.call(fn, what, uri)

    try:
        return _register(client, uri, name, inp, metric, call)
    except RegistryUnavailableError as e:
        raise RegistryUnavailableError(
            f"{e}. Nothing on disk was changed: the adapter ({inp.adapter_dir}) and report "
            f"({inp.report_path or 'none'}) are kept; re-run the registration (register_adapter or "
            "`python -m lora_module.registry_cli register ...`) once the registry is reachable"
        ) from e


def _register(client: MlflowClient, uri: str, name: str, inp: RegistrationInputs, metric: str,
              call: Callable[..., Any]) -> RegistrationResult:
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
        with _model_lock(name):
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
    tokenizer = local / "artifacts" / "tokenizer"
    return RegisteredAdapter(name, str(mv.version), local / "artifacts" / "adapter",
                             tokenizer if tokenizer.is_dir() else None, dict(mv.tags or {}))


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
    FingerprintMismatchError unless `force`.
    """
    from lora_module.registry_pyfunc import load_adapter_with_base

    with tempfile.TemporaryDirectory(prefix="lora-registry-") as tmp:
        reg = download_adapter(task_or_uri, tmp, version, alias, tracking_uri, retries, backoff)
        return load_adapter_with_base(reg.adapter_dir, base=base, force=force,
                                      tokenizer_dir=reg.tokenizer_dir, quantize=quantize)


class MultiTaskModel:
    """One base model in memory, one registered adapter per task, switched per `generate` call.

        mt = MultiTaskModel("path/to/base")
        mt.attach("summary"); mt.attach("topic", alias="challenger")
        mt.generate("summary", ["..."]); mt.generate("topic", ["..."]); mt.generate(None, ["..."])  # base

    Outputs equal those of each adapter loaded alone (`load_registered`): only the active
    adapter's LoRA branch runs. Calls are serialised by a lock (the active adapter is shared state).
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
        return re.sub(r"[^A-Za-z0-9_-]", "_", task)

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
        from lora_module.generation import GenerationConfig, generate

        config = GenerationConfig(**generation)
        with self._lock:
            if task is None:
                with self.model.disable_adapter():
                    return generate(self.model, self.tokenizer, texts, config)
            if task not in self.versions:
                raise KeyError(f"task {task!r} is not attached; attached tasks: {self.tasks}")
            self.model.set_adapter(self.adapter_name(task))
            return generate(self.model, self._tokenizers.get(task, self.tokenizer), texts, config)
