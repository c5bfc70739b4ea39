"""The rank sweep flow: the recommendation rule, the plateau check, and the flow end to end on the tiny T5
(2 ranks x 2 layer sets, two training steps each) under prefect_test_harness with the embedded MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_flows import read_artifacts

from lora_pipeline.flows.specs import TaskSpecError
from lora_pipeline.flows.sweep import config_anchor, plateau, rank_args, rank_sweep, recommend

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "deploy" / "configs"


def point(target: str, rank: int, mean: float, half: float = 0.02, trainable: int | None = None) -> dict:
    return {"name": f"{target}-r{rank}", "target": target, "rank": rank,
            "trainable": trainable or rank * (100 if target == "attention" else 180),
            "rouge": {"rouge1": {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": 50}}}


def test_recommend_takes_the_smallest_rank_within_the_best_interval():
    points = [point("attention", 1, 0.30), point("attention", 4, 0.47), point("attention", 16, 0.50),
              point("all-linear", 2, 0.45), point("all-linear", 8, 0.49), point("all-linear", 64, 0.51)]
    rec = recommend(points, "rouge1")
    assert rec["best"]["name"] == "all-linear-r64"
    assert rec["interval"] == pytest.approx([0.49, 0.53])
    # r=4 (0.47) is below the best's interval [0.49, 0.53]; all-linear r=8 (0.49) is the smallest inside.
    assert rec["point"]["name"] == "all-linear-r8"
    # A tie on rank goes to the point with fewer trainable parameters.
    tie = recommend([point("attention", 8, 0.50), point("all-linear", 8, 0.50)], "rouge1")
    assert tie["point"]["name"] == "attention-r8"


def test_plateau_check_reads_the_larger_ranks_against_r16():
    flat = [point("attention", 16, 0.50), point("attention", 32, 0.51), point("attention", 64, 0.49)]
    rising = [point("all-linear", 16, 0.40), point("all-linear", 32, 0.47), point("all-linear", 64, 0.50)]
    falling = [point("x", 16, 0.50), point("x", 32, 0.40)]
    out = plateau(flat + rising + falling + [point("short", 8, 0.4)], "rouge1")
    assert out["attention"].startswith("holds")
    assert out["all-linear"].startswith("does not hold, larger ranks gain")
    assert out["x"].startswith("does not hold, larger ranks lose")
    assert out["short"].startswith("not tested")


def test_bad_grid_is_one_clear_error_before_any_work(tmp_path):
    with pytest.raises(TaskSpecError, match=r"ranks must be a non-empty list of integers >= 1, got \[0\]"):
        rank_sweep.fn(task="summary", ranks=[0], home=str(tmp_path))
    with pytest.raises(TaskSpecError, match=r"targets must be some of \['attention', 'all-linear'\]"):
        rank_sweep.fn(task="summary", targets=["mlp"], home=str(tmp_path))
    with pytest.raises(TaskSpecError, match=r"scaling must be one of \['rslora', 'constant'\], got 'sqrt'"):
        rank_sweep.fn(task="summary", scaling="sqrt", home=str(tmp_path))
    assert not (tmp_path / "data").exists()


def test_rank_args_scale_by_rule(tmp_path):
    """The config's rank keeps its scale; rsLoRA's falls as 1/sqrt(r) around it, constant stays."""
    from lora_module import LoraConfig

    def scale(rank, rule, anchor):
        args = rank_args(rank, rule, anchor)
        kw = dict(zip(args[::2], args[1::2], strict=True))
        return LoraConfig(r=int(kw["--model.lora.r"]), lora_alpha=float(kw["--model.lora.lora_alpha"]),
                          use_rslora=kw["--model.lora.use_rslora"] == "true").scaling

    assert [scale(r, "rslora", (4, 16)) for r in (1, 4, 16, 64)] == [8.0, 4.0, 2.0, 1.0]
    assert {scale(r, "constant", (4, 16)) for r in (1, 4, 64)} == {4.0}
    assert scale(8, "rslora", (8, 16)) == pytest.approx(2.0, rel=1e-12)
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  lora:\n    r: 4\n    lora_alpha: 16\n")
    assert config_anchor(str(config), []) == (4, 16.0)
    assert config_anchor(str(config), ["--trainer.max_steps", "5", "--model.lora.r", "8"]) == (8, 16.0)


@pytest.mark.slow
def test_sweep_flow_charts_recommends_and_registers(harness, tmp_path, tiny_t5_dir):
    from mlflow import MlflowClient

    spec = {"name": "tiny_sweep", "data_config": str(CONFIGS / "data_demo_summary.yaml"),
            "lora_config": str(CONFIGS / "demo_summary_lora.yaml"), "base_model": str(tiny_t5_dir),
            "generation": {"batch_size": 8, "max_new_tokens": 8, "max_source_length": 128},
            "data_overrides": {"demo_train_size": 40, "demo_validation_size": 8, "demo_test_size": 12,
                               "max_source_length": 128},
            "train_overrides": ["--trainer.max_steps", "2", "--data.batch_size", "8",
                                "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1"],
            "metric": "rouge1"}
    spec_path = tmp_path / "tiny_sweep.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    home = tmp_path / "home"

    out = rank_sweep(task=str(spec_path), ranks=[4, 1], targets=["attention", "all-linear"], home=str(home),
                     max_concurrency=2)

    assert out["failed"] == {}
    assert sorted((p["target"], p["rank"]) for p in out["points"]) == [
        ("all-linear", 1), ("all-linear", 4), ("attention", 1), ("attention", 4)]
    by_name = {p["name"]: p for p in out["points"]}
    # More layers and a larger rank train more parameters; every point is scored on the same 12 rows.
    assert by_name["attention-r1"]["trainable"] < by_name["attention-r4"]["trainable"]
    assert by_name["attention-r4"]["trainable"] < by_name["all-linear-r4"]["trainable"]
    assert {p["rouge"]["rouge1"]["n"] for p in out["points"]} == {12}
    adapter = Path(by_name["attention-r4"]["run_dir"]) / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    # The default rsLoRA rule keeps the config's scale (r=4, alpha 16: 4) at its rank: alpha' = 16 / sqrt(4).
    assert (saved["r"], saved["lora_alpha"], saved["use_rslora"]) == (4, 8, True)
    assert out["recommended"]["name"] == recommend(out["points"], "rouge1")["point"]["name"]
    chart = Path(out["chart"])
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(out["plateau"]) == {"attention", "all-linear"}  # no r=16 here: "not tested"

    art = read_artifacts("rank-sweep-tiny-sweep")
    assert art and f"Recommended: {out['recommended']['name']}" in art[0].data
    assert "data:image/png" in art[0].data
    store = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    run = client.get_run(out["mlflow_run_id"])
    assert run.data.params["recommended"] == out["recommended"]["name"]
    assert {f.path for f in client.list_artifacts(run.info.run_id)} >= {"rank_sweep.png", "sweep.json"}
    # The recommended adapter went through the gate: version 1 of the task's model is that adapter.
    version = client.get_model_version("tiny_sweep-lora", out["version"])
    assert out["version"] == "1" and out["alias"] in {"champion", "challenger"}
    assert "rouge1" in out["decision"]  # the gate judged it on the spec's metric
    assert version.tags["task"] == "tiny_sweep"
    registered = client.get_run(version.run_id)
    assert registered.info.experiment_id == run.info.experiment_id
