"""The serving benchmark runs in its quick setting and writes complete results (no timing asserts).

Run: .venv/bin/pytest tests/test_benchmarks_serving.py -q
"""

from __future__ import annotations

import json

import pytest

from lora_pipeline.benchmarks import bench_serving

pytestmark = pytest.mark.slow


def test_bench_serving_quick(tmp_path):
    path = bench_serving.run(quick=True, out_dir=tmp_path)
    result = json.loads(path.read_text())
    assert result["benchmark"] == "bench_serving" and (tmp_path / "bench_serving.md").is_file()
    names = [f["name"] for f in result["figures"]]
    assert "mixed / one merged model rows/s, 2 tasks, batch 4" in names
    assert "ours / PEFT mixed-batch time, 2 tasks, batch 4" in names
    assert all(f["value"] > 0 for f in result["figures"])
    raw = result["raw"]["tasks"]["2"]
    assert set(raw["seconds"]) == {"mixed", "switching", "merged_per_task", "merged", "peft_mixed",
                                   "merged_again"}
    assert raw["outputs_equal_peft"]  # a speed comparison of different outputs would mean nothing
    memory = raw["resident_bytes"]
    assert memory["one_model"] < memory["mixed_one_base"] < memory["merged_per_task"]
    assert memory["merged_per_task"] == 2 * memory["one_model"]
