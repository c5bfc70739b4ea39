"""The rank sweep flow: which LoRA rank, on which layers, a task needs, measured on its own data.

    lora-pipeline sweep                                  # the demo: task summary on the demo base
    lora-pipeline sweep --task topic --rank 4 --rank 16 --targets attention --home /tmp/lp

    from lora_pipeline.flows.sweep import rank_sweep
    out = rank_sweep(task="summary")   # {"points": [...], "recommended": {...}, "plateau": {...}, ...}

`rank_sweep` trains one LoRA adapter per (target set, rank) pair, r in {1, 2, 4, 8, 16, 32, 64} on
the "attention" preset (the attention blocks' projections: T5 q, k, v, o; Llama q_proj, k_proj, v_proj,
o_proj) and on "all-linear" (every linear layer but the output head), with Prefect task mapping: the grid runs
`max_concurrency` trainings at a time, each in its own process with its share of the CPU threads.
Every adapter is evaluated on the same test rows; the chart (`rank_sweep.png`) plots the task's
metric against trainable parameters with bootstrap 95% intervals. The recommendation is the
smallest rank whose mean is within the best point's interval (fewer trainable parameters break a
tie); that adapter is registered through the promotion gate like any pipeline adapter. The flow
also says whether the reference's finding, a plateau above r=16, holds on this data.

How lora_alpha follows the rank (`scaling`): the task config's rank keeps its scale alpha/r, and
"rslora" (default) gives every rank the rank-stabilised scale alpha'/sqrt(r) that equals it there
(Kalajdzievski 2023), so the size of the update does not grow with the rank: the config's one
learning rate suits every rank, and ranks differ in capacity. "constant" keeps alpha/r at every rank:
the update grows with r, and at one learning rate the large ranks diverge (benchmarks/RESULTS.md,
Demo).

Outputs: `<home>/runs/<task>/<time>-sweep/` (one training folder per point, `eval/`, `report/`,
`rank_sweep.png`, `sweep.json`), a Prefect Markdown artifact
`rank-sweep-<task>` and an MLflow run `rank-sweep` in the task's experiment with the chart.

The grid machinery (`fit_and_evaluate`, `run_grid`, `load_spec`, `prepare_inputs`, `shared_setup`) also
runs the variant sweep (LoRA / DoRA / LoRA+ x learning rate x seed): flows/variant_sweep.py.
"""

from __future__ import annotations

import base64
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from lora_module import contracts as c
from lora_module.config import LoraConfig
from lora_module.evaluation.metrics import get_metric
from lora_module.home import PipelineHome
from lora_module.registry import ensure_task_experiment
from lora_module.selection import TARGET_PRESETS
from lora_pipeline.flows.specs import TaskSpec, TaskSpecError, load_task_spec
from lora_pipeline.flows.tasks import FlowFailedError, build_base, evaluate_base, prepare_data, training_env

RANKS = (1, 2, 4, 8, 16, 32, 64)
# Layer sets are presets the training resolves on the base it loads (lora_module.selection): T5's
# q, k, v, o or Llama's q_proj, k_proj, v_proj, o_proj for "attention", so the sweep runs on any family.
TARGET_SETS: tuple[str, ...] = TARGET_PRESETS
PLATEAU_RANK = 16  # the reference's finding: no gain above r=16
SCALINGS = ("rslora", "constant")


def rank_args(rank: int, scaling: str, anchor: tuple[int, float]) -> list[str]:
    """The training overrides for LoRA rank `rank`, its alpha set by the `scaling` rule so that the
    anchor (the config's rank, alpha) keeps its scale alpha/r."""
    r0, alpha0 = anchor
    if scaling == "rslora":
        alpha, rslora = alpha0 / math.sqrt(r0), "true"
    else:
        alpha, rslora = alpha0 / r0 * rank, "false"
    return ["--model.lora.r", str(rank), "--model.lora.lora_alpha", repr(float(alpha)),
            "--model.lora.use_rslora", rslora]


def config_anchor(config_path: str, overrides: list[str]) -> tuple[int, float]:
    """(r, lora_alpha) of a training config, command-line style overrides (`--model.lora.r 8`) applied."""
    import yaml

    lora = (yaml.safe_load(Path(config_path).read_text()) or {}).get("model", {}).get("lora", {})
    values = {"r": lora.get("r", LoraConfig.r), "lora_alpha": lora.get("lora_alpha", LoraConfig.lora_alpha)}
    for flag, value in zip(overrides, overrides[1:], strict=False):  # each flag with the item after it
        key = flag.removeprefix("--model.lora.")
        if key in values:
            values[key] = yaml.safe_load(value)
    return int(values["r"]), float(values["lora_alpha"])


def point_name(target: str, rank: int) -> str:
    """The training folder and evaluation name of one grid point, e.g. `attention-r8`."""
    return f"{target}-r{rank}"


def fit_and_evaluate(name: str, args: list[str], setup: dict[str, Any]) -> dict[str, Any]:
    """Train one adapter `name` (the shared overrides, then `args`) in a subprocess and evaluate it on the
    sweep's test rows: its scores, size, final training loss and timings."""
    from lora_module.evaluation.evaluate import GenerationConfig, ModelSpec, evaluate_model
    from lora_module.training.launcher import run_fit

    t0 = time.perf_counter()
    out = Path(setup["out_dir"]) / name
    run_fit(setup["config"], [*setup["overrides"], *args], resume=True, env=setup["env"], output_dir=str(out),
            tracking_uri=setup["tracking_uri"], experiment=setup["experiment"])
    train_s = time.perf_counter() - t0
    path = evaluate_model(ModelSpec(name, "lora", str(out)), setup["data_dir"],
                          Path(setup["out_dir"]) / "eval", GenerationConfig.from_dict(setup["generation"]),
                          limit=setup["limit"], protocol=setup["protocol"])
    ev = json.loads(path.read_text())
    train_loss = json.loads((out / c.METRICS_FILE).read_text()).get("train_loss")
    return {"name": name, "trainable": ev["params"]["trainable"], "total": ev["params"]["total"],
            "rouge": ev["metrics"], "train_loss": train_loss, "eval": str(path), "run_dir": str(out),
            "train_seconds": train_s, "seconds": time.perf_counter() - t0}


@task(name="sweep-point", retries=1, retry_delay_seconds=5)
def train_point(point: dict[str, Any], setup: dict[str, Any]) -> dict[str, Any]:
    """Train one (target set, rank) adapter in a subprocess and evaluate it; its scores and size."""
    rank = point["rank"]
    args = [*rank_args(rank, setup["scaling"], setup["anchor"]),
            "--model.lora.target_modules", point["target"]]
    return {**fit_and_evaluate(point_name(point["target"], rank), args, setup),
            "target": point["target"], "rank": rank}


def recommend(points: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The smallest rank whose mean `metric` lies within the best point's interval (then fewest
    trainable parameters); the best point and that interval come along. `p["rouge"]` holds every
    registered metric's scores; the registry says whether higher or lower is better."""
    sign = 1.0 if get_metric(metric).higher_is_better else -1.0
    best = max(points, key=lambda p: sign * p["rouge"][metric]["mean"])
    low, high = best["rouge"][metric]["ci_low"], best["rouge"][metric]["ci_high"]
    within = [p for p in points if (p["rouge"][metric]["mean"] >= low if sign > 0
                                    else p["rouge"][metric]["mean"] <= high)]
    chosen = min(within, key=lambda p: (p["rank"], p["trainable"]))
    return {"point": chosen, "best": best, "interval": [low, high]}


def plateau(points: list[dict[str, Any]], metric: str, rank: int = PLATEAU_RANK) -> dict[str, str]:
    """Per target set: does any rank above `rank` score outside r=`rank`'s interval? One sentence each."""
    out = {}
    for target in dict.fromkeys(p["target"] for p in points):
        by_rank = {p["rank"]: p["rouge"][metric] for p in points if p["target"] == target}
        above = {r: s["mean"] for r, s in sorted(by_rank.items()) if r > rank}
        if rank not in by_rank or not above:
            out[target] = f"not tested (needs r={rank} and a larger rank)"
            continue
        ref = by_rank[rank]
        scores = ", ".join(f"r={r} {m:.3f}" for r, m in above.items())
        band = f"r={rank}'s interval [{ref['ci_low']:.3f}, {ref['ci_high']:.3f}]"
        if all(ref["ci_low"] <= m <= ref["ci_high"] for m in above.values()):
            out[target] = f"holds: {scores} within {band}"
        elif any(m > ref["ci_high"] if get_metric(metric).higher_is_better else m < ref["ci_low"]
                 for m in above.values()):
            out[target] = f"does not hold, larger ranks gain: {scores} vs {band}"
        else:
            out[target] = f"does not hold, larger ranks lose: {scores} vs {band}"
    return out


def write_chart(points: list[dict[str, Any]], metric: str, rec: dict[str, Any], path: Path, title: str
                ) -> Path:
    """ROUGE against trainable parameters (log scale), one line per target set, 95% intervals as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for target in dict.fromkeys(p["target"] for p in points):
        pts = sorted((p for p in points if p["target"] == target), key=lambda p: p["trainable"])
        x = [p["trainable"] for p in pts]
        y = [p["rouge"][metric]["mean"] for p in pts]
        err = [[m - p["rouge"][metric]["ci_low"] for m, p in zip(y, pts, strict=True)],
               [p["rouge"][metric]["ci_high"] - m for m, p in zip(y, pts, strict=True)]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=target)
        for p, xi, yi in zip(pts, x, y, strict=True):
            ax.annotate(f"r={p['rank']}", (xi, yi), textcoords="offset points", xytext=(3, 5), fontsize=7)
    ax.axhspan(*rec["interval"], color="grey", alpha=0.15,
               label=f"best's 95% interval ({rec['best']['name']})")
    chosen = rec["point"]
    ax.plot([chosen["trainable"]], [chosen["rouge"][metric]["mean"]], marker="*", markersize=16, color="gold",
            markeredgecolor="black", linestyle="none", label=f"recommended: {chosen['name']}")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_markdown(task_name: str, result: dict[str, Any], chart: Path) -> str:
    """The flow's Prefect artifact: the table, the recommendation, the plateau check and the chart."""
    metric = result["metric"]
    lines = [f"# LoRA rank sweep: task `{task_name}` (scaling: {result['scaling']})", "",
             f"| point | rank | trainable | {metric} | 95% interval |", "| --- | --- | --- | --- | --- |"]
    for p in result["points"]:
        s = p["rouge"][metric]
        lines.append(f"| {p['name']} | {p['rank']} | {p['trainable']:,} | {s['mean']:.4f} | "
                     f"[{s['ci_low']:.4f}, {s['ci_high']:.4f}] |")
    rec = result["recommended"]
    lines += ["", f"**Recommended: {rec['name']}** (smallest rank within the best point's interval; best: "
              f"{result['best']}). Registered as {result['model_name']} v{result['version']} "
              f"({result['alias'] or 'no alias'}): {result['decision']}.", "",
              *[f"- plateau above r={PLATEAU_RANK}, {t}: {text}" for t, text in result["plateau"].items()],
              *[f"- failed: {name}: {err}" for name, err in result["failed"].items()], "",
              f"Chart: `{chart}`", "",
              f"![rank sweep](data:image/png;base64,{base64.b64encode(chart.read_bytes()).decode()})"]
    return "\n".join(lines)


def log_to_mlflow(home: PipelineHome, task_name: str, result: dict[str, Any], files: list[Path]) -> str:
    """One MLflow run `rank-sweep` in the task's experiment: a metric per point, the chart and sweep.json."""
    from mlflow import MlflowClient

    experiment_id = ensure_task_experiment(home, task_name)
    client = MlflowClient(tracking_uri=home.tracking_uri)
    run = client.create_run(experiment_id, run_name="rank-sweep",
                            tags={c.TAG_SWEEP: "rank", c.TAG_TASK: task_name})
    rid = run.info.run_id
    metric = result["metric"]
    client.log_param(rid, "recommended", result["recommended"]["name"])
    client.log_param(rid, "metric", metric)
    for p in result["points"]:
        client.log_metric(rid, f"{metric}_{p['name']}", p["rouge"][metric]["mean"])
        client.log_metric(rid, f"trainable_{p['name']}", p["trainable"])
    for path in files:
        client.log_artifact(rid, str(path))
    client.set_terminated(rid)
    return rid


def load_spec(task_name: str, base_model: str | None, data_overrides: dict | None,
               train_overrides: list[str] | None, lora_overrides: list[str] | None,
               eval_limit: int | None) -> TaskSpec:
    """The task spec with the flow's overrides applied and checked."""
    spec = load_task_spec(task_name)
    spec.base_model = base_model or spec.base_model
    spec.data_overrides = {**spec.data_overrides, **(data_overrides or {})}
    spec.train_overrides = [*spec.train_overrides, *(train_overrides or []), *spec.lora_overrides,
                            *(lora_overrides or [])]
    spec.eval_limit = eval_limit if eval_limit is not None else spec.eval_limit
    return TaskSpec(**spec.to_dict())


def prepare_inputs(spec: TaskSpec, ph: PipelineHome, demo_base: dict[str, Any] | None
                   ) -> tuple[str, str, str]:
    """(base model folder, prepared data folder, the base's evaluation file) of a sweep, built or reused;
    the task's MLflow experiment exists afterwards."""
    ensure_task_experiment(ph, spec.name)  # before the concurrent trainings open the store
    base = build_base(spec.base_model, str(ph.base_dir), demo_base)["path"]
    data_dir = prepare_data(spec.data_config, {**spec.data_overrides, "tokenizer": base,
                                               "output_root": str(ph.data_dir)})["path"]
    base_eval = evaluate_base(base, data_dir, str(ph.evals_dir(spec.name)), spec.generation,
                              spec.eval_limit, spec.protocol)["path"]
    return base, data_dir, base_eval


def _check_grid(ranks: list[int], targets: list[str], max_concurrency: int, scaling: str) -> None:
    if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
        raise TaskSpecError(f"ranks must be a non-empty list of integers >= 1, got {ranks!r}")
    unknown = [t for t in targets if t not in TARGET_SETS]
    if not targets or unknown:
        raise TaskSpecError(f"targets must be some of {list(TARGET_SETS)}, got {targets!r}")
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
        raise TaskSpecError(f"max_concurrency must be an integer >= 1, got {max_concurrency!r}")
    if scaling not in SCALINGS:
        raise TaskSpecError(f"scaling must be one of {list(SCALINGS)}, got {scaling!r}")


def run_grid(grid: list[dict[str, Any]], setup: dict[str, Any], workers: int, point_task: Any = train_point
             ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Map `point_task` over the grid (points named by their "name"), `workers` at a time: (points that
    finished, failures by name)."""
    with ThreadPoolTaskRunner(max_workers=workers) as runner:
        futures = runner.map(point_task, {"point": grid, "setup": unmapped(setup)})
        futures.wait()
    points, failed = [], {}
    for point, fut in zip(grid, futures, strict=True):
        outcome = fut.result(raise_on_failure=False)
        if fut.state.is_completed():
            points.append(outcome)
        else:
            failed[point["name"]] = str(outcome)
    return points, failed


def shared_setup(spec: TaskSpec, ph: PipelineHome, base: str, data_dir: str, out_dir: Path, workers: int
           ) -> dict[str, Any]:
    """What every grid point shares; each training process gets its share of the CPU threads."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    import torch

    torch.set_num_threads(threads)  # evaluations run in this process, one per worker thread
    return {"config": spec.lora_config, "out_dir": str(out_dir), "data_dir": data_dir,
            "overrides": ["--model.model_name_or_path", base, "--data.prepared_dir", data_dir,
                          *spec.train_overrides],
            "env": training_env(threads),
            "tracking_uri": ph.tracking_uri, "experiment": ph.experiment(spec.name),
            "generation": spec.generation, "limit": spec.eval_limit, "protocol": spec.protocol}


def _register(spec: TaskSpec, ph: PipelineHome, rec: dict[str, Any], base_eval: str, data_dir: str,
              out_dir: Path) -> dict[str, Any]:
    """Report base vs the recommended adapter, then register that adapter through the gate."""
    from lora_module.evaluation.report import build_report
    from lora_module.registry import register_adapter

    chosen = rec["point"]
    report = build_report(spec.name, [Path(base_eval), Path(chosen["eval"])], out_dir / "report")
    res = register_adapter(spec.name, Path(chosen["run_dir"]) / c.ADAPTER_DIR, report_path=report,
                           train_dir=chosen["run_dir"], model_name=spec.model_name, metric=spec.metric,
                           tokenizer_dir=Path(data_dir) / c.PREPARED_TOKENIZER_DIR, candidate=chosen["name"],
                           home=ph)
    return {"model_name": res.model_name, "version": res.version, "alias": res.alias,
            "decision": res.decision.get("reason"), "report": str(report)}


@flow(name="lora-rank-sweep")
def rank_sweep(
    task: str = "summary",
    ranks: list[int] | None = None,
    targets: list[str] | None = None,
    base_model: str | None = None,
    home: str | None = None,
    data_overrides: dict[str, Any] | None = None,
    train_overrides: list[str] | None = None,
    lora_overrides: list[str] | None = None,
    eval_limit: int | None = None,
    max_concurrency: int | None = None,
    demo_base: dict[str, Any] | None = None,
    register_best: bool = True,
    tracking_uri: str | None = None,
    scaling: str = "rslora",
) -> dict[str, Any]:
    """Train and evaluate LoRA at every (target set, rank), chart it, recommend a rank and register it."""
    t_start = time.perf_counter()
    ranks, targets = list(ranks or RANKS), list(targets or TARGET_SETS)
    workers = max_concurrency if max_concurrency is not None else os.cpu_count() or 1
    _check_grid(ranks, targets, workers, scaling)
    spec = load_spec(task, base_model, data_overrides, train_overrides, lora_overrides, eval_limit)
    ph = PipelineHome.from_env(home, tracking_uri).create()
    base, data_dir, base_eval = prepare_inputs(spec, ph, demo_base)
    out_dir = ph.new_run_dir(spec.name, f"sweep-{flow_run.id or 'local'}")
    setup = shared_setup(spec, ph, base, data_dir, out_dir, min(workers, len(ranks) * len(targets)))
    setup |= {"scaling": scaling, "anchor": config_anchor(spec.lora_config, spec.train_overrides)}
    grid = [{"name": point_name(t, r), "target": t, "rank": r} for t in targets for r in sorted(ranks)]
    points, failed = run_grid(grid, setup, workers)
    if not points:
        raise FlowFailedError(f"every point of the sweep failed: {failed}")
    rec = recommend(points, spec.metric)
    result = {"task": spec.name, "metric": spec.metric, "scaling": scaling, "points": points,
              "failed": failed, "recommended": rec["point"], "best": rec["best"]["name"],
              "interval": rec["interval"],
              "plateau": plateau(points, spec.metric), "base_eval": base_eval,
              "model_name": spec.model_name, "version": None, "alias": None, "decision": "not registered"}
    if register_best:
        result.update(_register(spec, ph, rec, base_eval, data_dir, out_dir))
    chart = write_chart(points, spec.metric, rec, out_dir / "rank_sweep.png",
                        f"LoRA rank sweep, task {spec.name} "
                        f"({points[0]['rouge'][spec.metric]['n']} test rows)")
    result["chart"] = str(chart)
    result["seconds"] = time.perf_counter() - t_start
    sweep_json = out_dir / "sweep.json"
    sweep_json.write_text(json.dumps(result, indent=2, default=str))
    result["mlflow_run_id"] = log_to_mlflow(ph, spec.name, result, [chart, sweep_json])
    create_markdown_artifact(key=f"rank-sweep-{spec.name}".lower().replace("_", "-"),
                             markdown=sweep_markdown(spec.name, result, chart),
                             description=f"LoRA rank sweep for task {spec.name}")
    get_run_logger().info("rank sweep %s: recommended %s, %d points in %.0f s", spec.name,
                          rec["point"]["name"], len(points), result["seconds"])
    return result


def render(result: dict[str, Any]) -> str:
    """The command's printout: one line per point, the recommendation and the plateau check."""
    metric = result["metric"]
    out = ["", f"LoRA rank sweep, task {result['task']!r}: {metric} (x100) on the same test rows; "
           f"scaling {result['scaling']}", "",
           f"  {'point':<16}{'trainable':>11}{metric:>9}  95% interval"]
    for p in sorted(result["points"], key=lambda p: (p["target"], p["rank"])):
        s = p["rouge"][metric]
        out.append(f"  {p['name']:<16}{p['trainable']:>11,}{100 * s['mean']:>9.1f}  "
                   f"[{100 * s['ci_low']:.1f}, {100 * s['ci_high']:.1f}]")
    out += ["", f"  recommended: {result['recommended']['name']} (smallest rank within the best point's "
                f"interval; best {result['best']})",
            f"  registered:  {result['model_name']} v{result['version']} ({result['alias'] or 'no alias'}): "
            f"{result['decision']}"]
    out += [f"  plateau above r={PLATEAU_RANK}, {t}: {text}" for t, text in result["plateau"].items()]
    out += [f"  FAILED {name}: {err}" for name, err in result["failed"].items()]
    out += [f"  chart: {result['chart']}", f"  {result['seconds']:.0f} s", ""]
    return "\n".join(out)

