"""`lora-pipeline bench` (benchmarks.suite) runs benchmarks on a tiny setting and writes well-formed results."""

from __future__ import annotations

import json

import torch

from lora_pipeline.benchmarks.suite import HAND_WRITTEN, run_all


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
