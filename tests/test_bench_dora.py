"""bench_lora_core's DoRA rows (issue 23): ours vs PEFT's DoRA step, DoRA vs LoRA, on the quick setting.

    .venv/bin/python -m pytest tests/test_bench_dora.py -q

`bench_lora_core.run` appends these figures to its own and keeps the raw numbers under `dora`
(tests/test_benchmarks.py runs the whole quick benchmark; this checks the DoRA part alone).
"""

from __future__ import annotations

from lora_pipeline.benchmarks import bench_lora_core as bench


def test_dora_rows_compare_ours_with_peft_and_lora():
    setting = bench.SETTINGS["quick"]
    batch = bench.make_batch(setting)
    lora = bench.build("ours", setting)
    bench.train_step(*lora, batch)
    figures, raw = bench.measure_dora(lora, setting, batch)
    by_name = {f.name: f for f in figures}
    assert list(by_name) == ["ours / PEFT train step time, DoRA", "DoRA / LoRA step time (ours)",
                             "ours / PEFT training memory, DoRA", "DoRA / LoRA training memory (ours)"]
    assert by_name["ours / PEFT train step time, DoRA"].goal == 1.0
    assert all(f.value > 0 for f in figures) and all(f.goal is None for f in figures[1:])
    assert set(raw["step_seconds"]) == {"ours", "ours_dora", "peft_dora"}
    # Same adapter as PEFT's (A, B and one magnitude per adapted output row), and the same first loss.
    assert raw["trainable"]["ours_dora"] == raw["trainable"]["peft_dora"] > raw["trainable"]["ours"]
    assert abs(raw["first_step_loss"]["ours_dora"] - raw["first_step_loss"]["peft_dora"]) < 1e-5
    total = {name: m["total"] for name, m in raw["memory_bytes"].items()}
    assert by_name["DoRA / LoRA training memory (ours)"].value == total["ours_dora"] / total["ours"]
