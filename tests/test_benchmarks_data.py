"""The data benchmark runs in its quick setting and writes its JSON + Markdown (no timing asserts).

.venv/bin/pytest tests/test_benchmarks_data.py -q
"""

from __future__ import annotations

import json

from lora_pipeline.benchmarks.bench_data import run


def test_bench_data_quick(tmp_path):
    path = run(quick=True, out_dir=tmp_path)
    result = json.loads(path.read_text())
    figures = {f["name"]: f for f in result["figures"]}
    assert set(figures) == {"cached_vs_cold_speedup", "cold_rows_per_s", "cached_rows_per_s"}
    assert all(f["value"] > 0 for f in figures.values())
    assert figures["cached_vs_cold_speedup"]["goal"] == 20.0
    assert result["raw"]["rows"] == 300 and result["raw"]["split_rows"] == {
        "train": 270,
        "validation": 15,
        "test": 15,
    }
    assert (tmp_path / "bench_data.md").read_text().startswith("## bench_data")
    assert {p.name for p in tmp_path.iterdir()} == {"bench_data.json", "bench_data.md"}
