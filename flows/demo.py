"""The offline demo: the whole pipeline for the `summary` and `topic` tasks on one CPU machine.

    ./run.sh demo                      # = .venv/bin/lora-pipeline demo
    lora-pipeline demo --home /tmp/lp --no-full
    lora-pipeline demo --family causal # a chat task on a small Llama with a chat template

What it does, with nothing downloaded: builds the demo base model (a small T5 pretrained by
denoising on the generated demo corpus; cached), then runs the many-task flow for both tasks
against the embedded Prefect (a temporary local server, its database under the pipeline home) and
the embedded MLflow (SQLite under the pipeline home): prepare the data, evaluate the base, fully
fine-tune, train LoRA, evaluate, report, register each adapter through the promotion gate. It then
prints the ROUGE table per task, what it measured (wall time per stage, cache hits), and how to
open the results in the MLflow and Prefect UIs. A second run reuses the base model, the prepared
data and the base evaluations, so it is faster.

`--family causal` runs the same flow for the chat task `chat_summary` (deploy/tasks/chat_summary.yaml:
the summary asked as a user turn, rendered by the tokenizer's chat template) on the causal demo base,
a small Llama with a chat template built the same way (lora_module/training/demo_causal.py; cached).

Pipeline home (`lora_module.home.PipelineHome`): `--home`, else `$LORA_PIPELINE_HOME`, else
`./.lora_pipeline`; MLflow at `$MLFLOW_TRACKING_URI`, else `<home>/mlflow.db`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from lora_module.errors import ArgumentParser
from lora_module.evaluation.report import rouge_table
from lora_module.home import PipelineHome

# Sizes that keep the demo within minutes on 2 CPU cores; the task specs' own configs are left as
# written (they describe a longer run) and these are passed as overrides. 300 test rows, not fewer:
# with 100, one score's sampling noise alone (+-3 ROUGE-1) moved LoRA's recovered share by +-10 points.
DEMO_BASE = {"corpus_size": 2000, "steps": 300}
DEMO_DATA = {"demo_train_size": 1200, "demo_validation_size": 48, "demo_test_size": 300,
             "max_source_length": 192}
DEMO_TRAIN = ["--trainer.max_steps", "200", "--trainer.log_every_n_steps", "25",
              "--trainer.enable_progress_bar", "false", "--data.batch_size", "16"]
# Per-method overrides on top of DEMO_TRAIN: none. Learning rates are each task's and method's own, in
# deploy/configs/demo_<task>_<full|lora>.yaml, chosen by a sweep on the validation split at these 200
# steps (benchmarks/RESULTS.md, "Demo").
DEMO_FULL: list[str] = []
DEMO_LORA: list[str] = []
# The causal demo (`--family causal`): its base (a build_demo_base argument) and its task. Sizes as
# above; the learning rates are in deploy/configs/demo_chat_<full|lora>.yaml (benchmarks/RESULTS.md,
# "Causal demo").
DEMO_CAUSAL_BASE = {"family": "causal", "corpus_size": 2000}
# 3,000 training dialogues (the data config's own size), not 1,200: at 200 steps of 16 that is about one
# epoch, where 1,200 rows were seen nearly three times and full fine-tuning's extra capacity memorized
# them (LoRA recovered 89% of its gain on 1,200 rows, 92% on 3,000: benchmarks/RESULTS.md, "Causal demo:
# a stronger base"). Only tokenizing grows; the steps stay 200.
DEMO_CAUSAL_DATA = {**DEMO_DATA, "demo_train_size": 3000}
DEMO_CAUSAL = "demo-causal"  # a task spec's base_model naming the causal demo base (chat_summary's)
FAMILIES: dict[str, dict[str, Any]] = {
    "seq2seq": {"tasks": ["summary", "topic"], "demo_base": DEMO_BASE, "data": DEMO_DATA, "train": DEMO_TRAIN,
                "record": "demo_last_run.json"},
    "causal": {"tasks": ["chat_summary"], "demo_base": DEMO_CAUSAL_BASE, "data": DEMO_CAUSAL_DATA,
               "train": DEMO_TRAIN, "record": "demo_causal_last_run.json"},
}
STAGES = ("base_model", "prepare", "evaluate_base", "train_full", "evaluate_full", "train_lora",
          "evaluate_lora", "report", "register")


def demo_base_for(task: str) -> tuple[str | None, dict[str, Any]]:
    """(base_model override, build_demo_base settings) for a demo task: a spec whose base_model is
    "demo-causal" runs on the causal demo base (built as "demo" with the causal family's settings)."""
    from lora_pipeline.flows.specs import load_task_spec

    if load_task_spec(task).base_model == DEMO_CAUSAL:
        return "demo", DEMO_CAUSAL_BASE
    return None, DEMO_BASE


def demo_data_for(task: str) -> dict[str, Any]:
    """The demo's data overrides for a demo task: the causal family's for a task on the causal base."""
    return DEMO_CAUSAL_DATA if demo_base_for(task)[1] is DEMO_CAUSAL_BASE else DEMO_DATA


def configure_environment(home: PipelineHome) -> None:
    """Prefect's and Hugging Face's own settings: offline, no telemetry, Prefect's database in the home.

    Must run before Prefect is imported: its settings are read at import time. The pipeline's own
    settings are not passed this way: the home is handed to the flow as parameters.
    """
    defaults = {
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }
    if not os.environ.get("PREFECT_API_URL"):
        # The temporary server's database lives with the rest of the demo's outputs: deleting the
        # home starts from scratch.
        prefect_home = home.root / "prefect"
        defaults["PREFECT_HOME"] = str(prefect_home)
        prefect_home.mkdir(parents=True, exist_ok=True)  # Prefect does not create it for its database
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def recovered_share(rouge: dict[str, dict[str, Any]], metric: str = "rouge1") -> float | None:
    """(LoRA - base) / (full - base): the share of full fine-tuning's gain over the base that LoRA
    recovers (None without a full baseline or when full fine-tuning gained nothing)."""
    if not {"base", "full", "lora"} <= set(rouge):
        return None
    gain = rouge["full"][metric] - rouge["base"][metric]
    return (rouge["lora"][metric] - rouge["base"][metric]) / gain if gain > 0 else None


def recovered_line(result: dict[str, Any]) -> list[str]:
    """The printout's line for one task: recovered share of the ROUGE-1 gain and parameters trained."""
    share = recovered_share(result["rouge"])
    if share is None:
        return []
    lora = result["train_metrics"].get("lora") or {}
    trained = lora.get("trainable_params")
    total = lora.get("total_params")
    size = f", training {100 * trained / total:.2f}% of the parameters" if trained and total else ""
    return [f"  LoRA recovers {100 * share:.0f}% of full fine-tuning's ROUGE-1 gain over the base{size}"]


def render(summary: dict[str, Any], wall: float, flow_wall: float, home: PipelineHome) -> str:
    """The demo's closing printout: ROUGE tables, registered versions, timings and where to look."""
    out = ["", "=" * 78, "LoRA pipeline demo: results", "=" * 78]
    for name, r in summary["results"].items():
        out += ["", f"Task {name!r}: ROUGE (x100) on {r['rouge_n']} test examples",
                rouge_table(r["rouge"], "text", "  "), *recovered_line(r),
                f"  registered {r['model_name']} v{r['version']} as {r['alias']!r}: {r['decision']}",
                f"  report: {r['report_md']}"]
    for name, err in summary["failed"].items():
        out += ["", f"Task {name!r} FAILED: {err}"]

    out += ["", "What it measured (wall seconds; the tasks ran concurrently, so their stages overlap)"]
    names = list(summary["results"])
    out.append(f"  {'stage':<15}" + "".join(f"{n:>12}" for n in names))
    for stage in STAGES:
        cells = []
        for n in names:
            r = summary["results"][n]
            sec = r["timings"].get(stage)
            cells.append("-" if sec is None else f"{sec:.1f}" + ("c" if r["cached"].get(stage) else ""))
        out.append(f"  {stage:<15}" + "".join(f"{c:>12}" for c in cells))
    out.append("  (c = reused: the same inputs' folder was already in the pipeline home)")
    out.append(f"  base model build/check {summary['base_seconds']:.1f} s, parameter validation "
               f"{summary['validate_seconds']:.1f} s")
    overhead = flow_wall - summary["seconds"]
    out.append(f"  flow {summary['seconds']:.1f} s, Prefect start-up and teardown {overhead:.1f} s, "
               f"demo total {wall:.1f} s")

    models = ", ".join(r["model_name"] for r in summary["results"].values())
    experiments = ", ".join(f"lora-{name}" for name in [*summary["results"], *summary["failed"]])
    uri = home.tracking_uri
    ui = (f".venv/bin/mlflow ui --backend-store-uri {uri} --port 5000\n               then http://127.0.0.1:5000"
          if uri.startswith("sqlite:") else uri)
    prefect_home = os.environ.get("PREFECT_HOME", "~/.prefect")
    out += [
        "",
        "Where the results are",
        f"  everything:  {home.root}  (data/, base/, evals/, runs/, mlflow.db, prefect/)",
        f"  MLflow UI:   {ui}",
        f"               -> Models ({models or 'none registered'}) and Experiments ({experiments})",
        f"  Prefect UI:  PREFECT_HOME={prefect_home} .venv/bin/prefect server start",
        "               then http://127.0.0.1:4200 -> Runs (lora-tasks, lora-task) and Artifacts (rouge-*)",
        "  registry:    .venv/bin/lora-pipeline list",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """`lora-pipeline demo [--home DIR] ...`; returns the exit status (1 if a task failed)."""
    parser = ArgumentParser(prog="lora-pipeline demo",
                            description="Run the offline LoRA pipeline demo (summary + topic on the demo T5, "
                            "or --family causal: chat_summary on the demo Llama).",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--family", choices=list(FAMILIES), default="seq2seq",
                        help="seq2seq: tasks summary and topic on the demo T5; causal: the chat task "
                        "chat_summary on the demo Llama with a chat template")
    parser.add_argument("--home", type=Path,
                        help="pipeline home (None: $LORA_PIPELINE_HOME, else ./.lora_pipeline)")
    parser.add_argument("--task", action="append", dest="tasks",
                        help="demo task to run, repeatable (None: the family's: summary and topic, or "
                        "chat_summary)")
    parser.add_argument("--no-full", action="store_true", help="skip the full fine-tuning baseline")
    parser.add_argument("--max-concurrency", type=int, default=2, help="tasks run at the same time at most")
    args = parser.parse_args(argv)
    return run_demo(PipelineHome.from_env(args.home), args.tasks, not args.no_full, args.max_concurrency,
                    family=args.family)


def run_demo(home: PipelineHome, tasks: list[str] | None = None, train_full: bool = True,
             max_concurrency: int = 2, family: str = "seq2seq", settings: dict[str, Any] | None = None
             ) -> int:
    """Run the demo's flow in `home`, print its results; returns the exit status (1 if a task failed).

    `family` picks the base and the default tasks (FAMILIES); `settings` replaces entries of that
    family's settings (tests pass a tiny base and a few steps)."""
    t_start = time.perf_counter()
    run = {**FAMILIES[family], **(settings or {})}
    tasks = tasks or run["tasks"]
    home.create()
    configure_environment(home)

    from lora_pipeline.flows.pipeline import many_tasks  # after the environment: Prefect reads it on import

    print(f"LoRA pipeline demo: tasks {tasks}, home {home.root}", flush=True)
    t0 = time.perf_counter()
    # base_model "demo" with the family's demo_base: build_base builds that family's base (cached).
    summary = many_tasks(
        tasks=tasks, base_model="demo", home=str(home.root), tracking_uri=home.tracking_uri,
        data_overrides=run["data"], train_overrides=run["train"], lora_overrides=DEMO_LORA,
        full_overrides=DEMO_FULL, train_full=train_full, max_concurrency=max_concurrency,
        allow_partial=True, demo_base=run["demo_base"],
    )
    flow_wall = time.perf_counter() - t0
    wall = time.perf_counter() - t_start
    for r in summary["results"].values():
        r["rouge_n"] = json.loads(Path(r["report"]).read_text())["n"]
    print(render(summary, wall, flow_wall, home), flush=True)
    record = {"family": family, "wall_seconds": wall, "flow_wall_seconds": flow_wall, "summary": summary}
    (home.root / run["record"]).write_text(json.dumps(record, indent=2, default=str))
    return 1 if summary["failed"] else 0
