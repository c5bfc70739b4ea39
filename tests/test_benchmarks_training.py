"""The training benchmark runs in its tiny setting and writes well-formed results (no timing asserts).

Run: .venv/bin/pytest tests/test_benchmarks_training.py -q
"""

from __future__ import annotations

import json

from lora_pipeline.benchmarks import bench_training


def test_bench_training_quick_writes_json_and_markdown(tmp_path):
    path = bench_training.run(quick=True, out_dir=tmp_path)
    data = json.loads(path.read_text())
    assert data["benchmark"] == "bench_training"
    names = [f["name"] for f in data["figures"]]
    assert names[0] == "Lightning / bare loop step time (LoRA)"
    assert all(f["value"] > 0 for f in data["figures"])
    raw = data["raw"]
    assert set(raw["step_seconds"]) == {"full", "lora", "qlora"}
    assert raw["parameters"]["full"]["trainable"] == raw["parameters"]["full"]["total"]
    assert raw["parameters"]["lora"] == raw["parameters"]["qlora"]  # same adapter, same logical size
    assert raw["parameters"]["lora"]["trainable"] < raw["parameters"]["lora"]["total"]
    # The NF4 base stores 4-bit weights: fewer bytes than the fp32 LoRA base.
    assert raw["memory_bytes"]["qlora"]["weight_bytes"] < raw["memory_bytes"]["lora"]["weight_bytes"]
    # AdamW keeps two fp32 moments per trainable parameter, plus a step counter per tensor.
    mem, params = raw["memory_bytes"], raw["parameters"]
    for f in ("full", "lora", "qlora"):
        moments = 8 * params[f]["trainable"]
        assert moments <= mem[f]["optimizer_state_bytes"] < moments + 4096, f
    # Adapter-only checkpoints and exports: smaller than the full model's by about the parameter ratio.
    for key in ("checkpoint_bytes", "export_bytes"):
        assert mem["lora"][key] < mem["full"][key] / 3, key
    assert mem["lora"]["export_bytes"] >= 4 * params["lora"]["trainable"]
    figures = {f["name"]: f for f in data["figures"]}
    assert figures["LoRA / full step time"]["goal"] == 0.75
    assert figures["LoRA / full trainable parameters"]["value"] == (
        params["lora"]["trainable"] / params["full"]["trainable"])
    assert len(raw["lightning_vs_bare_step_seconds"]) == 2
    assert "| Lightning / bare loop step time (LoRA) |" in path.with_suffix(".md").read_text()
