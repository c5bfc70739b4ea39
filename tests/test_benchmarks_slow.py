"""End-to-end benchmarks in their quick settings (minutes of work even when quick: `slow`): the
training recipe against transformers' Trainer, mixed-adapter serving against PEFT, and the pipeline
with and without Prefect + MLflow (its own temporary Prefect server: also `integration`). Each
writes well-formed JSON and Markdown results; no timing asserts.

    .venv/bin/pytest tests/test_benchmarks_slow.py -q
"""

from __future__ import annotations

import json
import math

import pytest

from lora_pipeline.benchmarks import bench_pipeline, bench_recipe, bench_serving

pytestmark = pytest.mark.slow


# ---- the training recipe ------------------------------------------------------------------------
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


# ---- serving ------------------------------------------------------------------------------------
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


# ---- the pipeline with and without Prefect + MLflow ---------------------------------------------
@pytest.mark.integration
def test_quick_pipeline_benchmark(tmp_path):
    path = bench_pipeline.run(quick=True, out_dir=tmp_path)
    result = json.loads(path.read_text())
    figures = {f["name"]: f for f in result["figures"]}
    share = figures["Prefect + MLflow share of wall time"]
    assert share["goal"] == 0.10 and share["detail"]["orchestrated_s"] > 0 and share["detail"]["plain_s"] > 0
    startup = next(f for n, f in figures.items() if n.startswith("Prefect temporary server start-up"))
    assert 0 < startup["value"] < share["detail"]["orchestrated_s"]
    without = next(f for n, f in figures.items() if n.startswith("Prefect + MLflow share without"))
    assert without["goal"] == 0.10 and without["value"] < share["value"]
    stages = result["raw"]["stages"]
    assert {"summary/prepare", "summary/train_lora", "summary/register"} <= set(stages)
    assert stages["summary/train_lora"]["plain"] > 0
    assert result["raw"]["orchestrated"]["tasks"]["summary"]["version"] == "1"
    assert (tmp_path / "bench_pipeline.md").read_text().startswith("## bench_pipeline")
