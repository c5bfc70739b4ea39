"""The pipeline home: environment precedence, layout, artifact roots, and that the library hands
settings down explicitly (nothing writes os.environ), with the content-addressed base evaluation.

    .venv/bin/pytest tests/test_home.py -q
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from lora_module.home import PipelineHome, artifact_location_for, experiment_name_for
from lora_pipeline.data import DataConfig, prepare


def test_explicit_values_win_over_environment_over_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORA_PIPELINE_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = PipelineHome.from_env()
    assert default.root == tmp_path / ".lora_pipeline"
    assert default.tracking_uri == f"sqlite:///{tmp_path / '.lora_pipeline' / 'mlflow.db'}"

    monkeypatch.setenv("LORA_PIPELINE_HOME", str(tmp_path / "env_home"))
    assert PipelineHome.from_env().root == tmp_path / "env_home"
    assert PipelineHome.from_env().tracking_uri == f"sqlite:///{tmp_path / 'env_home' / 'mlflow.db'}"
    explicit = PipelineHome.from_env(tmp_path / "arg_home")
    assert explicit.root == tmp_path / "arg_home"
    assert explicit.tracking_uri == f"sqlite:///{tmp_path / 'arg_home' / 'mlflow.db'}"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert PipelineHome.from_env("rel").tracking_uri == "http://127.0.0.1:1"
    assert PipelineHome.from_env("rel").root == tmp_path / "rel"  # resolved once, at the edge
    assert PipelineHome.from_env(tracking_uri="http://10.0.0.1:5000").tracking_uri == "http://10.0.0.1:5000"


def test_layout_and_experiment_per_task(tmp_path):
    home = PipelineHome(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert (home.data_dir, home.base_dir, home.locks_dir) == (tmp_path / "data", tmp_path / "base",
                                                              tmp_path / "locks")
    assert home.runs_dir("summary") == tmp_path / "runs" / "summary"
    assert home.evals_dir("summary") == tmp_path / "evals" / "summary"
    run = home.new_run_dir("summary", "0123456789abcdef")
    assert run.parent == home.runs_dir("summary") and run.name.endswith("-01234567")
    assert home.experiment("summary") == experiment_name_for("summary") == "lora-summary"
    assert not tmp_path.joinpath("data").exists()  # naming a folder creates nothing
    with pytest.raises(dataclasses.FrozenInstanceError):
        home.root = tmp_path / "x"  # type: ignore[misc]
    with pytest.raises(ValueError, match="root must be an absolute path"):
        PipelineHome(Path("relative"), "sqlite:///x.db")
    with pytest.raises(ValueError, match="tracking_uri must be a URI"):
        PipelineHome(tmp_path, "mlruns")


def test_artifact_roots_sqlite_beside_store_server_decides(tmp_path):
    sqlite = PipelineHome(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert sqlite.artifact_location("lora-summary") == (tmp_path / "mlartifacts" / "lora-summary").as_uri()
    server = PipelineHome(tmp_path, "http://127.0.0.1:5000")
    assert server.artifact_location("lora-summary") is None
    assert artifact_location_for("https://mlflow.internal", "x") is None
    sqlite.create()
    assert tmp_path.is_dir()


def test_prepare_and_base_evaluation_write_no_environment(tmp_path, monkeypatch, seq2seq_tokenizer_dir,
                                                          tiny_t5_dir):
    """The library takes the home's paths as arguments; the base evaluation is content-addressed."""
    from lora_module.evaluation import baseline
    from lora_module.evaluation.generation import GenerationConfig

    monkeypatch.delenv("LORA_PIPELINE_HOME", raising=False)
    home = PipelineHome.from_env(tmp_path / "home").create()
    before = dict(os.environ)
    prepared = prepare(DataConfig(name="home_test", source="demo", demo_train_size=20, demo_validation_size=4,
                                  demo_test_size=4, tokenizer=str(seq2seq_tokenizer_dir),
                                  output_root=str(home.data_dir), max_source_length=64))
    gen = GenerationConfig(batch_size=4, max_new_tokens=4)
    first = baseline.evaluate_base(str(tiny_t5_dir), prepared.path, home.evals_dir("home_test"), gen, limit=2)
    assert dict(os.environ) == before
    assert prepared.path.parent == home.data_dir and not first.reused
    assert first.path == home.evals_dir("home_test") / f"base-{first.key[:12]}" / "base.eval.json"
    assert json.loads(first.path.read_text())["n"] == 2

    def no_generation(*a, **k):
        raise AssertionError("the stored evaluation should have been reused")

    with monkeypatch.context() as m:
        m.setattr("lora_module.evaluation.evaluate.evaluate_model", no_generation)
        again = baseline.evaluate_base(str(tiny_t5_dir), prepared.path, home.evals_dir("home_test"), gen,
                                       limit=2)
    assert (again.path, again.key, again.reused) == (first.path, first.key, True)
    # Any input that changes the result changes the key: here the row limit and the generation settings.
    other = {baseline.evaluation_key(str(tiny_t5_dir), prepared.path, gen, limit=3),
             baseline.evaluation_key(str(tiny_t5_dir), prepared.path, GenerationConfig(num_beams=2), limit=2)}
    assert first.key not in other and len(other) == 2
