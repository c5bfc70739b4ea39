"""`python -m benchmarks` runs benchmarks on a tiny setting and writes well-formed results."""

from __future__ import annotations

import json

import torch

from benchmarks.__main__ import run_all


def test_run_all_writes_results(tmp_path):
    md = run_all(("inference", "gpu"), quick=True, out_dir=tmp_path / "out", results_dir=tmp_path)
    payload = json.loads((tmp_path / "RESULTS.json").read_text())
    assert [e["name"] for e in payload["benchmarks"]] == ["inference", "gpu"]
    assert all(e["ok"] for e in payload["benchmarks"]), payload["benchmarks"]
    inference = payload["benchmarks"][0]["result"]
    names = {f["name"] for f in inference["figures"]}
    assert "merged adapter / bare base per-token latency" in names
    assert all(f["value"] > 0 for f in inference["figures"])
    assert inference["raw"]["bytes"]["adapter"] < inference["raw"]["bytes"]["full_model"]
    text = md.read_text()
    assert "| inference | merged adapter / bare base per-token latency |" in text
    if not torch.cuda.is_available():
        assert "not measured" in text


def test_a_crashing_benchmark_is_recorded_not_raised(tmp_path, monkeypatch):
    import benchmarks.bench_gpu as gpu

    def boom(quick, out_dir):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(gpu, "run", boom)
    run_all(("gpu",), quick=True, out_dir=tmp_path / "out", results_dir=tmp_path)
    entry = json.loads((tmp_path / "RESULTS.json").read_text())["benchmarks"][0]
    assert entry["ok"] is False and "planted failure" in entry["error"]
    assert "failed: RuntimeError: planted failure" in (tmp_path / "RESULTS.md").read_text()
