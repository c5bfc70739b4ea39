"""Benchmarks in their quick settings: the `lora-pipeline bench` runner (benchmarks.suite) and the
in-process component benchmarks (LoRA core, data, evaluation, training) write well-formed JSON and
Markdown results. No timing asserts: figures are only checked to exist and be positive.

    .venv/bin/pytest tests/test_benchmarks.py -q
"""

from __future__ import annotations

import json

import pytest
import torch

from lora_pipeline.benchmarks import bench_data, bench_eval, bench_lora_core, bench_training
from lora_pipeline.benchmarks.suite import HAND_WRITTEN, run_all


# ---- the runner: `lora-pipeline bench` ----------------------------------------------------------
def test_run_all_writes_results(tmp_path):
    md = run_all(("inference", "gpu"), quick=True, out_dir=tmp_path / "out", results_dir=tmp_path)
    payload = json.loads((tmp_path / "RESULTS.json").read_text())
    assert [e["name"] for e in payload["benchmarks"]] == ["inference", "gpu"]
    assert all(e["ok"] for e in payload["benchmarks"]), payload["benchmarks"]
    inference = payload["benchmarks"][0]["result"]
    names = {f["name"] for f in inference["figures"]}
    assert "merged adapter / bare base per-token latency" in names
    assert set(inference["raw"]["per_token_seconds"]) == {"base", "base_again", "merged_unloaded", "merged",
                                                             "unmerged"}
    assert all(f["value"] > 0 for f in inference["figures"])
    assert inference["raw"]["bytes"]["adapter"] < inference["raw"]["bytes"]["full_model"]
    text = md.read_text()
    assert "| inference | merged adapter / bare base per-token latency |" in text
    if not torch.cuda.is_available():
        assert "not measured" in text


def test_a_crashing_benchmark_is_recorded_not_raised(tmp_path, monkeypatch):
    import lora_pipeline.benchmarks.bench_gpu as gpu

    def boom(quick, out_dir):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(gpu, "run", boom)
    run_all(("gpu",), quick=True, out_dir=tmp_path / "out", results_dir=tmp_path)
    entry = json.loads((tmp_path / "RESULTS.json").read_text())["benchmarks"][0]
    assert entry["ok"] is False and "planted failure" in entry["error"]
    assert "failed: RuntimeError: planted failure" in (tmp_path / "RESULTS.md").read_text()


def _failing(message: str):
    def run(quick, out_dir):
        raise RuntimeError(message)

    return run


def test_only_keeps_the_other_benchmarks_entries(tmp_path, monkeypatch):
    """`--only X` re-measures X and keeps the earlier entries of the others, marked with their machine."""
    import lora_pipeline.benchmarks.bench_gpu as gpu

    run_all(("inference", "gpu"), quick=True, out_dir=tmp_path / "out", results_dir=tmp_path)
    before = json.loads((tmp_path / "RESULTS.json").read_text())["benchmarks"]
    monkeypatch.setattr(gpu, "run", _failing("second run"))
    run_all(("gpu",), quick=True, out_dir=tmp_path / "out", results_dir=tmp_path)
    after = json.loads((tmp_path / "RESULTS.json").read_text())["benchmarks"]
    assert [e["name"] for e in after] == ["inference", "gpu"]
    assert after[0] == before[0]
    assert after[1]["ok"] is False and "second run" in after[1]["error"]
    # A full-size run does not mix with quick results.
    monkeypatch.setattr(gpu, "run", _failing("full"))
    run_all(("gpu",), quick=False, out_dir=tmp_path / "out", results_dir=tmp_path)
    assert [e["name"] for e in json.loads((tmp_path / "RESULTS.json").read_text())["benchmarks"]] == ["gpu"]


def test_hand_written_sections_survive_a_run(tmp_path, monkeypatch):
    """The demo's hand-measured section (below the marker) outlives a rewrite; text above it does not."""
    import lora_pipeline.benchmarks.bench_gpu as gpu

    hand = f"{HAND_WRITTEN}\n\n## Demo\n\n| seed | recovered |\n| 0 | 93% |\n"
    (tmp_path / "RESULTS.md").write_text("# stale table above the marker\n\n" + hand)
    monkeypatch.setattr(gpu, "run", _failing("planted"))
    run_all(("gpu",), quick=True, out_dir=tmp_path / "out", results_dir=tmp_path)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "stale table" not in text and "failed: RuntimeError: planted" in text
    assert text.endswith(hand) and text.count(HAND_WRITTEN) == 1


# ---- the LoRA core ------------------------------------------------------------------------------
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


# ---- data preparation ---------------------------------------------------------------------------
def test_bench_data_quick(tmp_path):
    path = bench_data.run(quick=True, out_dir=tmp_path)
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


# ---- evaluation ---------------------------------------------------------------------------------
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


# ---- training -----------------------------------------------------------------------------------
def test_bench_training_quick_writes_json_and_markdown(tmp_path):
    path = bench_training.run(quick=True, out_dir=tmp_path)
    data = json.loads(path.read_text())
    assert data["benchmark"] == "bench_training"
    names = [f["name"] for f in data["figures"]]
    assert names[0] == "Lightning / bare loop step time (LoRA)"
    # The overhead figure adds a difference of two tiny-model medians (one round in quick mode): on a busy
    # machine its sign is noise, so check that it is computed from its own detail; every other is a ratio.
    derived = [f for f in data["figures"] if "from the per-step overhead" in f["name"]]
    assert len(derived) == 1
    detail = derived[0]["detail"]
    expected = (detail["bare_s"] + detail["overhead_s_per_step"]) / detail["bare_s"]
    assert derived[0]["value"] == pytest.approx(expected)
    assert [f["name"] for f in data["figures"] if f not in derived and not f["value"] > 0] == []
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
