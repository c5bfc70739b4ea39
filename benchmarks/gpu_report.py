"""The GPU check's one report: the `gpu` tests' outcome and bench_gpu's figures in gpu_check.{json,md}.

    python -m lora_pipeline.benchmarks.gpu_report --out DIR --tests-rc N --seconds-tests S --seconds-bench S

Called by benchmarks/gpu_check.sh after its two stages; reads DIR/gpu_tests.xml (pytest's JUnit XML) and
DIR/bench_gpu.json, either of which may be missing (a stage that crashed or ran out of time): the report
says so instead of failing. Every figure row bench_gpu can produce is listed; one it did not produce reads
"not measured".
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from lora_module.errors import ArgumentParser, run_cli

BENCH_JSON = "bench_gpu.json"
TESTS_XML = "gpu_tests.xml"
REPORT = "gpu_check"
COMMAND = "bash benchmarks/gpu_check.sh"


def test_counts(xml_path: Path) -> dict:
    """passed / failed / errors / skipped from pytest's JUnit XML (all None when it is missing)."""
    if not xml_path.is_file():
        return {"passed": None, "failed": None, "errors": None, "skipped": None}
    suites = ET.parse(xml_path).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    total, failed, errors, skipped = (int(suite.get(k, 0))
                                      for k in ("tests", "failures", "errors", "skipped"))
    return {"passed": total - failed - errors - skipped, "failed": failed, "errors": errors,
            "skipped": skipped}


def expected_figures() -> list[str]:
    """Names of every figure bench_gpu reports when all of it runs (the report's fixed rows).

    Spelled out rather than imported (importing bench_gpu loads Lightning: seconds per process);
    tests/test_gpu_check.py checks that a dry run fills every one of them.
    """
    names = []
    for label in ("FLAN-T5-base-shaped", "Llama-shaped"):
        names += [f"{label}: ours / PEFT train tokens/s (Lightning)",
                  f"{label}: ours / ours again train tokens/s (A/A control)",
                  f"{label}: ours / PEFT peak memory"]
    return names + ["generation: merged / unmerged tokens/s",
                    "generation: mixed-adapter batch / unmerged tokens/s",
                    "generation: unmerged / unmerged again tokens/s (A/A control)",
                    "7B-shaped: QLoRA / bf16 LoRA peak memory", "7B-shaped: QLoRA step peak memory",
                    "7B-shaped: bf16 LoRA / full step time", "7B-shaped: QLoRA / bf16 LoRA step time"]


def write_report(out: Path, tests_rc: int, seconds: dict[str, float]) -> Path:
    """Write OUT/gpu_check.json and .md; returns the JSON path."""
    bench_path = out / BENCH_JSON
    bench = json.loads(bench_path.read_text()) if bench_path.is_file() else None
    found = {f["name"]: f for f in (bench or {}).get("figures", [])}
    rows = [found.get(name, {"name": name, "value": None, "goal": None, "direction": "", "unit": "",
                             "met": None}) for name in expected_figures()]
    raw = (bench or {}).get("raw", {})
    missing = None if bench else "bench_gpu wrote no results (crashed or timed out)"
    payload = {"command": COMMAND, "dry_run": raw.get("dry_run", False),
               "measured": raw.get("measured", False),
               "reason": raw.get("reason") or missing,
               "machine": (bench or {}).get("machine"), "seconds": seconds,
               "tests": {"rc": tests_rc, **test_counts(out / TESTS_XML)}, "figures": rows, "bench": bench}
    json_path = out / f"{REPORT}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str))
    (out / f"{REPORT}.md").write_text(_markdown(payload))
    return json_path


def _markdown(p: dict) -> str:
    gpu = (p["machine"] or {}).get("gpu") or "none"
    t = p["tests"]
    lines = [f"## GPU check (`{p['command']}`)", ""]
    if p["dry_run"]:
        lines += ["DRY RUN: tiny shapes, 1 repeat, not figures to quote.", ""]
    if p["reason"]:
        lines += [f"Not measured: {p['reason']}.", ""]
    lines += [f"- GPU: {gpu}; stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in p["seconds"].items()),
              f"- `pytest -m gpu tests/test_gpu.py`: exit {t['rc']}, passed {t['passed']}, "
              f"failed {t['failed']}, errors {t['errors']}, skipped {t['skipped']}", "",
              "| figure | value | goal | met |", "| --- | --- | --- | --- |"]
    for f in p["figures"]:
        value = "not measured" if f["value"] is None else f"{f['value']:.3f} {f['unit']}"
        goal = f"{f['direction']} {f['goal']:g}" if f["goal"] is not None else "-"
        met = {True: "yes", False: "no"}.get(f["met"], "-")
        lines.append(f"| {f['name']} | {value} | {goal} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Parse the stage outcomes gpu_check.sh passes, write the report, print its Markdown."""
    parser = ArgumentParser(prog="gpu_report", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the check's output folder")
    parser.add_argument("--tests-rc", type=int, required=True, help="exit status of the pytest stage")
    parser.add_argument("--seconds-tests", type=float, default=0.0, help="wall seconds of the pytest stage")
    parser.add_argument("--seconds-bench", type=float, default=0.0,
                        help="wall seconds of the benchmark stage")
    args = parser.parse_args(argv)
    seconds = {"tests": args.seconds_tests, "bench": args.seconds_bench}
    print(write_report(args.out, args.tests_rc, seconds).with_suffix(".md").read_text())


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
