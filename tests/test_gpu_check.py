"""The prepared GPU check, `benchmarks/gpu_check.sh --dry-run`, on the CPU: so the script cannot rot unseen.

    .venv/bin/pytest tests/test_gpu_check.py -q

The dry run takes the same code path as the real check (the `gpu` tests, then bench_gpu through the
Lightning path, generation and the 7B-shaped QLoRA section on tiny shapes) and must write the same
JSON + Markdown schema, every figure row filled. No timing asserts: dry-run figures mean nothing.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from lora_pipeline.benchmarks.gpu_report import expected_figures

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
GOALS = {"FLAN-T5-base-shaped: ours / PEFT train tokens/s (Lightning)": (">=", 1.0),
         "Llama-shaped: ours / PEFT train tokens/s (Lightning)": (">=", 1.0),
         "7B-shaped: QLoRA / bf16 LoRA peak memory": ("<=", 0.35),
         "7B-shaped: QLoRA step peak memory": ("<=", 10.0)}


@pytest.mark.slow  # ~35 s on 2 shared cores: two Python processes, 12 Lightning fits, generation, NF4
def test_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / "check"
    res = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["measured"] is True and report["reason"] is None
    assert report["tests"]["rc"] == 0 and report["tests"]["failed"] == 0 and report["tests"]["errors"] == 0
    # on a CPU every gpu test is skipped (with its reason); on a GPU they run and pass
    assert report["tests"]["skipped"] + report["tests"]["passed"] >= 10

    names = [f["name"] for f in report["figures"]]
    assert names == expected_figures() and len(names) == 13
    for f in report["figures"]:
        assert isinstance(f["value"], float) and math.isfinite(f["value"]) and f["value"] > 0, f
        assert f["detail"] == {"dry_run": True}
    assert {f["name"]: (f["direction"], f["goal"]) for f in report["figures"] if f["goal"]} == GOALS

    md = (out / "gpu_check.md").read_text()
    assert "DRY RUN" in md and "not measured" not in md
    for name in names:
        assert f"| {name} | " in md
    assert (out / "bench_gpu.md").read_text().startswith("DRY RUN")
    raw = report["bench"]["raw"]
    assert set(raw["training"]) == {"t5", "llama"}
    assert set(raw["llama7b"]["peak_bytes"]) == {"qlora", "lora", "full"}


def test_missing_stages_are_reported_not_raised(tmp_path):
    """A benchmark that crashed or timed out leaves a report whose rows say "not measured"."""
    from lora_pipeline.benchmarks.gpu_report import write_report

    path = write_report(tmp_path, tests_rc=124, seconds={"tests": 150.0, "bench": 300.0})
    report = json.loads(path.read_text())
    assert report["tests"] == {"rc": 124, "passed": None, "failed": None, "errors": None, "skipped": None}
    assert "crashed or timed out" in report["reason"] and all(f["value"] is None for f in report["figures"])
    md = path.with_suffix(".md").read_text()
    assert md.count("| not measured |") == len(expected_figures())


def test_bad_arguments_are_one_line_errors(tmp_path):
    res = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    expected = "error: gpu_check.sh: unknown argument '--bogus' (valid: --dry-run, --out DIR)"
    assert res.stderr.strip() == expected
