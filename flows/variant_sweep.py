"""The variant sweep flow: LoRA, DoRA and LoRA+ across learning rates and seeds on one task.

    lora-pipeline sweep --variant lora --variant dora --variant loraplus --lr-multiplier 1 2 4 --seeds 3

    from lora_pipeline.flows.variant_sweep import variant_sweep
    out = variant_sweep(task="summary", variants=["lora", "dora"], lr_multipliers=[1, 2], seeds=3)

It answers two questions a user asks of the variants (issue 23): does DoRA or LoRA+ widen the range
of learning rates where training is stable, and does either close the gap to full fine-tuning. Each
point trains the task's LoRA configuration as it is, changed in two ways only: the variant
("lora": plain, "dora": `model.lora.use_dora`, "loraplus": `model.loraplus_lr_ratio`, B's learning
rate over A's, 16 by default as in the paper) and the learning rate, the config's times a
multiplier; seeds 0..N-1 move the init, dropout and data order (`--seed_everything s --data.seed s`).
Every adapter is scored on the same test rows. A seed "collapsed" when it scored below half of the
sweep's best mean (the best variant at its best learning rate: what the task allows), or its training
failed (e.g. a non-finite loss); a multiplier is stable for a variant when no seed collapsed there.
Nothing is registered: it is a comparison.

Outputs: `<home>/runs/<task>/<time>-variants/` (one training folder per point, `eval/`, the chart
`variant_sweep.png`: the metric against the learning rate, one line per variant, and `sweep.json`),
a Prefect Markdown artifact `variant-sweep-<task>` and an MLflow run `variant-sweep` in the task's
experiment. The grid runs `max_concurrency` trainings at a time (flows/sweep.py's machinery).
"""

from __future__ import annotations

import base64
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from lora_module import contracts as c
from lora_module.evaluation.metrics import get_metric
from lora_module.home import PipelineHome
from lora_module.registry import ensure_task_experiment
from lora_pipeline.flows.specs import TaskSpecError
from lora_pipeline.flows.sweep import fit_and_evaluate, load_spec, prepare_inputs, run_grid, shared_setup
from lora_pipeline.flows.tasks import FlowFailedError

VARIANTS = ("lora", "dora", "loraplus")
LR_MULTIPLIERS = (1.0, 2.0, 4.0)
LORAPLUS_RATIO = 16.0  # Hayou et al. 2024's usual B/A learning-rate ratio
COLLAPSE_FRACTION = 0.5  # a seed below this share of the sweep's best mean collapsed (lower is better: above
# the best divided by it)
CHART_FILE = "variant_sweep.png"
SWEEP_FILE = "sweep.json"
COMPARED = "rouge1"  # also summarised: the metric the demo's full fine-tuning figures are given in


def variant_args(variant: str, loraplus_ratio: float = LORAPLUS_RATIO) -> list[str]:
    """The training overrides of one variant; each sets both switches, whatever the task config says."""
    dora = "true" if variant == "dora" else "false"
    ratio = repr(float(loraplus_ratio)) if variant == "loraplus" else "null"
    return ["--model.lora.use_dora", dora, "--model.loraplus_lr_ratio", ratio]


def config_learning_rate(config_path: str, overrides: list[str]) -> float:
    """`model.learning_rate` of a training config, command-line overrides applied (the module's default
    when neither sets it)."""
    import yaml

    value = ((yaml.safe_load(Path(config_path).read_text()) or {}).get("model") or {}).get("learning_rate")
    for flag, given in zip(overrides, overrides[1:], strict=False):  # each flag with the item after it
        if flag == "--model.learning_rate":
            value = yaml.safe_load(given)
    if value is None:
        import inspect

        from lora_module.training.module import FineTuneModule

        value = inspect.signature(FineTuneModule).parameters["learning_rate"].default
    return float(value)


def point_name(variant: str, multiplier: float, seed: int) -> str:
    """The training folder and evaluation name of one point, e.g. `dora-lr2x-s0`, `lora-lr0_5x-s1` (a
    name allows no '.')."""
    return f"{variant}-lr{multiplier:g}x-s{seed}".replace(".", "_")


def build_grid(variants: list[str], multipliers: list[float], seeds: int) -> list[dict[str, Any]]:
    """Every (variant, multiplier, seed), seed-major so a sweep cut short has covered every variant."""
    return [{"name": point_name(v, m, s), "variant": v, "multiplier": float(m), "seed": s}
            for s in range(seeds) for m in sorted(multipliers) for v in variants]


def check_variant_grid(variants: list[str], multipliers: list[float], seeds: int, loraplus_ratio: float,
                       max_concurrency: int) -> None:
    """One TaskSpecError naming the first bad sweep setting; before any work."""
    if not variants or any(v not in VARIANTS for v in variants) or len(set(variants)) < len(variants):
        raise TaskSpecError(f"variants must be distinct names among {list(VARIANTS)}, got {variants!r}")

    def positive(x: Any) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0

    distinct = len(set(multipliers)) == len(multipliers)
    if not multipliers or not distinct or not all(positive(m) for m in multipliers):
        raise TaskSpecError(f"lr_multipliers must be distinct numbers > 0, got {multipliers!r}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise TaskSpecError(f"seeds must be an integer >= 1 (seeds 0..N-1), got {seeds!r}")
    if not positive(loraplus_ratio):
        raise TaskSpecError(f"loraplus_ratio must be a number > 0, got {loraplus_ratio!r}")
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
        raise TaskSpecError(f"max_concurrency must be an integer >= 1, got {max_concurrency!r}")


@task(name="variant-sweep-point")  # no retry: a diverged training diverges again (seeded)
def train_variant_point(point: dict[str, Any], setup: dict[str, Any]) -> dict[str, Any]:
    """Train one (variant, learning rate, seed) adapter in a subprocess and evaluate it."""
    lr = setup["learning_rate"] * point["multiplier"]
    seed = str(point["seed"])
    args = [*variant_args(point["variant"], setup["loraplus_ratio"]), "--model.learning_rate", repr(lr),
            "--seed_everything", seed, "--data.seed", seed]
    return {**fit_and_evaluate(point["name"], args, setup), "variant": point["variant"],
            "multiplier": point["multiplier"], "lr": lr, "seed": point["seed"]}


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(variant: str, multiplier: float, grid: list[dict[str, Any]], points: list[dict[str, Any]],
          failed: dict[str, str], metric: str, base_lr: float) -> dict[str, Any]:
    """One (variant, multiplier): the seeds' scores, their mean and sd, the failures."""
    done = sorted((p for p in points if (p["variant"], p["multiplier"]) == (variant, multiplier)),
                  key=lambda p: p["seed"])
    names = [g["name"] for g in grid if (g["variant"], g["multiplier"]) == (variant, multiplier)]
    scores = [p["rouge"][metric]["mean"] for p in done]
    compared = [p["rouge"][COMPARED]["mean"] for p in done]
    (mean, sd), (cmean, csd) = _stats(scores), _stats(compared)
    return {"variant": variant, "multiplier": multiplier, "lr": base_lr * multiplier,
            "seeds": [p["seed"] for p in done], "scores": scores, "mean": mean, "sd": sd,
            f"{COMPARED}_scores": compared, f"{COMPARED}_mean": cmean, f"{COMPARED}_sd": csd,
            "train_loss": [p.get("train_loss") for p in done], "failed": [n for n in names if n in failed]}


def _collapsed(score: float, best: float, sign: float) -> bool:
    return score < COLLAPSE_FRACTION * best if sign > 0 else score > best / COLLAPSE_FRACTION


def summarize(grid: list[dict[str, Any]], points: list[dict[str, Any]], failed: dict[str, str], metric: str,
              base_lr: float) -> dict[str, Any]:
    """The cells (variant x multiplier) with their collapsed seeds (against the sweep's best cell), and
    per variant its best cell and the multipliers where it was stable."""
    variants = list(dict.fromkeys(g["variant"] for g in grid))
    multipliers = sorted({g["multiplier"] for g in grid})
    sign = 1.0 if get_metric(metric).higher_is_better else -1.0
    cells = [_cell(v, m, grid, points, failed, metric, base_lr) for v in variants for m in multipliers]
    top = max((cell["mean"] for cell in cells if cell["mean"] is not None), key=lambda m: sign * m,
              default=math.nan)
    for cell in cells:
        cell["collapsed"] = sum(_collapsed(s, top, sign) for s in cell["scores"]) + len(cell["failed"])
    by_variant = {}
    for v in variants:
        own = [cell for cell in cells if cell["variant"] == v]
        scored = [cell for cell in own if cell["mean"] is not None]
        best = max(scored, key=lambda cell: sign * cell["mean"], default=None)
        keep = ("multiplier", "mean", "sd", f"{COMPARED}_mean")
        by_variant[v] = {"best": {k: best[k] for k in keep} if best else None,
                         "stable": [cell["multiplier"] for cell in own
                                    if cell["scores"] and not cell["collapsed"]]}
    return {"cells": cells, "variants": by_variant, "multipliers": multipliers, "collapse_below": top}


def write_chart(result: dict[str, Any], path: Path, title: str) -> Path:
    """The metric against the learning rate (log scale): per variant the mean over seeds with +-sd bars
    and each seed as a dot; the base model's score as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = result["metric"]
    k = get_metric(metric).scale
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, variant in enumerate(result["summary"]["variants"]):
        color = f"C{i}"
        cells = [cell for cell in result["summary"]["cells"] if cell["variant"] == variant and cell["scores"]]
        ax.errorbar([cell["lr"] for cell in cells], [k * cell["mean"] for cell in cells], label=variant,
                    yerr=[k * cell["sd"] for cell in cells], marker="o", capsize=3, color=color)
        for cell in cells:
            ax.scatter([cell["lr"]] * len(cell["scores"]), [k * s for s in cell["scores"]], color=color,
                       alpha=0.35, s=12)
    base = result["base"].get(metric)
    if base is not None:
        ax.axhline(k * base, color="grey", linestyle="--", label=f"base (zero-shot) {_num(base, metric)}")
    lrs = sorted({cell["lr"] for cell in result["summary"]["cells"]})
    ax.set_xscale("log")
    ax.set_xticks(lrs, [f"{lr:.2g}" for lr in lrs])
    ax.minorticks_off()
    ax.set_xlabel("learning rate (LoRA+: A's; B's is ratio x it)")
    ax.set_ylabel(f"{metric} (x{k:g})" if k != 1 else metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _num(value: float, metric: str) -> str:
    """A score as the report shows it (ROUGE in points: x100)."""
    return f"{get_metric(metric).scale * value:.1f}"


def _fmt(mean: float | None, sd: float | None, metric: str) -> str:
    return "-" if mean is None else f"{_num(mean, metric)} +- {_num(sd, metric)}"


def table_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per (variant, multiplier): variant, x, lr, metric mean +- sd, seeds, rouge1, collapsed."""
    rows = []
    for cell in result["summary"]["cells"]:
        seeds = " ".join(_num(s, result["metric"]) for s in cell["scores"]) or "-"
        n = len(cell["scores"]) + len(cell["failed"])
        rows.append((cell["variant"], f"{cell['multiplier']:g}", f"{cell['lr']:.2g}",
                     _fmt(cell["mean"], cell["sd"], result["metric"]), seeds,
                     _fmt(cell[f"{COMPARED}_mean"], cell[f"{COMPARED}_sd"], COMPARED),
                     f"{cell['collapsed']}/{n}"))
    return rows


def findings(result: dict[str, Any]) -> list[str]:
    """Per variant: its stable multipliers and its best cell; then the failures."""
    out = []
    for variant, v in result["summary"]["variants"].items():
        stable = ", ".join(f"x{m:g}" for m in v["stable"]) or "none"
        best = v["best"]
        metric, best_text = result["metric"], "no point finished"
        if best:
            best_text = (f"best x{best['multiplier']:g}: {metric} {_fmt(best['mean'], best['sd'], metric)}, "
                         f"{COMPARED} {_num(best[f'{COMPARED}_mean'], COMPARED)}")
        out.append(f"{variant}: stable at {stable}; {best_text}")
    out += [f"FAILED {name}: {err}" for name, err in result["failed"].items()]
    return out


HEADER = ("variant", "lr x", "lr", "metric", "seeds", COMPARED, "collapsed")


def render(result: dict[str, Any]) -> str:
    """The command's printout: the table (as the report shows scores), stable ranges, best cells, chart."""
    metric = result["metric"]
    base = " ".join(f"{k} {_num(v, k)}" for k, v in result["base"].items())
    header = [h.replace("metric", metric) for h in HEADER]
    widths = [max(len(str(r[i])) for r in [header, *table_rows(result)]) + 2 for i in range(len(HEADER))]
    out = ["", f"LoRA variants, task {result['task']!r}: {metric} (x{get_metric(metric).scale:g}, mean +- sd "
           f"over seeds 0..{result['seeds'] - 1}) on the same test rows; config lr "
           f"{result['learning_rate']:g}, LoRA+ ratio {result['loraplus_ratio']:g}; base (zero-shot) {base}",
           ""]
    out += ["  " + "".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
            for row in [header, *table_rows(result)]]
    top = _num(result["summary"]["collapse_below"], metric)
    out += ["", f"  collapsed = seeds worse than {COLLAPSE_FRACTION:.0%} (x{1 / COLLAPSE_FRACTION:g} for a "
            f"lower-is-better metric) of the sweep's best mean {top}, or failed"]
    out += [f"  {line}" for line in findings(result)]
    out += [f"  chart: {result['chart']}", f"  {result['seconds']:.0f} s", ""]
    return "\n".join(out)


def sweep_markdown(result: dict[str, Any], chart: Path) -> str:
    """The flow's Prefect artifact: the table, the findings and the chart."""
    header = [h.replace("metric", result["metric"]) for h in HEADER]
    lines = [f"# LoRA variant sweep: task `{result['task']}`", "", "| " + " | ".join(header) + " |",
             "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    lines += ["", *[f"- {line}" for line in findings(result)], "", f"Chart: `{chart}`", "",
              f"![variant sweep](data:image/png;base64,{base64.b64encode(chart.read_bytes()).decode()})"]
    return "\n".join(lines)


def log_to_mlflow(home: PipelineHome, result: dict[str, Any], files: list[Path]) -> str:
    """One MLflow run `variant-sweep` in the task's experiment: a metric per cell, chart and sweep.json."""
    from mlflow import MlflowClient

    experiment_id = ensure_task_experiment(home, result["task"])
    client = MlflowClient(tracking_uri=home.tracking_uri)
    run = client.create_run(experiment_id, run_name="variant-sweep",
                            tags={c.TAG_SWEEP: "variant", c.TAG_TASK: result["task"]})
    rid = run.info.run_id
    for key in ("metric", "seeds", "learning_rate", "loraplus_ratio"):
        client.log_param(rid, key, result[key])
    for cell in result["summary"]["cells"]:
        if cell["mean"] is not None:
            key = f"{result['metric']}_{cell['variant']}_x{cell['multiplier']:g}"
            client.log_metric(rid, key, cell["mean"])
    for path in files:
        client.log_artifact(rid, str(path))
    client.set_terminated(rid)
    return rid


def _base_scores(base_eval: str, metric: str) -> dict[str, float]:
    scores = json.loads(Path(base_eval).read_text())["metrics"]
    return {k: scores[k]["mean"] for k in dict.fromkeys((metric, COMPARED))}


def _finish(result: dict[str, Any], ph: PipelineHome, out_dir: Path, t_start: float) -> dict[str, Any]:
    """Chart, sweep.json, the MLflow run and the Prefect artifact of a finished grid."""
    n_rows = next((p["rouge"][result["metric"]]["n"] for p in result["points"]), 0)
    chart = write_chart(result, out_dir / CHART_FILE,
                        f"LoRA variants, task {result['task']} ({result['seeds']} seeds, {n_rows} test rows)")
    result["chart"] = str(chart)
    result["seconds"] = time.perf_counter() - t_start
    sweep_json = out_dir / SWEEP_FILE
    sweep_json.write_text(json.dumps(result, indent=2, default=str))
    result["mlflow_run_id"] = log_to_mlflow(ph, result, [chart, sweep_json])
    create_markdown_artifact(key=f"variant-sweep-{result['task']}".lower().replace("_", "-"),
                             markdown=sweep_markdown(result, chart),
                             description=f"LoRA variant sweep for task {result['task']}")
    return result


@flow(name="lora-variant-sweep")
def variant_sweep(
    task: str = "summary",
    variants: list[str] | None = None,
    lr_multipliers: list[float] | None = None,
    seeds: int = 3,
    base_model: str | None = None,
    home: str | None = None,
    data_overrides: dict[str, Any] | None = None,
    train_overrides: list[str] | None = None,
    lora_overrides: list[str] | None = None,
    eval_limit: int | None = None,
    max_concurrency: int | None = None,
    demo_base: dict[str, Any] | None = None,
    tracking_uri: str | None = None,
    loraplus_ratio: float = LORAPLUS_RATIO,
) -> dict[str, Any]:
    """Train and evaluate every (variant, learning-rate multiplier, seed); table, stable ranges, chart."""
    t_start = time.perf_counter()
    variants, multipliers = list(variants or VARIANTS), list(lr_multipliers or LR_MULTIPLIERS)
    workers = max_concurrency if max_concurrency is not None else os.cpu_count() or 1
    check_variant_grid(variants, multipliers, seeds, loraplus_ratio, workers)
    spec = load_spec(task, base_model, data_overrides, train_overrides, lora_overrides, eval_limit)
    ph = PipelineHome.from_env(home, tracking_uri).create()
    base, data_dir, base_eval = prepare_inputs(spec, ph, demo_base)
    out_dir = ph.new_run_dir(spec.name, f"variants-{flow_run.id or 'local'}")
    grid = build_grid(variants, multipliers, seeds)
    setup = shared_setup(spec, ph, base, data_dir, out_dir, min(workers, len(grid)))
    lr = config_learning_rate(spec.lora_config, spec.train_overrides)
    setup |= {"learning_rate": lr, "loraplus_ratio": float(loraplus_ratio)}
    points, failed = run_grid(grid, setup, workers, train_variant_point)
    if not points:
        raise FlowFailedError(f"every point of the variant sweep failed: {failed}")
    result = {"task": spec.name, "metric": spec.metric, "seeds": seeds, "learning_rate": lr,
              "loraplus_ratio": float(loraplus_ratio), "base": _base_scores(base_eval, spec.metric),
              "base_eval": base_eval, "summary": summarize(grid, points, failed, spec.metric, lr),
              "points": points, "failed": failed}
    result = _finish(result, ph, out_dir, t_start)
    get_run_logger().info("variant sweep %s: %d points (%d failed) in %.0f s", spec.name, len(points),
                          len(failed), result["seconds"])
    return result
