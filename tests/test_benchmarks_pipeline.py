"""benchmarks/bench_pipeline.py in quick mode: both contenders run and the figures are written."""

from __future__ import annotations

import json

import pytest

from lora_pipeline.benchmarks.bench_pipeline import run


@pytest.mark.slow
def test_quick_pipeline_benchmark(tmp_path):
    path = run(quick=True, out_dir=tmp_path)
    result = json.loads(path.read_text())
    figures = {f["name"]: f for f in result["figures"]}
    share = figures["Prefect + MLflow share of wall time"]
    assert share["goal"] == 0.10 and share["detail"]["orchestrated_s"] > 0 and share["detail"]["plain_s"] > 0
    startup = next(f for n, f in figures.items() if n.startswith("Prefect temporary server start-up"))
    assert 0 < startup["value"] < share["detail"]["orchestrated_s"]
    without = next(f for n, f in figures.items() if n.startswith("Prefect + MLflow share without"))
    assert without["goal"] == 0.10 and without["value"] < share["value"]
    stages = result["raw"]["stages"]
    assert {"summary/prepare", "summary/train_lora", "summary/register"} <= set(stages)
    assert stages["summary/train_lora"]["plain"] > 0
    assert result["raw"]["orchestrated"]["tasks"]["summary"]["version"] == "1"
    assert (tmp_path / "bench_pipeline.md").read_text().startswith("## bench_pipeline")
