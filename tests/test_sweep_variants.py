"""The variant sweep (`lora-pipeline sweep --variant ...`, flows/variant_sweep.py): the grid, the training
overrides each point gets, argument checks, the summary table from made-up point results, and one tiny
run end to end on the tiny T5 (slow lane).

    .venv/bin/python -m pytest tests/test_sweep_variants.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lora_module import contracts as c
from lora_module.errors import UsageError
from lora_module.evaluation.evaluate import ModelSpec
from lora_module.training.cli import parse_config
from lora_pipeline.flows import sweep_cli
from lora_pipeline.flows.specs import TaskSpecError
from lora_pipeline.flows.variant_sweep import (
    SWEEP_FILE,
    VARIANTS,
    build_grid,
    config_learning_rate,
    render,
    summarize,
    sweep_markdown,
    variant_args,
    variant_sweep,
    write_chart,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "deploy" / "configs"
RUN_PATHS = ["--model.model_name_or_path", "b", "--data.prepared_dir", "d"]


def test_grid_is_every_variant_multiplier_and_seed_seed_major():
    grid = build_grid(["lora", "dora"], [2, 1], 2)
    assert [g["name"] for g in grid] == ["lora-lr1x-s0", "dora-lr1x-s0", "lora-lr2x-s0", "dora-lr2x-s0",
                                         "lora-lr1x-s1", "dora-lr1x-s1", "lora-lr2x-s1", "dora-lr2x-s1"]
    assert build_grid(["loraplus"], [0.0625], 1) == [
        {"name": "loraplus-lr0_0625x-s0", "variant": "loraplus", "multiplier": 0.0625, "seed": 0}]
    # Point names become evaluation names: they must pass the evaluation's name check.
    ModelSpec("loraplus-lr0_0625x-s0", "lora", "adapter")


@pytest.mark.parametrize("variant, dora, ratio", [("lora", False, None), ("dora", True, None),
                                                   ("loraplus", False, 4.0)])
def test_variant_overrides_parse_in_the_training_cli(variant, dora, ratio, tmp_path):
    # A config that turns both switches on: each variant sets both, so the config's choice never leaks.
    config = tmp_path / "c.yaml"
    doc = yaml.safe_load((CONFIGS / "demo_summary_lora.yaml").read_text())
    doc["model"]["lora"]["use_dora"], doc["model"]["loraplus_lr_ratio"] = True, 8.0
    config.write_text(yaml.safe_dump(doc))
    parsed = parse_config(["--config", str(config), *RUN_PATHS, *variant_args(variant, 4.0)], quiet=True)
    assert (parsed.model.lora.use_dora, parsed.model.loraplus_lr_ratio) == (dora, ratio)


def test_learning_rate_comes_from_config_then_overrides(tmp_path):
    assert config_learning_rate(str(CONFIGS / "demo_summary_lora.yaml"), []) == 5e-3
    assert config_learning_rate(str(CONFIGS / "demo_summary_lora.yaml"),
                                ["--data.batch_size", "8", "--model.learning_rate", "1e-2"]) == 1e-2
    bare = tmp_path / "bare.yaml"
    bare.write_text("model:\n  finetune: lora\n")
    assert config_learning_rate(str(bare), []) == 1e-4  # FineTuneModule's default


@pytest.mark.parametrize("kwargs, message", [
    ({"variants": ["qlora"]},
     r"variants must be distinct names among \['lora', 'dora', 'loraplus'\], got \['qlora'\]"),
    ({"variants": ["lora", "lora"]}, r"variants must be distinct names"),
    ({"lr_multipliers": [1, 0]}, r"lr_multipliers must be distinct numbers > 0, got \[1, 0\]"),
    ({"lr_multipliers": [2, 2.0]}, r"lr_multipliers must be distinct numbers > 0"),
    ({"seeds": 0}, r"seeds must be an integer >= 1 \(seeds 0..N-1\), got 0"),
    ({"loraplus_ratio": float("nan")}, r"loraplus_ratio must be a number > 0, got nan"),
    ({"max_concurrency": 0}, r"max_concurrency must be an integer >= 1, got 0"),
])
def test_bad_sweep_settings_are_one_clear_error_before_any_work(kwargs, message, tmp_path):
    with pytest.raises(TaskSpecError, match=message):
        variant_sweep.fn(task="summary", home=str(tmp_path), **kwargs)
    assert not (tmp_path / "data").exists()


def test_command_line_picks_the_sweep_and_refuses_mixing():
    assert not sweep_cli.parse_args([]).variant_mode
    args = sweep_cli.parse_args(["--variant", "dora", "--variant", "loraplus", "--lr-multiplier", "1", "2.5"])
    assert args.variant_mode and args.variants == ["dora", "loraplus"] and args.lr_multipliers == [1.0, 2.5]
    assert sweep_cli.parse_args(["--seeds", "2"]).variant_mode
    assert sweep_cli.VARIANTS == VARIANTS
    with pytest.raises(UsageError, match=r"the rank sweep's --rank, --scaling and the variant sweep's .* "
                                         r"do not mix"):
        sweep_cli.parse_args(["--seeds", "3", "--rank", "4", "--scaling", "constant"])
    for bad in (["--lr-multiplier", "0"], ["--seeds", "-1"], ["--loraplus-ratio", "inf"]):
        with pytest.raises(UsageError, match=r"must be > 0, got"):
            sweep_cli.parse_args(bad)
    with pytest.raises(UsageError, match=r"invalid choice: 'vera'"):
        sweep_cli.parse_args(["--variant", "vera"])


def fake_point(variant: str, multiplier: float, seed: int, score: float) -> dict:
    return {"name": f"{variant}-lr{multiplier:g}x-s{seed}", "variant": variant, "multiplier": multiplier,
            "seed": seed, "lr": 5e-3 * multiplier, "train_loss": 1.0,
            "rouge": {"rougeL": {"mean": score, "n": 10}, "rouge1": {"mean": score + 0.1, "n": 10}}}


def fake_result() -> dict:
    grid = build_grid(["lora", "dora"], [1, 2], 3)
    scores = {("lora", 1): [0.40, 0.42, 0.38], ("lora", 2): [0.41, 0.10, None],
              ("dora", 1): [0.39, 0.41, 0.40], ("dora", 2): [0.43, 0.44, 0.42]}
    points = [fake_point(v, m, s, score) for (v, m), row in scores.items() for s, score in enumerate(row)
              if score is not None]
    failed = {"lora-lr2x-s2": "non-finite training loss at global step 7"}
    return {"task": "summary", "metric": "rougeL", "seeds": 3, "learning_rate": 5e-3, "loraplus_ratio": 16.0,
            "base": {"rougeL": 0.08, "rouge1": 0.09}, "points": points, "failed": failed,
            "summary": summarize(grid, points, failed, "rougeL", 5e-3), "chart": "c.png", "seconds": 12.0}


def test_summary_table_from_fake_points(tmp_path):
    result = fake_result()
    cells = {(c["variant"], c["multiplier"]): c for c in result["summary"]["cells"]}
    assert (cells[("lora", 1.0)]["mean"], cells[("lora", 1.0)]["sd"]) == pytest.approx((0.40, 0.02))
    assert cells[("lora", 1.0)]["rouge1_mean"] == pytest.approx(0.50)
    # lora x2: seed 1 scored 0.10 (< half of the sweep's best mean, dora x2's 0.43) and seed 2 failed.
    assert cells[("lora", 2.0)]["collapsed"] == 2 and cells[("lora", 2.0)]["failed"] == ["lora-lr2x-s2"]
    assert cells[("lora", 2.0)]["lr"] == pytest.approx(1e-2)
    assert result["summary"]["variants"] == {
        "lora": {"best": {"multiplier": 1.0, "mean": pytest.approx(0.40), "sd": pytest.approx(0.02),
                          "rouge1_mean": pytest.approx(0.50)}, "stable": [1.0]},
        "dora": {"best": {"multiplier": 2.0, "mean": pytest.approx(0.43), "sd": pytest.approx(0.01),
                          "rouge1_mean": pytest.approx(0.53)}, "stable": [1.0, 2.0]}}
    text = render(result)
    row = next(line.split() for line in text.splitlines() if line.split()[:2] == ["lora", "2"])
    assert row == ["lora", "2", "0.01", "25.5", "+-", "21.9", "41.0", "10.0", "35.5", "+-", "21.9", "2/3"]
    assert "dora: stable at x1, x2; best x2: rougeL 43.0 +- 1.0, rouge1 53.0" in text
    assert "lora: stable at x1; best x1" in text
    assert "FAILED lora-lr2x-s2: non-finite training loss at global step 7" in text
    assert "base (zero-shot) rougeL 8.0 rouge1 9.0" in text
    chart = write_chart(result, tmp_path / "chart.png", "t")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = sweep_markdown(result, chart)
    assert "| dora | 2 | 0.01 | 43.0 +- 1.0 | 43.0 44.0 42.0 | 53.0 +- 1.0 | 0/3 |" in markdown
    assert "data:image/png;base64," in markdown


@pytest.mark.slow
def test_variant_sweep_runs_end_to_end_on_the_tiny_t5(harness, tmp_path, tiny_t5_dir):
    """Three trainings of 2 steps (lora, dora, loraplus) in subprocesses, each evaluated on 8 rows: ~40 s."""
    from mlflow import MlflowClient

    spec = {"name": "tiny_variants", "data_config": str(CONFIGS / "data_demo_summary.yaml"),
            "lora_config": str(CONFIGS / "demo_summary_lora.yaml"), "base_model": str(tiny_t5_dir),
            "generation": {"batch_size": 8, "max_new_tokens": 8, "max_source_length": 128},
            "data_overrides": {"demo_train_size": 32, "demo_validation_size": 8, "demo_test_size": 8,
                               "max_source_length": 128},
            "train_overrides": ["--trainer.max_steps", "2", "--data.batch_size", "8",
                                "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
                                "--model.lora.target_modules", '["q", "v"]'],
            "metric": "rouge1"}
    spec_path = tmp_path / "tiny_variants.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    home = tmp_path / "home"

    out = variant_sweep(task=str(spec_path), variants=list(VARIANTS), lr_multipliers=[2], seeds=1,
                        home=str(home), max_concurrency=3)

    assert out["failed"] == {}
    by_name = {p["name"]: p for p in out["points"]}
    assert sorted(by_name) == ["dora-lr2x-s0", "lora-lr2x-s0", "loraplus-lr2x-s0"]
    assert {p["lr"] for p in out["points"]} == {1e-2}
    assert {p["rouge"]["rouge1"]["n"] for p in out["points"]} == {8}
    # Each training got its variant: DoRA saved magnitude vectors, LoRA+ recorded its ratio.
    configs = {n: yaml.safe_load((Path(p["run_dir"]) / c.CONFIG_FILE).read_text())["model"]
               for n, p in by_name.items()}
    assert [configs[f"{v}-lr2x-s0"]["loraplus_lr_ratio"] for v in VARIANTS] == [None, None, 16.0]
    assert [configs[f"{v}-lr2x-s0"]["lora"]["use_dora"] for v in VARIANTS] == [False, True, False]
    adapter_dir = Path(by_name["dora-lr2x-s0"]["run_dir"]) / c.ADAPTER_DIR
    adapter = json.loads((adapter_dir / c.ADAPTER_CONFIG_FILE).read_text())
    assert adapter["use_dora"] is True
    # DoRA trains a magnitude per adapted output row on top of LoRA's A and B.
    assert by_name["dora-lr2x-s0"]["trainable"] > by_name["lora-lr2x-s0"]["trainable"]
    assert by_name["loraplus-lr2x-s0"]["trainable"] == by_name["lora-lr2x-s0"]["trainable"]
    saved = json.loads((Path(out["chart"]).parent / SWEEP_FILE).read_text())
    assert saved["summary"]["variants"].keys() == set(VARIANTS)
    assert Path(out["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}").get_run(out["mlflow_run_id"])
    assert run.data.params["metric"] == "rouge1" and "rouge1_dora_x2" in run.data.metrics


def test_a_variant_that_fails_everywhere_has_no_stable_rate():
    """Collapse is judged against the sweep's best cell, so uniformly poor scores are not 'stable'."""
    grid = build_grid(["lora", "loraplus"], [1, 2], 1)
    scores = {("lora", 1): 0.40, ("lora", 2): 0.38, ("loraplus", 1): 0.05, ("loraplus", 2): 0.06}
    points = [fake_point(v, m, 0, score) for (v, m), score in scores.items()]
    summary = summarize(grid, points, {}, "rougeL", 5e-3)
    assert summary["collapse_below"] == pytest.approx(0.40)
    assert summary["variants"]["lora"]["stable"] == [1.0, 2.0]
    assert summary["variants"]["loraplus"]["stable"] == []
    assert summary["variants"]["loraplus"]["best"]["multiplier"] == 2.0
