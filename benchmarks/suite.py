"""`lora-pipeline bench`: run every benchmark and write benchmarks/RESULTS.md + RESULTS.json.

    lora-pipeline bench                            # full size, CPU here (tens of minutes on 2 cores)
    lora-pipeline bench --quick                    # tiny settings (a smoke run, not figures to quote)
    lora-pipeline bench --only lora_core inference # re-measure these, keep the others' entries

Each benchmark measures its contenders side by side in one process and reports ratios with
their goals. A benchmark that crashes is recorded as failed with its error; the others still run.
Sections measured by hand (the demo's quality and wall times) sit below the HAND_WRITTEN marker in
RESULTS.md; a run rewrites everything above it and keeps them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from lora_pipeline.benchmarks.common import OUT_DIR, machine_info

BENCHMARKS = ("lora_core", "training", "recipe", "inference", "serving", "data", "eval", "pipeline", "gpu")
HERE = Path(__file__).resolve().parent
HAND_WRITTEN = "<!-- Measured by hand, not by `lora-pipeline bench`: it keeps everything from here on. -->"


def run_all(names: tuple[str, ...] = BENCHMARKS, quick: bool = False, out_dir: Path | None = None,
            results_dir: Path = HERE) -> Path:
    """Run the named benchmarks, then write RESULTS.md and RESULTS.json in `results_dir`."""
    out = Path(out_dir or OUT_DIR)
    entries = []
    for name in names:
        t0 = time.perf_counter()
        try:
            bench = importlib.import_module(f"lora_pipeline.benchmarks.bench_{name}")
            json_path = bench.run(quick=quick, out_dir=out)
            payload = json.loads(Path(json_path).read_text())
            entries.append({"name": name, "ok": True, "seconds": time.perf_counter() - t0, "result": payload,
                            "markdown": Path(json_path).with_suffix(".md").read_text()})
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            entries.append({"name": name, "ok": False, "seconds": time.perf_counter() - t0,
                            "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
    machine = machine_info()
    for e in entries:
        e["measured_on"] = machine
    entries = _keep_earlier(results_dir / "RESULTS.json", entries, quick)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "RESULTS.json").write_text(
        json.dumps({"machine": machine, "quick": quick, "benchmarks": entries}, indent=2, default=str))
    md = results_dir / "RESULTS.md"
    md.write_text(_markdown(machine, quick, entries) + _hand_written(md))
    return md


def _hand_written(path: Path) -> str:
    """The earlier RESULTS.md from the HAND_WRITTEN marker on ("" when there is none)."""
    text = path.read_text() if path.exists() else ""
    at = text.find(HAND_WRITTEN)
    return "\n" + text[at:] if at >= 0 else ""


def _keep_earlier(path: Path, entries: list[dict], quick: bool) -> list[dict]:
    """The new entries plus the earlier file's entries for benchmarks not run now (same --quick only).

    So `--only inference` re-measures one benchmark without dropping the others' figures, and a GPU
    machine can add its section to results measured elsewhere.
    """
    if not path.exists():
        return entries
    earlier = json.loads(path.read_text())
    if earlier.get("quick") != quick:
        return entries
    by_name = {e["name"]: e for e in earlier.get("benchmarks", [])} | {e["name"]: e for e in entries}
    return [by_name[n] for n in BENCHMARKS if n in by_name]


def _markdown(machine: dict, quick: bool, entries: list[dict]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    lines = [
        "# Benchmark results",
        "",
        f"Written by `lora-pipeline bench{' --quick' if quick else ''}`. Every figure is a ratio of two "
        "contenders measured side by side in the same run; absolute timings are in RESULTS.json.",
        "",
        f"- CPU: {machine['cpu']} ({machine['cores']} threads used by torch)",
        f"- GPU: {machine['gpu'] or 'none'}",
        f"- Python {machine['python']}; {versions}",
    ]
    here = (machine["cpu"], machine["gpu"])
    for e in entries:
        other = e.get("measured_on") or machine
        if (other["cpu"], other["gpu"]) != here:
            lines.append(f"- `{e['name']}` was measured in an earlier run on another machine: "
                         f"{other['cpu']}, GPU {other['gpu'] or 'none'}")
    lines += [
        "",
        "| benchmark | figure | value | goal | met |",
        "| --- | --- | --- | --- | --- |",
    ]
    for e in entries:
        if not e["ok"]:
            lines.append(f"| {e['name']} | failed: {e['error'][:120]} | - | - | - |")
            continue
        figures = e["result"]["figures"]
        if not figures:
            reason = e["result"]["raw"].get("reason", "no figures")
            lines.append(f"| {e['name']} | {reason} | - | - | - |")
        for f in figures:
            goal = f"{f['direction']} {f['goal']:g}" if f["goal"] is not None else "-"
            met = {True: "yes", False: "no", None: "-"}[f["met"]]
            lines.append(f"| {e['name']} | {f['name']} | {f['value']:.3f} {f['unit']} | {goal} | {met} |")
    lines += ["", "## Details", ""]
    for e in entries:
        lines += [e.get("markdown") or f"## {e['name']}\n\nfailed: {e.get('error')}\n", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """`lora-pipeline bench [--quick] [--only NAME ...]`: run, write the results, print RESULTS.md."""
    parser = argparse.ArgumentParser(prog="lora-pipeline bench", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings: a smoke run, not figures to quote (default: off, full size)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME",
                        help=f"run only these, keeping the others' earlier entries; from {list(BENCHMARKS)} "
                             "(None: all)")
    parser.add_argument("--results-dir", type=Path, default=HERE,
                        help=f"where RESULTS.md and RESULTS.json are written (default: {HERE})")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR,
                        help=f"where each benchmark writes its own JSON + Markdown (default: {OUT_DIR})")
    args = parser.parse_args(argv)
    print(run_all(tuple(args.only or BENCHMARKS), quick=args.quick, out_dir=args.out_dir,
                  results_dir=args.results_dir).read_text())
