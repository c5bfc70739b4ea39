"""The LoRA core benchmark runs in its tiny setting and writes well-formed results (no timing asserts).

Run: .venv/bin/pytest tests/test_benchmarks_core.py -q
"""

from __future__ import annotations

import json

from lora_pipeline.benchmarks import bench_lora_core


def test_bench_lora_core_quick_writes_json_and_markdown(tmp_path):
    path = bench_lora_core.run(quick=True, out_dir=tmp_path)
    data = json.loads(path.read_text())
    assert data["benchmark"] == "bench_lora_core"
    names = [f["name"] for f in data["figures"]]
    assert names[0] == "ours / PEFT train step time"
    assert names[1].startswith("PEFT / PEFT train step time, A/A control")
    assert "LoRA (ours) / full fine-tuning step time" in names
    assert all(f["value"] > 0 for f in data["figures"])
    raw = data["raw"]
    assert set(raw["step_seconds"]) == set(raw["step_cpu_seconds"]) == {"ours", "peft", "full", "peft_again"}
    assert raw["parameters"]["ours"] == raw["parameters"]["peft"]  # same adapter size as PEFT
    assert raw["parameters"]["full"]["trainable"] == raw["parameters"]["full"]["total"]
    assert abs(raw["first_step_loss"]["ours"] - raw["first_step_loss"]["peft"]) < 1e-5  # B = 0: same start
    for memory in raw["memory_bytes"].values():
        assert memory["total"] == memory["activations"] + memory["gradients"] + memory["optimizer_state"] > 0
    markdown = path.with_suffix(".md").read_text()
    assert "| ours / PEFT train step time |" in markdown
    # The profile: every profiled contender ran matmuls, and the table lists them with a total row.
    assert set(raw["profile_ops"]) == {"full", "peft", "ours"}
    assert all(ops["aten::mm"]["calls"] > 0 for ops in raw["profile_ops"].values())
    assert "| operator | full ms | full calls | peft ms | peft calls | ours ms | ours calls |" in markdown
    assert "| aten::mm |" in markdown and "| total |" in markdown
