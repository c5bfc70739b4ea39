"""The evaluation benchmark runs in its quick setting and writes complete results (no timing asserts).

Run: OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_benchmarks_eval.py -q
"""

from __future__ import annotations

import json

from lora_pipeline.benchmarks import bench_eval


def test_bench_eval_quick(tmp_path):
    path = bench_eval.run(quick=True, out_dir=tmp_path)
    result = json.loads(path.read_text())
    assert result["benchmark"] == "bench_eval" and (tmp_path / "bench_eval.md").is_file()
    names = [f["name"] for f in result["figures"]]
    assert "batched+sorted vs one at a time (throughput ratio)" in names
    assert "merged vs unmerged LoRA generation (throughput ratio)" in names
    assert all(f["value"] > 0 for f in result["figures"])
    raw = result["raw"]
    assert set(raw["examples_per_s"]) == {
        "one_at_a_time",
        "batched_unsorted",
        "batched_sorted",
        "lora_unmerged",
        "lora_merged",
    }
    # The contenders must produce the same texts, or the speed comparison would be meaningless.
    assert raw["outputs_identical"]["batched_sorted_vs_one_at_a_time"]
    assert raw["outputs_identical"]["batched_unsorted_vs_one_at_a_time"]
    assert raw["outputs_identical"]["lora_merged_vs_unmerged"]
