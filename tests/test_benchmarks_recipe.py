"""The recipe benchmark runs in its tiny setting and writes well-formed results (no timing asserts).

Run: .venv/bin/pytest tests/test_benchmarks_recipe.py -q
"""

from __future__ import annotations

import json
import math

import pytest

from lora_pipeline.benchmarks import bench_recipe

pytestmark = pytest.mark.slow


def test_bench_recipe_quick_writes_three_contenders_with_positive_figures(tmp_path):
    path = bench_recipe.run(quick=True, out_dir=tmp_path)
    data = json.loads(path.read_text())
    assert data["benchmark"] == "bench_recipe"
    raw = data["raw"]
    assert list(raw["contenders"]) == ["recipe_max_length", "recipe_dynamic", "ours"]
    steps = bench_recipe.SETTINGS["quick"]["steps"]
    for name, result in raw["contenders"].items():
        assert result["steps"] == steps, name
        for key in ("wall_seconds", "loop_seconds", "tokens_per_second", "rss_loop_peak_bytes"):
            assert result[key] > 0, (name, key)
        assert result["loop_seconds"] < result["wall_seconds"], name
        assert math.isfinite(result["train_loss"]), name
        for key in bench_recipe.ROUGE_KEYS:
            summary = raw["rouge"][name][key]
            assert summary["ci_low"] <= summary["mean"] <= summary["ci_high"], (name, key)
            assert summary["n"] == bench_recipe.SETTINGS["quick"]["test_rows"]
    # The same rows for everyone: the non-pad token counts agree, and max_length padding adds tokens.
    tokens = {r["tokens"] for r in raw["contenders"].values()}
    assert len(tokens) == 1
    padded = raw["contenders"]["recipe_max_length"]["padded_tokens"]
    assert padded >= raw["contenders"]["recipe_dynamic"]["padded_tokens"] == tokens.pop()

    figures = {f["name"]: f for f in data["figures"]}
    # Each figure is ours over the named recipe (not the other way round).
    c = raw["contenders"]
    for recipe in ("recipe_max_length", "recipe_dynamic"):
        assert figures[f"ours / {recipe} wall time"]["value"] == pytest.approx(
            c["ours"]["wall_seconds"] / c[recipe]["wall_seconds"])
        assert figures[f"ours / {recipe} non-pad tokens/s"]["value"] == pytest.approx(
            c["ours"]["tokens_per_second"] / c[recipe]["tokens_per_second"])
    assert figures["ours / recipe_max_length wall time"]["goal"] == 0.5
    assert figures["ours / recipe_dynamic wall time"]["goal"] == 0.95
    timing = [f for f in data["figures"] if "CI" not in f["name"]]
    assert len(timing) == 8 and all(f["value"] > 0 for f in timing)
    inside = [f for f in data["figures"] if "CI" in f["name"]]
    assert len(inside) == 4 and all(f["value"] in (0.0, 1.0) and f["met"] is not None for f in inside)
    if raw["device"] == "cpu":
        assert raw["cuda_peak_memory"].startswith("not measured")
    markdown = path.with_suffix(".md").read_text()
    assert markdown.startswith("## bench_recipe\n")
    assert "| ours / recipe_dynamic wall time |" in markdown
    assert markdown.count("\n| ") == len(data["figures"]) + 2  # header, separator, one row per figure
