"""MLflow model registry: every trained adapter becomes a version of its task's registered model.

    from lora_module.registry.register import register_adapter
    res = register_adapter("dialogsum", "runs/x/adapter", report_path="runs/x/eval/report.json",
                           train_dir="runs/x")
    res.version, res.alias, res.decision["reason"]
    register_adapter("dialogsum", "old/adapter", prepared_dir="data/dialogsum-3fa2c1d0e9b7")

Command line: `lora-pipeline list|show|register|promote|demote` (lora_module.registry.cli); loading
a registered version to generate with is `lora_module.serving`'s.

Tracking: the store of a `lora_module.home.PipelineHome` (`register_adapter(..., home=...)`, else
`PipelineHome.from_env()`): `$MLFLOW_TRACKING_URI` (for example an `http://` server) or the
embedded SQLite file `<home>/mlflow.db` with artifacts in `<home>/mlartifacts/<experiment>`
(set up by `registry.tracking`; retries by `registry.retry`; tag keys from `lora_module.contracts`).

The adapter must say which prompt template and lengths it was trained with (its sidecar's prompt
settings, written by the training export); one that does not is refused unless `prepared_dir=`
(`--prepared`) names the prepared data it was trained on, whose manifest's settings are then
written into the registered copy. Serving reads them from the registered adapter folder.

Only what can be served is registered: before any registry call the adapter, staged as the model
will hold it (folders named `adapter` and `tokenizer` whatever they were called), is loaded on the
base it names and generates one row (`servable.check_servable`: truncated or non-finite tensors,
layers without tensors, a base with another fingerprint, a failing generate -> one line, no run, no
version, no alias). An adapter of another task than the registered model's is refused unless
`allow_task_mismatch` (`--allow-task-mismatch`), recorded in the version's `task_mismatch` tag.
Tracking URIs in tags, lineage.json, descriptions and messages have their credentials masked.

One registration = one MLflow run in the task's experiment `lora-<task>`, beside its training
runs (params from the resolved training config, loss curves, ROUGE metrics and report files) +
the adapter logged as a pyfunc model
(`logged_model.log_adapter_model`) + a new version of `<task>-lora` carrying about a dozen tags
(`version_lineage.version_tags`: task, ROUGE, gate decision, training run, fingerprints; the rest in
the run's `lineage.json`) and as description a link to its training run and the report's Markdown
table. The training run gets a `registered_version` tag and a note linking back; a training run
logged to another tracking store than the registry's is reported with a warning. The aliases
are then recomputed from every version of the model (`aliases.converge_aliases`, under
`aliases.registration_lock`), so registrations from several machines leave the gate's
`champion`; the version's `gate.*` tags record its decision.

Faults: every MLflow call is retried with capped exponential backoff (about 75 s by default, more
than a server restart); when the registry stays down the error names its URI and nothing on disk
is touched. The run and the version carry the registration's identity (adapter checksum, training
run, model name) from creation, and the run is marked FINISHED last, so re-running the same call
completes a version whose run never finished instead of adding one (and, with `reuse_finished=True`,
as a resumed flow passes, returns a version whose run finished as it is); an attempt that died before
its version ends FAILED, and logged models whose upload broke off end FAILED, never PENDING.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus, Metric, Param
from mlflow.exceptions import MlflowException

from lora_module import contracts as c
from lora_module.contracts import CHAMPION, TAG_TASK_MISMATCH
from lora_module.home import PipelineHome, experiment_name_for
from lora_module.lineage import same_store
from lora_module.names import check_name
from lora_module.redact import redact_text, redact_uri
from lora_module.registry.aliases import converge_aliases, name_filter, read_state, registration_lock
from lora_module.registry.gate import (
    PENDING,
    Decision,
    choose_champion,
    decide_in_registry,
    decide_promotion,
)
from lora_module.registry.inputs import RegistrationInputError, RegistrationInputs, read_inputs
from lora_module.registry.logged_model import log_adapter_model
from lora_module.registry.retry import RegistryUnavailableError, RetryPolicy
from lora_module.registry.reuse import current_alias, finished_version, recorded_decision, unfinished_version
from lora_module.registry.servable import check_servable, check_task
from lora_module.registry.tracking import configure_tracking, ensure_experiment, model_name_for
from lora_module.registry.version_lineage import (
    gate_tags,
    lineage_header,
    lineage_record,
    link_runs,
    version_tags,
)

logger = logging.getLogger(__name__)

_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")
_DESCRIPTION_LIMIT = 5000  # the registry's description column is String(5000)


def _ensure_registered_model(client: MlflowClient, name: str, task: str) -> None:
    try:
        client.create_registered_model(name, tags={c.TAG_TASK: task},
                                       description=f"LoRA adapters for task {task!r}")
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


# ---- registration -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegistrationResult:
    """What one `register_adapter` call created (or completed)."""

    model_name: str
    """Registered model name (`<task>-lora` unless given)."""
    version: str
    """The version number."""
    alias: str
    """Alias the gate gave the version: 'champion' or 'challenger' (a newer version may take
    `challenger` later)."""
    decision: dict[str, Any]
    """`Decision.to_dict()` of the promotion gate."""
    run_id: str
    """MLflow run holding params, metrics, report files and the logged model."""
    tracking_uri: str
    """Where it was registered."""
    resumed: bool = False
    """True when this call completed a version an earlier, interrupted call had created."""
    reused: bool = False
    """True when this call returned a version an earlier call had finished registering
    (`reuse_finished`): nothing was created or changed; `alias` is the one it holds now ("none":
    a newer version took it) and `decision` the gate's tags of it (promote, reason)."""

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}/{self.version}"


def champion_info(client: MlflowClient, name: str, metric: str) -> dict[str, Any] | None:
    """The current champion's metric, test-data fingerprint, protocol and version (None: no champion)."""
    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as e:
        if e.error_code in _NOT_FOUND:
            return None
        raise
    tags = mv.tags or {}
    return {
        metric: tags.get(c.metric_key(metric)),
        "data_fingerprint": tags.get(c.TAG_EVAL_DATA_FINGERPRINT),
        "protocol_id": tags.get(c.TAG_EVAL_PROTOCOL_ID),
        "protocol": tags.get(c.TAG_EVAL_PROTOCOL),
        "version": mv.version,
    }


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _log_params_and_files(client: MlflowClient, run_id: str, inp: RegistrationInputs, call) -> None:
    params = [Param(k, v) for k, v in inp.params.items()]
    for chunk in _chunks(params, 100):  # MLflow's per-request limit
        call(lambda part=chunk: client.log_batch(run_id, params=part), "log params")
    for artifact_path, files in ((c.EVALUATION_ARTIFACT, inp.report_files),
                                 (c.TRAINING_ARTIFACT, inp.train_files)):
        for f in files:
            call(lambda f=f, p=artifact_path: client.log_artifact(run_id, str(f), p), f"upload {f.name}")


def _log_metrics(client: MlflowClient, run_id: str, inp: RegistrationInputs, call) -> None:
    # Logged after the model on purpose: log_model copies every metric history of the run onto
    # the logged model, one request per metric.
    metrics = [Metric(k, v, inp.timestamp_ms, step) for k, v, step in inp.metrics]
    for chunk in _chunks(metrics, 1000):
        call(lambda part=chunk: client.log_batch(run_id, metrics=part), "log metrics")


def _identity(inp: RegistrationInputs, name: str) -> dict[str, str]:
    """What makes two registration attempts the same registration: the adapter's checksum, its
    training run and the registered model. Tags of the run and of the version, set at creation."""
    return c.registration_identity(inp.version_tags[c.TAG_ADAPTER_SHA256],
                                   inp.run_tags.get(c.TAG_TRAINING_RUN_ID), name)


def _fail_pending_models(client: MlflowClient, experiment_id: str, run_id: str) -> None:
    """Mark the run's logged models still PENDING (an upload that broke off) as FAILED."""
    for model in client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'"):
        if model.status == LoggedModelStatus.PENDING:
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)


def _close_abandoned_runs(client: MlflowClient, experiment_id: str, identity: dict[str, str]) -> None:
    """Earlier attempts of this registration that died before creating a version: their runs end
    FAILED and their partial logged models FAILED (a new attempt starts over)."""
    runs = client.search_runs([experiment_id], " and ".join(
        [f"tags.{k} = '{v}'" for k, v in identity.items()] + ["attributes.status != 'FINISHED'"]))
    for run in runs:
        _fail_pending_models(client, experiment_id, run.info.run_id)
        if run.info.status != "FAILED":
            client.set_terminated(run.info.run_id, "FAILED")


def _log_model(client: MlflowClient, experiment_id: str, run_id: str, files: tuple[Path, Path | None]) -> str:
    """Log the adapter model (after failing a previous try's partial one) from `files` (adapter and
    tokenizer folders as `RegistrationInputs.files_to_log` staged them); returns its model id."""
    _fail_pending_models(client, experiment_id, run_id)
    adapter, tokenizer = files
    return log_adapter_model(run_id, adapter, tokenizer, experiment_id=experiment_id).model_id


def _model_task(client: MlflowClient, name: str) -> str | None:
    """The `task` tag of registered model `name` (None: no such model yet, or untagged)."""
    try:
        return (client.get_registered_model(name).tags or {}).get(c.TAG_TASK)
    except MlflowException as e:
        if e.error_code in _NOT_FOUND:
            return None
        raise


def _create_version(client: MlflowClient, name: str, run_id: str, model_id: str, tags: dict[str, str],
                    description: str) -> str:
    # Idempotent under retries: a request that reached the server before the connection broke
    # already created the version; a second one would leave a duplicate.
    existing = client.search_model_versions(f"{name_filter(name)} and run_id='{run_id}'")
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
    retries: int = RetryPolicy.retries,
    backoff: float = RetryPolicy.backoff,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    candidate: str | None = None,
    max_backoff: float = RetryPolicy.max_backoff,
    home: PipelineHome | None = None,
    prepared_dir: str | os.PathLike | None = None,
    allow_task_mismatch: bool = False,
    reuse_finished: bool = False,
) -> RegistrationResult:
    """Log, register and gate one adapter; returns its version and the gate's decision.

    `adapter_dir`: PEFT-format folder (or a training output holding `adapter/`); `report_path`:
    `report.json` of `build_report` (or its folder); `train_dir`: training output with
    `config.yaml` / `metrics.json`; `candidate`: the report's model name for this adapter (found
    by adapter checksum, else the only `lora` model). Without a report the version is registered
    but only ever a challenger. `home`: the pipeline home (its store unless `tracking_uri` is
    given, its lock folder); None: `PipelineHome.from_env()`. `prepared_dir`: the prepared data
    the adapter was trained on, for an adapter whose sidecar records no prompt settings (they are
    taken from its manifest; its `tokenizer/` ships unless `tokenizer_dir` is given).

    Before any registry call the adapter is loaded on its base and generates one row
    (`servable.check_servable`: ServabilityError, nothing registered); an adapter of another task
    than `model_name`'s is refused (TaskMismatchError) unless `allow_task_mismatch`, which the
    version then records. Re-running after a failure completes the version the failed call created
    (same adapter checksum and training run) instead of adding one. `reuse_finished`: when a version
    of this registration already finished (a resumed flow whose earlier process registered, then
    died), return it as it is (`reused`: no run, no version, no alias change); False (the default)
    registers such an adapter again as a new version. Each registry call is retried
    (by default for about 75 s, longer than a server restart); then RegistryUnavailableError.
    """
    # The names first, before any file is read or anything created: MLflow's registry filters are
    # quoted strings (no `o'brien`).
    check_name("task name", task, RegistrationInputError)
    name = check_name("registered model name", model_name or model_name_for(task), RegistrationInputError)
    inp = read_inputs(task, adapter_dir, report_path, train_dir, data_fingerprint, metric,
                      tokenizer_dir=tokenizer_dir, candidate=candidate, prepared_dir=prepared_dir)
    home = home or PipelineHome.from_env()
    policy = RetryPolicy(retries=retries, backoff=backoff, max_backoff=max_backoff)
    with inp.files_to_log() as files:
        check_servable(*files)  # what serving will load, before anything reaches the registry
        uri = configure_tracking(tracking_uri or home.tracking_uri)
        return _in_registry(uri, name, inp, metric, policy, home.locks_dir, files, allow_task_mismatch,
                            reuse_finished)


def _in_registry(uri: str, name: str, inp: RegistrationInputs, metric: str, policy: RetryPolicy,
                 lock_dir: Path, files: tuple[Path, Path | None], allow_mismatch: bool, reuse: bool
                 ) -> RegistrationResult:
    """Check the task, then return the finished registration (with `reuse`) or register; a registry
    that stays down raises RegistryUnavailableError saying what to do next."""
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def call(fn, what: str):
        return policy.call(fn, what, uri)

    _warn_other_store(inp, uri)
    try:
        _check_task(client, name, inp, call, allow_mismatch)
        done = _reuse(client, uri, name, inp, call) if reuse else None
        return done or _register(client, uri, name, inp, metric, call, lock_dir, files)
    except RegistryUnavailableError as e:
        raise _unavailable(e, inp) from e


def _check_task(client: MlflowClient, name: str, inp: RegistrationInputs, call: Callable[..., Any],
                allow: bool) -> None:
    """TaskMismatchError for an adapter of another task than model `name`'s, unless `allow`: then the
    mismatch goes into the version's tags."""
    model_task = call(lambda: _model_task(client, name), f"read registered model {name}")
    mismatch = check_task(inp.task, name, model_task, inp.adapter_task, allow)
    if mismatch is not None:
        inp.extra_version_tags[TAG_TASK_MISMATCH] = mismatch


def _unavailable(error: RegistryUnavailableError, inp: RegistrationInputs) -> RegistryUnavailableError:
    """The registry-down error with what to do next, its URI's credentials masked."""
    return RegistryUnavailableError(redact_text(
        f"{error}. Nothing on disk was changed: the adapter ({inp.adapter_dir}) and report "
        f"({inp.report_path or 'none'}) are kept; re-run the registration (register_adapter or "
        "`lora-pipeline register ...`) once the registry is reachable: it completes this attempt"))


def _warn_other_store(inp: RegistrationInputs, uri: str) -> None:
    """Say so when the training run lives in another tracking store than this registration's."""
    if inp.training_run is not None and not same_store(inp.training_run[0], uri):
        logger.warning(
            "training run %s was logged to tracking store %s, but this registration goes to %s: the "
            "version records the run id and that store (tag %s), but the MLflow UI "
            "cannot link them. Register into the training's store (--tracking-uri %s), or train with "
            "the same MLFLOW_TRACKING_URI", inp.training_run[1], redact_uri(inp.training_run[0]),
            redact_uri(uri), c.TAG_TRAINING_RUN_STORE, redact_uri(inp.training_run[0]))


def _reuse(client: MlflowClient, uri: str, name: str, inp: RegistrationInputs, call: Callable[..., Any]
           ) -> RegistrationResult | None:
    """The newest finished version of this registration as it stands (None: there is none)."""
    identity = _identity(inp, name)
    mv = call(lambda: finished_version(client, name, identity), "look for a finished registration")
    if mv is None:
        return None
    version = str(mv.version)
    alias = call(lambda: current_alias(client, name, version), f"read aliases of {name} v{version}")
    print(f"{name} v{version}: already registered by run {mv.run_id} (reused)")
    return RegistrationResult(name, version, alias, recorded_decision(mv.tags or {}), mv.run_id, uri,
                              reused=True)


def _register(client: MlflowClient, uri: str, name: str, inp: RegistrationInputs, metric: str,
              call: Callable[..., Any], lock_dir: Path, files: tuple[Path, Path | None]
              ) -> RegistrationResult:
    task = inp.task
    experiment = experiment_name_for(task)
    experiment_id = call(lambda: ensure_experiment(client, uri, experiment),
                         f"create experiment {experiment}")
    call(lambda: _ensure_registered_model(client, name, task), f"create registered model {name}")
    identity = _identity(inp, name)
    found = call(lambda: unfinished_version(client, name, identity), "look for an unfinished attempt")
    if found is None:
        call(lambda: _close_abandoned_runs(client, experiment_id, identity), "close abandoned attempts")
        inp.copy_training_curves(client, uri, call)
        run = call(lambda: client.create_run(experiment_id, run_name=c.registration_run_name(task),
                                             tags={**inp.run_tags, **identity}), "create run")
        run_id, version = run.info.run_id, None
    else:
        run_id, version = found.run_id, str(found.version)
        print(f"{name} v{version}: completing the interrupted registration of run {run_id}")
    try:
        if version is None:
            _log_params_and_files(client, run_id, inp, call)
            model_id = call(lambda: _log_model(client, experiment_id, run_id, files), "log adapter model")
            _log_metrics(client, run_id, inp, call)
            tags = {**version_tags(inp, metric, uri), **inp.extra_version_tags,
                    **_pending_gate_tags(client, name, inp, metric, call)}
            header = lineage_header(client, uri, inp, call)
            description = header + inp.description(_DESCRIPTION_LIMIT - len(header))
            version = call(lambda: _create_version(client, name, run_id, model_id, tags, description),
                           f"create version of {name}")
        else:
            tags = dict(found.tags or {})
            call(lambda: client.update_run(run_id, status="RUNNING"), "reopen run")
            call(lambda: _fail_pending_models(client, experiment_id, run_id), "close partial models")
        decision = _complete(client, uri, name, version, run_id, inp, metric, call, lock_dir, tags)
    except BaseException:
        with contextlib.suppress(Exception):  # best effort: the registry may be the thing that failed
            _fail_pending_models(client, experiment_id, run_id)
            client.set_terminated(run_id, "FAILED")
        raise
    return RegistrationResult(name, version, decision.alias, decision.to_dict(), run_id, uri,
                              resumed=found is not None)


def _pending_gate_tags(client: MlflowClient, name: str, inp: RegistrationInputs, metric: str,
                      call: Callable[..., Any]) -> dict[str, str]:
    """The gate's tags as the registry stands before the version exists, with `gate.decision`
    "pending" until `_complete` confirms them (usually by rewriting that one tag alone)."""
    champion = choose_champion(read_state(client, name, metric, call)[0])
    decision = decide_promotion(inp.candidate_metrics, inp.base_metrics,
                                champion and champion.as_champion(metric), metric)
    return {**gate_tags(decision), c.TAG_GATE_DECISION: PENDING}


def _complete(client: MlflowClient, uri: str, name: str, version: str, run_id: str, inp: RegistrationInputs,
              metric: str, call: Callable[..., Any], lock_dir: Path, tags: dict[str, str]) -> Decision:
    """Aliases from the registry's full state, then the gate's tags that differ from `tags` (the
    version's), then the run FINISHED (last: a run not FINISHED marks a registration to complete)."""
    with registration_lock(name, lock_dir):
        scores = converge_aliases(client, name, metric, call)
    decision = decide_in_registry(scores, version, inp.candidate_metrics, inp.base_metrics, metric)
    for key, value in gate_tags(decision).items():
        if tags.get(key) != value:
            call(lambda k=key, v=value: client.set_model_version_tag(name, version, k, v), f"tag v{version}")
    print(f"{name} v{version}: {decision.summary()}")
    record = lineage_record(inp, name, version, run_id, uri, decision)
    call(lambda: client.log_dict(run_id, record, c.LINEAGE_FILE), f"upload {c.LINEAGE_FILE}")
    call(lambda: client.set_tag(run_id, c.TAG_REGISTERED_VERSION, c.registered_version(name, version)),
         "tag run")
    link_runs(client, uri, inp, name, version, run_id, call)
    call(lambda: client.set_terminated(run_id, "FINISHED"), "finish run")
    return decision
