"""Fan-out of the many-task flow: each task's pipeline as a run of a deployment on a work pool.

    lora-pipeline run --task summary --task topic --deployment lora-pool-task/lora-pool-task
    many_tasks(["summary", "topic"], deployment="lora-pool-task/lora-pool-task", crash_reruns=1)

`many_tasks` with a `deployment` hands each task to `run_deployment` instead of a thread: the
deployment (`lora-pool-task` in prefect.yaml, the flow in flows/pool_task.py) runs `task_pipeline` on
whichever worker of its pool is free, so workers on separate machines take separate tasks. They
share only the MLflow server (and the object store behind it); each worker's pipeline home
(LORA_PIPELINE_HOME) is its local cache, and the base model is built where the task runs.
The task's result comes back as a table artifact of the run (results are not stored where another
machine could read them).

A run that ends CRASHED (its worker died: the automation in deploy/automations.yaml marks a run
whose heartbeats stopped) is submitted again, up to `crash_reruns` times, and a live worker takes
it. A run that FAILED is that task's failure, as in the threaded flow (its registry retries
already happened inside it).
"""

from __future__ import annotations

import json
from typing import Any

from prefect import get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner

from lora_module.redact import redact_text
from lora_pipeline.flows.specs import TaskSpec, TaskSpecError

RESULT_ARTIFACT = "lora-pool-task-result"
# Set by the parent per task; the rest of many_tasks' parameters are the parent's own.
LOCAL_ONLY = ("home", "threads", "checked", "tracking_uri")


def pool_params(params: dict[str, Any], base_model: str | None, demo_base: dict[str, Any] | None,
                tracking_uri: str | None) -> dict[str, Any]:
    """What a task's run on the pool gets: the parent's overrides, not its home, threads or base path.

    The worker's own LORA_PIPELINE_HOME and MLFLOW_TRACKING_URI apply unless a tracking URI was
    given explicitly; the task checks itself and creates its experiment where it runs."""
    out = {k: v for k, v in params.items() if k not in LOCAL_ONLY and v is not None}
    extra = {"base_model": base_model, "demo_base": demo_base, "tracking_uri": tracking_uri}
    return {**out, **{k: v for k, v in extra.items() if v is not None}}


def _read_result(flow_run_id: Any) -> dict[str, Any] | None:
    """The table artifact `pool_task` (flows/pool_task.py) published in that run (None if it has none)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[RESULT_ARTIFACT]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    if not found:
        return None
    data = found[0].data
    return (json.loads(data) if isinstance(data, str) else data)[0]


@task(name="run-task-on-pool")
def run_on_pool_task(deployment: str, task_ref: str, params: dict[str, Any], crash_reruns: int) -> dict:
    """One task as a run of `deployment`, submitted again while it ends CRASHED (at most `crash_reruns`)."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    runs: list[str] = []
    while True:
        run = run_deployment(deployment, parameters={"task": task_ref, "params": params}, timeout=None,
                             poll_interval=3, tags=["lora-fanout"])
        runs.append(str(run.id))
        state = run.state
        if state is not None and state.is_completed():
            result = _read_result(run.id)
            if result is None:
                raise RuntimeError(f"flow run {run.id} of {deployment} completed without its result artifact")
            return {**result, "flow_runs": runs}
        if state is None or not state.is_crashed() or len(runs) > crash_reruns:
            name = state.type.value if state is not None else "no state"
            raise RuntimeError(f"flow run {run.id} of {deployment} ended {name}: "
                               f"{state.message if state is not None else ''} (runs: {runs})")
        logger.warning("task %s: flow run %s CRASHED (%s); submitting it again", task_ref, run.id,
                       state.message)


def run_on_pool(deployment: str, refs: list[str], specs: list[TaskSpec], params: dict[str, Any],
                crash_reruns: int, base_model: str | None, demo_base: dict[str, Any] | None,
                tracking_uri: str | None) -> tuple[dict[str, dict], dict[str, str]]:
    """Every task (`refs`, checked into `specs`) as its own run of `deployment` with `many_tasks`'
    `params` (see `pool_params`), all submitted at once (the pool's workers set how many run
    together): (results by task name, failures by task name)."""
    if not isinstance(crash_reruns, int) or crash_reruns < 0:
        raise TaskSpecError(f"crash_reruns must be an integer >= 0, got {crash_reruns!r}")
    sent = pool_params(params, base_model, demo_base, tracking_uri)
    futures = {}
    with ThreadPoolTaskRunner(max_workers=len(refs)) as runner:
        for ref, spec in zip(refs, specs, strict=True):
            args = {"deployment": deployment, "task_ref": ref, "params": sent, "crash_reruns": crash_reruns}
            futures[spec.name] = runner.submit(run_on_pool_task, args)
        return collect(futures)


def collect(futures: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(results, failures) of each task's Prefect future, by task name; a failure is one line, logged,
    credentials masked. Waits for every future: one task's failure never cancels another."""
    results, failed = {}, {}
    for name, fut in futures.items():
        fut.wait()
        outcome = fut.result(raise_on_failure=False)
        if fut.state.is_completed():
            results[name] = outcome
        else:
            failed[name] = redact_text(f"{type(outcome).__name__}: {outcome}" if isinstance(
                outcome, BaseException) else str(fut.state.message))
            get_run_logger().error("task %s failed: %s", name, failed[name])
    return results, failed
