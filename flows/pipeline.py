"""The pipeline flows: one task end to end, and many tasks side by side.

    lora-pipeline run --task summary --task topic        # many-task flow, embedded defaults
    lora-pipeline run --task deploy/tasks/dialogsum.yaml  # any task spec file

    from lora_pipeline.flows.pipeline import task_pipeline, many_tasks
    result = task_pipeline("summary")          # {"version": "3", "alias": "champion", "rouge": {...}, ...}
    summary = many_tasks(["summary", "topic"])  # {"results": {...}, "failed": {...}}

`task_pipeline`: validate -> base model -> prepare -> evaluate base -> train full (if the spec has
a full config) -> train LoRA/QLoRA -> evaluate -> report -> register through the promotion gate ->
Markdown artifact. `many_tasks` validates every task first (a bad one fails the flow before any
training), then runs each task's flow concurrently; a task that fails is reported and does not
touch the others' results. Preparing data and evaluating the base model are served from the
library's content-addressed folders when their inputs are unchanged (`cached` in the result).

Outputs go under the pipeline home (`lora_module.home.PipelineHome`): the `home` parameter, else
`$LORA_PIPELINE_HOME`, else `./.lora_pipeline`; MLflow at `tracking_uri`, else
`$MLFLOW_TRACKING_URI`, else `<home>/mlflow.db`. Each task's training and registration runs go to
its MLflow experiment `lora-<task>`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import SecretStr

from lora_module import contracts as c
from lora_module.errors import ArgumentParser
from lora_module.home import PipelineHome
from lora_module.redact import redact_text, redact_uri
from lora_module.registry import ensure_task_experiment
from lora_module.run_dirs import RunClaim, claim_run_dir, training_key
from lora_module.training.resume import RemoteCheckpointError, check_ckpt_overrides
from lora_pipeline.flows import tasks as t
from lora_pipeline.flows.fanout import collect, run_on_pool
from lora_pipeline.flows.reporting import mlflow_run_link, rouge_rows, summary_markdown, task_markdown
from lora_pipeline.flows.specs import TaskSpec, TaskSpecError, check_task_spec, load_task_spec

TRAIN_METRICS = ("trainable_params", "total_params", "steps", "train_loss", "val_loss", "train_seconds")


# ---- wiring helpers -----------------------------------------------------------------------------
def load_specs(tasks: list[str], base_model: str | None, data_overrides: dict | None,
               train_overrides: list[str] | None, eval_limit: int | None, train_full: bool | None,
               check: bool = True, lora_overrides: list[str] | None = None,
               full_overrides: list[str] | None = None) -> list[TaskSpec]:
    """Read every task spec and apply the flow's overrides; raise one error naming every problem."""
    if not tasks:
        raise TaskSpecError("no tasks given; pass at least one task name or spec file")
    if len(set(tasks)) != len(tasks):
        raise TaskSpecError(f"tasks must be distinct, got {tasks}")
    specs, problems = [], []
    for ref in tasks:
        try:
            spec = load_task_spec(ref)
        except TaskSpecError as e:
            problems.append(str(e))
            continue
        spec.base_model = base_model or spec.base_model
        spec.data_overrides = {**spec.data_overrides, **(data_overrides or {})}
        spec.train_overrides = [*spec.train_overrides, *(train_overrides or [])]
        spec.lora_overrides = [*spec.lora_overrides, *(lora_overrides or [])]
        spec.full_overrides = [*spec.full_overrides, *(full_overrides or [])]
        spec.eval_limit = eval_limit if eval_limit is not None else spec.eval_limit
        if train_full is False:
            spec.full_config = None
        elif train_full and not spec.full_config:
            problems.append(f"task {spec.name!r}: train_full=True but the spec has no full_config")
        try:
            TaskSpec(**{k: v for k, v in spec.to_dict().items()})  # re-validate after the overrides
        except TaskSpecError as e:
            problems.append(str(e))
        if check:
            problems += check_task_spec(spec)
        problems += _remote_checkpoints(spec)
        specs.append(spec)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        problems.append(f"task names must be distinct, got {names}")
    if problems:
        raise TaskSpecError("invalid pipeline parameters:\n  - " + "\n  - ".join(problems))
    return specs


def _remote_checkpoints(spec: TaskSpec) -> list[str]:
    """A `--ckpt_path` in the spec's training overrides that is not a local file (its pickle would run)."""
    try:
        for kind in ("lora", "full"):
            check_ckpt_overrides([*spec.train_overrides, *spec.training_overrides(kind)],
                                 f"task {spec.name!r}: train_overrides --ckpt_path")
    except RemoteCheckpointError as e:
        return [str(e)]
    return []


def reveal(uri: str | SecretStr | None) -> str | None:
    """A tracking URI as a plain string; flows take it as SecretStr too, which Prefect records masked
    (its credentials stay out of the flow run's stored parameters)."""
    return uri.get_secret_value() if isinstance(uri, SecretStr) else uri


@dataclass
class Stages:
    """Runs a flow's tasks and records, per stage, the flow-side wall time, the task's own time and
    (for stages the library can serve from its content-addressed folders) whether it did."""

    timings: dict[str, float] = field(default_factory=dict)
    inner: dict[str, float] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)

    def run(self, stage: str, fn: Any, *args: Any) -> dict[str, Any]:
        """Call task `fn` (a failure raises) and record it under `stage`; returns its result."""
        t0 = time.perf_counter()
        result = fn(*args)
        self.timings[stage] = time.perf_counter() - t0
        self.inner[stage] = result["seconds"]
        if "reused" in result:
            self.cached[stage] = result["reused"]
        return result


def _train_and_evaluate(stages: Stages, spec: TaskSpec, home: PipelineHome, base: str, data_dir: str,
                        run_dir: Path, threads: int | None) -> tuple[dict[str, dict], list[str]]:
    """Train the full baseline (if the spec has one) and the adapter, evaluating each: (runs, eval paths)."""
    env = t.training_env(threads or os.cpu_count() or 1)
    common = ["--model.model_name_or_path", base, "--data.prepared_dir", data_dir, *spec.train_overrides]
    runs: dict[str, dict] = {}
    evals = []
    for kind, config in (("full", spec.full_config), ("lora", spec.lora_config)):
        if not config:
            continue
        out = str(run_dir / kind)
        args = [*common, *spec.training_overrides(kind)]
        runs[kind] = stages.run(f"train_{kind}", t.train, config, args, out, home.tracking_uri,
                                home.experiment(spec.name), env)
        evals.append(stages.run(f"evaluate_{kind}", t.evaluate, kind, kind, out, data_dir,
                                str(run_dir / "eval"), spec.generation, spec.eval_limit,
                                spec.protocol)["path"])
    return runs, evals


def _log_claim(claim: RunClaim) -> None:
    """Say which run folder this run works in: an interrupted run's (resumed) or a new one."""
    logger = get_run_logger()
    for folder in claim.removed:
        logger.info("removed %s: an older interrupted run with the same inputs", folder)
    if claim.adopted:
        logger.info("resuming the interrupted run in %s (same inputs; training continues from its last"
                    " checkpoint)", claim.path)


def _publish(task_name: str, report_json: dict[str, Any], reg: dict[str, Any], report_path: str) -> str:
    """The task's Markdown artifact (ROUGE table, registered version); returns the MLflow run link."""
    link = mlflow_run_link(reg["tracking_uri"], reg["run_id"])
    create_markdown_artifact(
        key=f"rouge-{task_name}".lower().replace("_", "-"),
        markdown=task_markdown(task_name, report_json, reg, link, report_path),
        description=f"ROUGE of base / full / LoRA for task {task_name} and the registered version",
    )
    return link


# ---- flows --------------------------------------------------------------------------------------
@flow(name="lora-task")
def task_pipeline(
    task: str = "summary",
    base_model: str | None = None,
    home: str | None = None,
    data_overrides: dict[str, Any] | None = None,
    train_overrides: list[str] | None = None,
    lora_overrides: list[str] | None = None,
    full_overrides: list[str] | None = None,
    eval_limit: int | None = None,
    train_full: bool | None = None,
    threads: int | None = None,
    registry_retries: int = 2,
    demo_base: dict[str, Any] | None = None,
    checked: bool = False,
    tracking_uri: str | SecretStr | None = None,
) -> dict[str, Any]:
    """One task end to end: prepare, evaluate base, train, evaluate, report, register; returns the version."""
    t_start = time.perf_counter()
    ph = PipelineHome.from_env(home, reveal(tracking_uri)).create()
    spec = load_specs([task], base_model, data_overrides, train_overrides, eval_limit, train_full,
                      check=not checked, lora_overrides=lora_overrides, full_overrides=full_overrides)[0]
    if not checked:  # run on its own: many_tasks creates its tasks' experiments before starting them
        ensure_task_experiment(ph, spec.name)
    stages = Stages()
    base = stages.run("base_model", t.build_base, spec.base_model, str(ph.base_dir), demo_base)["path"]
    prepared = stages.run("prepare", t.prepare_data, spec.data_config,
                          {**spec.data_overrides, "tokenizer": base, "output_root": str(ph.data_dir)})
    data_dir = prepared["path"]
    base_eval = stages.run("evaluate_base", t.evaluate_base, base, data_dir, str(ph.evals_dir(spec.name)),
                           spec.generation, spec.eval_limit, spec.protocol)
    key = training_key({"spec": spec.to_dict(), "base": base, "data": prepared["fingerprint"],
                        "demo_base": demo_base}, [spec.lora_config, spec.full_config])
    new_dir = ph.new_run_dir(spec.name, str(flow_run.id or "local"))
    with claim_run_dir(ph.runs_dir(spec.name), key, new_dir) as claim:  # an interrupted run's, or new
        _log_claim(claim)
        run_dir = claim.path
        runs, evals = _train_and_evaluate(stages, spec, ph, base, data_dir, run_dir, threads)
        rep = stages.run("report", t.report, spec.name, [base_eval["path"], *evals], str(run_dir / "report"))
        lora_dir = runs["lora"]["path"]
        reg = stages.run("register", t.register, spec.name, str(Path(lora_dir) / c.ADAPTER_DIR), rep["path"],
                         lora_dir, spec.model_name, spec.metric,
                         str(Path(data_dir) / c.PREPARED_TOKENIZER_DIR), ph, registry_retries,
                         claim.adopted)  # a resumed folder's registration may have gone through
        claim.finish()
    report_json = json.loads(Path(rep["path"]).read_text())
    link = _publish(spec.name, report_json, reg, rep["path"])
    total = time.perf_counter() - t_start
    get_run_logger().info("task %s: %s v%s (%s) in %.0f s", spec.name, reg["model_name"], reg["version"],
                          reg["alias"], total)
    return {
        "task": spec.name, "model_name": reg["model_name"], "version": reg["version"], "alias": reg["alias"],
        "decision": reg["decision"].get("reason"), "model_uri": reg["model_uri"], "run_id": reg["run_id"],
        "tracking_uri": redact_uri(reg["tracking_uri"]), "mlflow_link": link,
        "rouge": rouge_rows(report_json),
        "report": rep["path"], "report_md": str(Path(rep["path"]).with_name("report.md")),
        "prepared_dir": data_dir, "data_fingerprint": prepared["fingerprint"], "base_model": base,
        "train_metrics": {k: {m: v["metrics"].get(m) for m in TRAIN_METRICS} for k, v in runs.items()},
        "cached": stages.cached, "timings": stages.timings, "inner": stages.inner, "seconds": total,
    }


@task(name="run-task-flow")
def run_task_flow(task_ref: str, params: dict[str, Any]) -> dict[str, Any]:
    """One task's flow as a child run (a task, so the parent can run several in threads)."""
    return task_pipeline(task=task_ref, **params)


def _prepare_shared(specs: list[TaskSpec], home: PipelineHome, demo_base: dict[str, Any] | None
                    ) -> dict[str, str]:
    """State the tasks share, created before they start so they never race for it: each distinct
    base model (name -> path), the MLflow store and every task's experiment."""
    bases = {name: t.build_base(name, str(home.base_dir), demo_base)["path"]
             for name in dict.fromkeys(s.base_model for s in specs)}
    for spec in specs:
        ensure_task_experiment(home, spec.name)
    return bases


def _run_tasks(refs: list[str], specs: list[TaskSpec], params: dict[str, Any], bases: dict[str, str],
               workers: int) -> tuple[dict[str, dict], dict[str, str]]:
    """Each task's flow in a thread of its own (at most `workers` at once): (results, failures)."""
    futures = {}
    with ThreadPoolTaskRunner(max_workers=workers) as runner:
        for ref, spec in zip(refs, specs, strict=True):
            # SecretStr: Prefect records the child flow's parameters, this one masked.
            task_params = {**params, "base_model": bases[spec.base_model],
                           "tracking_uri": SecretStr(reveal(params["tracking_uri"]))}
            futures[spec.name] = runner.submit(run_task_flow, {"task_ref": ref, "params": task_params})
        return collect(futures)


@flow(name="lora-tasks")
def many_tasks(
    tasks: list[str] | None = None,
    base_model: str | None = None,
    home: str | None = None,
    data_overrides: dict[str, Any] | None = None,
    train_overrides: list[str] | None = None,
    lora_overrides: list[str] | None = None,
    full_overrides: list[str] | None = None,
    eval_limit: int | None = None,
    train_full: bool | None = None,
    max_concurrency: int = 2,
    allow_partial: bool = False,
    registry_retries: int = 2,
    demo_base: dict[str, Any] | None = None,
    tracking_uri: str | SecretStr | None = None,
    deployment: str | None = None,
    crash_reruns: int = 1,
) -> dict[str, Any]:
    """Validate every task, then run each task's flow concurrently (in threads, or as runs of `deployment`
    on a work pool: flows/fanout.py); one failure keeps the others' results."""
    t_start = time.perf_counter()
    tasks = tasks or ["summary", "topic"]
    if not isinstance(max_concurrency, int) or max_concurrency < 1:
        raise TaskSpecError(f"max_concurrency must be an integer >= 1, got {max_concurrency!r}")
    ph = PipelineHome.from_env(home, reveal(tracking_uri)).create()
    t0 = time.perf_counter()
    specs = load_specs(tasks, base_model, data_overrides, train_overrides, eval_limit, train_full,
                       lora_overrides=lora_overrides, full_overrides=full_overrides)
    validate_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    bases = {} if deployment else _prepare_shared(specs, ph, demo_base)  # fan-out: built where tasks run
    base_seconds = time.perf_counter() - t0

    workers = min(max_concurrency, len(specs))
    threads = max(1, (os.cpu_count() or 1) // workers)
    if workers > 1:
        # Evaluations run in this process, one thread per task: share the cores instead of oversubscribing.
        import torch

        torch.set_num_threads(threads)
    params = {"home": str(ph.root), "tracking_uri": ph.tracking_uri, "data_overrides": data_overrides,
              "train_overrides": train_overrides, "lora_overrides": lora_overrides,
              "full_overrides": full_overrides, "eval_limit": eval_limit, "train_full": train_full,
              "threads": threads, "registry_retries": registry_retries, "checked": True}
    if deployment:
        results, failed = run_on_pool(deployment, tasks, specs, params, crash_reruns, base_model, demo_base,
                                      reveal(tracking_uri))
    else:
        results, failed = _run_tasks(tasks, specs, params, bases, workers)

    seconds = time.perf_counter() - t_start
    create_markdown_artifact(key="lora-tasks-summary", markdown=summary_markdown(results, failed, seconds),
                             description=f"Pipeline summary for tasks {tasks}")
    summary = {"results": results, "failed": failed, "seconds": seconds, "validate_seconds": validate_seconds,
               "base_seconds": base_seconds, "base_models": bases}
    if failed and not allow_partial:
        done = ", ".join(f"{n}: {r['model_name']} v{r['version']}" for n, r in results.items()) or "none"
        raise t.FlowFailedError(f"{len(failed)} of {len(specs)} tasks failed ({failed}); registered: {done} "
                                "(--allow-partial: keep the others' results and exit 0)")
    return summary


def check_before_flow(args: argparse.Namespace) -> None:
    """The `run` command's inputs, checked before Prefect starts, so a bad one is one line, not two flow
    tracebacks: the home folder, the concurrency, and every task spec with the overrides given."""
    PipelineHome.from_env(args.home, args.tracking_uri)  # a home under a regular file, an unknown URI scheme
    if args.max_concurrency < 1:
        raise TaskSpecError(f"--max-concurrency must be an integer >= 1, got {args.max_concurrency}")
    load_specs(args.tasks or ["summary", "topic"], args.base_model, None, None, args.eval_limit,
               False if args.no_full else None)


def main(argv: list[str] | None = None) -> int:
    """`lora-pipeline run [--task T ...]`: the many-task flow; prints its summary as JSON."""
    parser = ArgumentParser(prog="lora-pipeline run",
                            description="Run the pipeline flow for one or more tasks.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--task", action="append", dest="tasks",
                        help="task name (a spec in deploy/tasks/) or spec file; repeatable "
                             "(None: summary and topic)")
    parser.add_argument("--base-model",
                        help="override every task's base model: Hub name, folder or 'demo' "
                             "(None: each spec's)")
    parser.add_argument("--home", help="pipeline home (None: $LORA_PIPELINE_HOME, else ./.lora_pipeline)")
    parser.add_argument("--tracking-uri",
                        help="MLflow tracking URI (None: $MLFLOW_TRACKING_URI, else <home>/mlflow.db)")
    parser.add_argument("--eval-limit", type=int,
                        help="evaluate on the first N test rows only (None: each spec's eval_limit)")
    parser.add_argument("--no-full", action="store_true", help="skip the full fine-tuning baseline")
    parser.add_argument("--max-concurrency", type=int, default=2, help="tasks run at the same time at most")
    parser.add_argument("--allow-partial", action="store_true",
                        help="exit 0 when some tasks fail (their errors are in the summary)")
    parser.add_argument("--deployment",
                        help="run each task as a run of this deployment on its work pool, e.g. "
                             "lora-pool-task/lora-pool-task (None: in threads here)")
    args = parser.parse_args(argv)
    check_before_flow(args)
    out = many_tasks(tasks=args.tasks or ["summary", "topic"], base_model=args.base_model,
                     home=args.home, tracking_uri=SecretStr(args.tracking_uri) if args.tracking_uri else None,
                     eval_limit=args.eval_limit,
                     train_full=False if args.no_full else None, max_concurrency=args.max_concurrency,
                     allow_partial=args.allow_partial, deployment=args.deployment)
    print(redact_text(json.dumps(out, indent=2, default=str)))
    return 0
