"""The pipeline flows: one task end to end, and many tasks side by side.

    python -m flows.pipeline --task summary --task topic        # many-task flow, embedded defaults
    python -m flows.pipeline --task deploy/tasks/dialogsum.yaml  # any task spec file

    from lora_pipeline.flows.pipeline import task_pipeline, many_tasks
    result = task_pipeline("summary")          # {"version": "3", "alias": "champion", "rouge": {...}, ...}
    summary = many_tasks(["summary", "topic"])  # {"results": {...}, "failed": {...}}

`task_pipeline`: validate -> base model -> prepare (cached) -> evaluate base (cached) -> train full
(if the spec has a full config) -> train LoRA/QLoRA -> evaluate -> report -> register through the
promotion gate -> Markdown artifact. `many_tasks` validates every task first (a bad one fails the
flow before any training), then runs each task's flow concurrently; a task that fails is reported
and does not touch the others' results. Outputs go under the pipeline home
(`$LORA_PIPELINE_HOME`, else `./.lora_pipeline`): data/, base/, evals/, runs/, mlflow.db.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from lora_pipeline.flows import tasks as t
from lora_pipeline.flows.reporting import mlflow_run_link, rouge_rows, summary_markdown, task_markdown
from lora_pipeline.flows.specs import TaskSpec, TaskSpecError, check_task_spec, load_task_spec

EVAL_CODE = ("lora_module.evaluation.evaluate", "lora_module.evaluation.generation", "lora_module.evaluation.rouge")


# ---- wiring helpers -----------------------------------------------------------------------------
def use_home(home: str | None) -> Path:
    """Resolve the pipeline home and export it, so data, training and registry defaults follow it."""
    path = Path(home or os.environ.get("LORA_PIPELINE_HOME") or ".lora_pipeline").expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["LORA_PIPELINE_HOME"] = str(path)
    return path


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
        specs.append(spec)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        problems.append(f"task names must be distinct, got {names}")
    if problems:
        raise TaskSpecError("invalid pipeline parameters:\n  - " + "\n  - ".join(problems))
    return specs


def _timed(timings: dict[str, float], stage: str, fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, bool]:
    """Run a task, record its wall time under `stage`; returns (result, whether it came from the cache)."""
    t0 = time.perf_counter()
    state = fn(*args, return_state=True, **kwargs)
    timings[stage] = time.perf_counter() - t0
    return state.result(), state.name == "Cached"


def _run_dir(home: Path, task_name: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_id = str(flow_run.id or "local")[:8]
    return home / "runs" / task_name / f"{stamp}-{run_id}"


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
) -> dict[str, Any]:
    """One task end to end: prepare, evaluate base, train, evaluate, report, register; returns the version."""
    logger = get_run_logger()
    t_start = time.perf_counter()
    root = use_home(home)
    spec = load_specs([task], base_model, data_overrides, train_overrides, eval_limit, train_full,
                      check=not checked, lora_overrides=lora_overrides, full_overrides=full_overrides)[0]
    timings: dict[str, float] = {}
    inner: dict[str, float] = {}
    cached: dict[str, bool] = {}

    if not checked:  # run on its own (not from many_tasks, which did this already)
        from lora_module.training.cli import create_training_experiment

        create_training_experiment()
    base, _ = _timed(timings, "base_model", t.build_base, spec.base_model, str(root), demo_base)
    inner["base_model"] = base["seconds"]
    base_path = base["path"]

    from lora_pipeline.data import DataConfig
    from lora_pipeline.data.prepare import fingerprint as data_fingerprint

    overrides = {**spec.data_overrides, "tokenizer": base_path, "output_root": str(root / "data")}
    fp, _ = data_fingerprint(DataConfig.from_yaml(spec.data_config, overrides))
    prepared, cached["prepare"] = _timed(timings, "prepare", t.prepare_data, spec.data_config, overrides, fp)
    if not (Path(prepared["path"]) / "manifest.json").is_file():  # a cached result whose folder was deleted
        refresh = t.prepare_data.with_options(refresh_cache=True)
        prepared, cached["prepare"] = _timed(timings, "prepare", refresh, spec.data_config, overrides, fp)
    inner["prepare"] = 0.0 if cached["prepare"] else prepared["seconds"]
    data_dir = prepared["path"]

    base_id = t.model_identity(base_path)
    eval_code = t.code_identity(*EVAL_CODE)
    key = json.dumps([fp, base_id, spec.generation, spec.eval_limit, eval_code], sort_keys=True)
    base_out = root / "evals" / spec.name / f"base-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    args = (base_path, base_id, data_dir, fp, spec.generation, spec.eval_limit, eval_code, str(base_out))
    base_eval, cached["evaluate_base"] = _timed(timings, "evaluate_base", t.evaluate_base, *args)
    if not Path(base_eval["path"]).is_file():
        base_eval, cached["evaluate_base"] = _timed(
            timings, "evaluate_base", t.evaluate_base.with_options(refresh_cache=True), *args)
    inner["evaluate_base"] = 0.0 if cached["evaluate_base"] else base_eval["seconds"]

    run_dir = _run_dir(root, spec.name)
    env = t.training_env(str(root), threads or os.cpu_count() or 1)
    common = ["--model.model_name_or_path", base_path, "--data.prepared_dir", data_dir]
    evals = [base_eval["path"]]
    runs: dict[str, dict] = {}
    for kind, config in (("full", spec.full_config), ("lora", spec.lora_config)):
        if not config:
            continue
        out = str(run_dir / kind)
        runs[kind], _ = _timed(timings, f"train_{kind}", t.train, config,
                               [*common, *spec.train_overrides, *spec.training_overrides(kind),
                                "--model.output_dir", out], env)
        inner[f"train_{kind}"] = runs[kind]["seconds"]
        ev, _ = _timed(timings, f"evaluate_{kind}", t.evaluate, kind, kind, out, data_dir,
                       str(run_dir / "eval"), spec.generation, spec.eval_limit)
        inner[f"evaluate_{kind}"] = ev["seconds"]
        evals.append(ev["path"])

    rep, _ = _timed(timings, "report", t.report, spec.name, evals, str(run_dir / "report"))
    inner["report"] = rep["seconds"]
    reg, _ = _timed(timings, "register", t.register, spec.name, str(Path(runs["lora"]["path"]) / "adapter"),
                    rep["path"], runs["lora"]["path"], spec.model_name, spec.metric,
                    str(Path(data_dir) / "tokenizer"), registry_retries)
    inner["register"] = reg["seconds"]

    report_json = json.loads(Path(rep["path"]).read_text())
    link = mlflow_run_link(reg["tracking_uri"], reg["run_id"])
    create_markdown_artifact(
        key=f"rouge-{spec.name}".lower().replace("_", "-"),
        markdown=task_markdown(spec.name, report_json, reg, link, rep["path"]),
        description=f"ROUGE of base / full / LoRA for task {spec.name} and the registered version",
    )
    total = time.perf_counter() - t_start
    logger.info("task %s: %s v%s (%s) in %.0f s", spec.name, reg["model_name"], reg["version"], reg["alias"],
                total)
    return {
        "task": spec.name,
        "model_name": reg["model_name"],
        "version": reg["version"],
        "alias": reg["alias"],
        "decision": reg["decision"].get("reason"),
        "model_uri": reg["model_uri"],
        "run_id": reg["run_id"],
        "tracking_uri": reg["tracking_uri"],
        "mlflow_link": link,
        "rouge": rouge_rows(report_json),
        "report": rep["path"],
        "report_md": str(Path(rep["path"]).with_name("report.md")),
        "prepared_dir": data_dir,
        "data_fingerprint": fp,
        "base_model": base_path,
        "train_metrics": {k: {m: v["metrics"].get(m) for m in ("trainable_params", "total_params", "steps",
                                                               "train_loss", "val_loss", "train_seconds")}
                          for k, v in runs.items()},
        "cached": cached,
        "timings": timings,
        "inner": inner,
        "seconds": total,
    }


@task(name="run-task-flow")
def run_task_flow(task_ref: str, params: dict[str, Any]) -> dict[str, Any]:
    """One task's flow as a child run (a task, so the parent can run several in threads)."""
    return task_pipeline(task=task_ref, **params)


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
) -> dict[str, Any]:
    """Validate every task, then run each task's flow concurrently; one failure keeps the others' results."""
    logger = get_run_logger()
    t_start = time.perf_counter()
    tasks = tasks or ["summary", "topic"]
    if not isinstance(max_concurrency, int) or max_concurrency < 1:
        raise TaskSpecError(f"max_concurrency must be an integer >= 1, got {max_concurrency!r}")
    root = use_home(home)
    t0 = time.perf_counter()
    specs = load_specs(tasks, base_model, data_overrides, train_overrides, eval_limit, train_full,
                       lora_overrides=lora_overrides, full_overrides=full_overrides)
    validate_seconds = time.perf_counter() - t0

    # Shared state is created once, before the tasks start, so concurrent tasks never race for it:
    # each distinct base model, and the MLflow store with the training experiment.
    t0 = time.perf_counter()
    bases = {}
    for name in dict.fromkeys(s.base_model for s in specs):
        bases[name] = t.build_base(name, str(root), demo_base)["path"]
    base_seconds = time.perf_counter() - t0
    from lora_module.training.cli import create_training_experiment  # Lightning: imported only when a flow runs

    create_training_experiment()

    workers = min(max_concurrency, len(specs))
    threads = max(1, (os.cpu_count() or 1) // workers)
    if workers > 1:
        # Evaluations run in this process, one thread per task: share the cores instead of oversubscribing.
        import torch

        torch.set_num_threads(threads)
    futures = {}
    with ThreadPoolTaskRunner(max_workers=workers) as runner:
        for ref, spec in zip(tasks, specs, strict=True):
            params = {
                "base_model": bases[spec.base_model], "home": str(root), "data_overrides": data_overrides,
                "train_overrides": train_overrides, "lora_overrides": lora_overrides,
                "full_overrides": full_overrides, "eval_limit": eval_limit, "train_full": train_full,
                "threads": threads, "registry_retries": registry_retries, "checked": True,
            }
            futures[spec.name] = runner.submit(run_task_flow, {"task_ref": ref, "params": params})
        results, failed = {}, {}
        for name, fut in futures.items():
            fut.wait()
            outcome = fut.result(raise_on_failure=False)
            if fut.state.is_completed():
                results[name] = outcome
            else:
                failed[name] = f"{type(outcome).__name__}: {outcome}" if isinstance(outcome, BaseException) \
                    else str(fut.state.message)
                logger.error("task %s failed: %s", name, failed[name])

    seconds = time.perf_counter() - t_start
    create_markdown_artifact(
        key="lora-tasks-summary",
        markdown=summary_markdown(results, failed, seconds),
        description=f"Pipeline summary for tasks {tasks}",
    )
    summary = {"results": results, "failed": failed, "seconds": seconds, "validate_seconds": validate_seconds,
               "base_seconds": base_seconds, "base_models": bases}
    if failed and not allow_partial:
        done = ", ".join(f"{n}: {r['model_name']} v{r['version']}" for n, r in results.items()) or "none"
        raise RuntimeError(f"{len(failed)} of {len(specs)} tasks failed ({failed}); registered: {done}")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the pipeline flow for one or more tasks.")
    parser.add_argument("--task", action="append", dest="tasks", help="task name or spec file (repeatable)")
    parser.add_argument("--base-model", help="override every task's base model (Hub name, folder or 'demo')")
    parser.add_argument("--home", help="pipeline home (default $LORA_PIPELINE_HOME or ./.lora_pipeline)")
    parser.add_argument("--eval-limit", type=int)
    parser.add_argument("--no-full", action="store_true", help="skip full fine-tuning")
    parser.add_argument("--max-concurrency", type=int, default=2)
    args = parser.parse_args(argv)
    out = many_tasks(tasks=args.tasks or ["summary", "topic"], base_model=args.base_model,
                     home=args.home, eval_limit=args.eval_limit, train_full=False if args.no_full else None,
                     max_concurrency=args.max_concurrency)
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
