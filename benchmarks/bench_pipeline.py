"""The demo pipeline's wall time, per stage, and the share taken by Prefect and MLflow themselves.

    lora-pipeline bench --only pipeline                # the demo's sizes, both tasks (minutes)
    from lora_pipeline.benchmarks.bench_pipeline import run; run(quick=True, out_dir=tmp)  # tiny model

Two contenders do the same work on the same prebuilt base model, each in a fresh process and a
fresh pipeline home (so nothing is cached), one after the other:

- orchestrated: `flows.pipeline.many_tasks` as the demo runs it: Prefect's temporary server,
  task runs, artifacts, training logged to MLflow (SQLite) and each adapter registered;
- plain: the same stage functions called directly (tasks in threads, as many at once), training
  with `--trainer.logger false`, no registration.

Share of Prefect + MLflow = (orchestrated - plain) / orchestrated wall time, goal <= 10%. A third
child times a no-op flow in a fresh process and database: the start-up of Prefect's temporary
server, which the demo pays once per run and a deployment (workers and a running server) does
not; the share is also reported without it. The orchestrated run's per-stage wall times (flow
side) and each task's own time (inside the task) are reported too; their difference is Prefect's
bookkeeping per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lora_pipeline.benchmarks.common import OUT_DIR, Figure, write_results

NAME = "bench_pipeline"
QUICK_DATA = {"demo_train_size": 40, "demo_validation_size": 8, "demo_test_size": 8, "max_source_length": 128}
QUICK_TRAIN = ["--trainer.max_steps", "2", "--data.batch_size", "8", "--trainer.enable_progress_bar", "false"]


def _settings(quick: bool) -> dict[str, Any]:
    from lora_pipeline.flows.demo import DEMO_DATA, DEMO_FULL, DEMO_LORA, DEMO_TRAIN

    if quick:
        return {"tasks": ["summary"], "data": QUICK_DATA, "train": QUICK_TRAIN, "lora": [], "full": [],
                "train_full": False, "eval_limit": 8}
    return {"tasks": ["summary", "topic"], "data": DEMO_DATA, "train": DEMO_TRAIN, "lora": DEMO_LORA,
            "full": DEMO_FULL, "train_full": True, "eval_limit": None}


def _tiny_base(folder: Path) -> Path:
    """A 2-layer T5 (d_model 32) with a small tokenizer trained on the demo corpus: the quick base."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from lora_pipeline.data.demo_corpus import generate
    from lora_pipeline.data.tokenizer import train_tokenizer

    rows = generate(200, 7)
    texts = [r[k] for r in rows for k in ("dialogue", "summary", "topic")]
    tok = AutoTokenizer.from_pretrained(train_tokenizer(texts, folder / "tokenizer", 600, "seq2seq"))
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="relu",
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False)
    out = folder / "base"
    T5ForConditionalGeneration(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ---- the two contenders (each runs in a child process) -------------------------------------------
def _orchestrated(home: Path, base: str, quick: bool) -> dict[str, Any]:
    from lora_pipeline.flows.pipeline import many_tasks

    s = _settings(quick)
    summary = many_tasks(tasks=s["tasks"], base_model=base, home=str(home), data_overrides=s["data"],
                         train_overrides=s["train"], lora_overrides=s["lora"], full_overrides=s["full"],
                         eval_limit=s["eval_limit"], train_full=s["train_full"])
    return {"seconds_in_flow": summary["seconds"],
            "tasks": {n: {k: r[k] for k in ("timings", "inner", "rouge", "version")}
                      for n, r in summary["results"].items()}}


def _plain_task(spec: Any, home: Path, threads: int) -> dict[str, float]:
    from lora_module.evaluation.evaluate import GenerationConfig, ModelSpec, evaluate_model
    from lora_module.evaluation.report import build_report
    from lora_module.training.launcher import run_fit
    from lora_pipeline.data import DataConfig, prepare

    timings: dict[str, float] = {}

    def timed(stage: str, fn: Any, *args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        timings[stage] = time.perf_counter() - t0
        return out

    overrides = {**spec.data_overrides, "tokenizer": spec.base_model, "output_root": str(home / "data")}
    data_dir = timed("prepare", prepare, DataConfig.from_yaml(spec.data_config, overrides)).path
    gen = GenerationConfig.from_dict(spec.generation)
    run = home / "runs" / spec.name
    base = ModelSpec("base", "base", spec.base_model)
    evals = [timed("evaluate_base", evaluate_model, base, data_dir, run / "eval", gen, limit=spec.eval_limit)]
    env = {"OMP_NUM_THREADS": str(threads)}
    for kind, config in (("full", spec.full_config), ("lora", spec.lora_config)):
        if not config:
            continue
        args = ["--model.model_name_or_path", spec.base_model, "--data.prepared_dir", str(data_dir),
                *spec.train_overrides, *spec.training_overrides(kind), "--model.output_dir", str(run / kind),
                "--trainer.logger", "false"]
        timed(f"train_{kind}", run_fit, config, args, env=env)
        model = ModelSpec(kind, kind, str(run / kind))
        evals.append(timed(f"evaluate_{kind}", evaluate_model, model, data_dir, run / "eval", gen,
                           limit=spec.eval_limit))
    timed("report", build_report, spec.name, evals, run / "report")
    return timings


def _plain(home: Path, base: str, quick: bool) -> dict[str, Any]:
    import torch

    from lora_pipeline.flows.pipeline import load_specs

    s = _settings(quick)
    home.mkdir(parents=True, exist_ok=True)
    specs = load_specs(s["tasks"], base, s["data"], s["train"], s["eval_limit"], s["train_full"],
                       lora_overrides=s["lora"], full_overrides=s["full"])
    workers = min(2, len(specs))
    threads = max(1, (os.cpu_count() or 1) // workers)
    if workers > 1:
        torch.set_num_threads(threads)
    with ThreadPoolExecutor(workers) as pool:
        futures = {spec.name: pool.submit(_plain_task, spec, home, threads) for spec in specs}
        return {"tasks": {n: {"timings": f.result()} for n, f in futures.items()}}


def _server_startup(home: Path, base: str, quick: bool) -> dict[str, Any]:
    """Seconds from calling a no-op flow to its body running: Prefect's temporary server start-up."""
    from prefect import flow

    started: list[float] = []
    noop = flow(name="bench-noop")(lambda: started.append(time.perf_counter()))
    t0 = time.perf_counter()
    noop()
    return {"startup_s": started[0] - t0, "tasks": {}}


CHILDREN = {"orchestrated": _orchestrated, "plain": _plain, "server": _server_startup}


def _child(mode: str, home: Path, base: str, quick: bool, out: Path) -> None:
    from lora_module.home import PipelineHome
    from lora_pipeline.flows.demo import configure_environment

    configure_environment(PipelineHome.from_env(home).create())
    t0 = time.perf_counter()
    result = CHILDREN[mode](home, base, quick)
    result["seconds_in_process"] = time.perf_counter() - t0
    out.write_text(json.dumps(result, default=str))


def _run_child(mode: str, scratch: Path, base: str, quick: bool) -> dict[str, Any]:
    out = scratch / f"{mode}.json"
    cmd = [sys.executable, "-m", "lora_pipeline.benchmarks.bench_pipeline", "--child", mode,
           "--home", str(scratch / mode),
           "--base", base, "--out", str(out), *(["--quick"] if quick else [])]
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        tail = f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        raise RuntimeError(f"{mode} run failed ({res.returncode}):\n{tail}")
    return {**json.loads(out.read_text()), "wall": wall}


def run(quick: bool = False, out_dir: Path | None = None) -> Path:
    """Time the pipeline with and without Prefect + MLflow; returns the JSON path."""
    scratch = Path(tempfile.mkdtemp(prefix="bench_pipeline-"))
    try:
        t0 = time.perf_counter()
        if quick:
            base = str(_tiny_base(scratch))
        else:
            from lora_module.home import PipelineHome
            from lora_module.training.demo_base import build_demo_base
            from lora_pipeline.flows.demo import DEMO_BASE

            # The demo's base model, built once in the default pipeline home.
            base = str(build_demo_base(PipelineHome.from_env().base_dir, **DEMO_BASE))
        base_seconds = time.perf_counter() - t0
        plain = _run_child("plain", scratch, base, quick)
        orch = _run_child("orchestrated", scratch, base, quick)
        server = _run_child("server", scratch, base, quick)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    share = (orch["wall"] - plain["wall"]) / orch["wall"]
    stages: dict[str, dict[str, float]] = {}
    for name, r in orch["tasks"].items():
        for stage, sec in r["timings"].items():
            row = stages.setdefault(f"{name}/{stage}", {})
            row["orchestrated"] = sec
            row["task_own"] = r["inner"].get(stage, 0.0)
            row["plain"] = plain["tasks"].get(name, {}).get("timings", {}).get(stage)
    prefect_bookkeeping = sum(v["orchestrated"] - v["task_own"] for v in stages.values())
    registration = sum(v["orchestrated"] for k, v in stages.items() if k.endswith("/register"))
    startup = orch["wall"] - orch["seconds_in_flow"]
    # The temporary server is what the demo pays and a deployment does not: its workers talk to a
    # Prefect server that is already running.
    without_server = (orch["wall"] - server["startup_s"] - plain["wall"]) / orch["wall"]
    figures = [
        Figure("Prefect + MLflow share of wall time", share, goal=0.10, unit="",
               detail={"orchestrated_s": orch["wall"], "plain_s": plain["wall"]}),
        Figure("Prefect + MLflow share without the temporary server's start-up (as with a running server)",
               without_server, goal=0.10, unit="",
               detail={"server_startup_s": server["startup_s"]}),
        Figure("orchestrated wall", orch["wall"], unit="s"),
        Figure("plain wall", plain["wall"], unit="s"),
        Figure("process start + Prefect server start-up/teardown", startup, unit="s"),
        Figure("Prefect temporary server start-up (a no-op flow in a fresh process and database)",
               server["startup_s"], unit="s"),
        Figure("Prefect bookkeeping around tasks (sum over stages)", prefect_bookkeeping, unit="s"),
        Figure("MLflow registration (sum over tasks)", registration, unit="s"),
    ]
    raw = {"quick": quick, "base_model_seconds": base_seconds, "stages": stages, "orchestrated": orch,
           "plain": plain, "server_startup": server}
    return write_results(NAME, figures, raw, out_dir or OUT_DIR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", choices=tuple(CHILDREN))
    parser.add_argument("--home", type=Path)
    parser.add_argument("--base")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.home, args.base, args.quick, args.out)
        return
    path = run(quick=args.quick)
    print(Path(path).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
