"""Training through its entry points: `lora-pipeline fit ...` (LightningCLI) and `run_fit` (subprocess).

    .venv/bin/pytest tests/test_training_cli.py -q            # add -m "not slow" to skip the DDP run

The real deploy config `demo_summary_lora.yaml` is used, with the model/data/output paths and a
few steps overridden, so the shipped config is what gets exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import Namespace
from mlflow_server import client_for
from test_training import prepare_tiny

from lora_module import LoraModel, load_base_model
from lora_module.errors import SettingsError
from lora_module.home import PipelineHome
from lora_module.training.cli import LoraCLI, check_config, main
from lora_module.training.datamodule import PreparedDataModule
from lora_module.training.launcher import TrainingError, run_fit
from lora_module.training.module import FineTuneModule

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "deploy" / "configs" / "demo_summary_lora.yaml"


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory, seq2seq_tokenizer_dir) -> Path:
    return prepare_tiny(seq2seq_tokenizer_dir, "seq2seq", tmp_path_factory.mktemp("prepared"))


def overrides(model_dir: Path, prepared: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--model.model_name_or_path",
        str(model_dir),
        "--data.prepared_dir",
        str(prepared),
        "--model.output_dir",
        str(out),
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_steps",
        str(steps),
        "--trainer.max_epochs",
        "-1",
        "--data.batch_size",
        "4",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.log_every_n_steps",
        "1",
        *extra,
    ]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_t5_dir, prepared_dir) -> dict:
    """One `run_fit` of 4 steps logged to a temporary MLflow SQLite store and a task's experiment
    (given as arguments, not through the environment), then resumed to 6 steps."""
    home = PipelineHome.from_env(tmp_path_factory.mktemp("home"))
    tracking = {"tracking_uri": home.tracking_uri, "experiment": home.experiment("cli_test")}
    env = {"OMP_NUM_THREADS": "1"}
    out = home.root / "run"
    args = overrides(tiny_t5_dir, prepared_dir, out, 4, "--model.checkpoint_every_n_steps", "2")
    first = json.loads((run_fit(DEMO_CONFIG, args, env=env, **tracking) / "metrics.json").read_text())
    args = overrides(tiny_t5_dir, prepared_dir, out, 6, "--model.checkpoint_every_n_steps", "2")
    assert run_fit(DEMO_CONFIG, args, env=env, resume=True, **tracking) == out.resolve()
    return {"out": out, "uri": home.tracking_uri, "home": home, "first": first,
            "second": json.loads((out / "metrics.json").read_text())}


def test_run_fit_writes_outputs_and_logs_to_mlflow(cli_run, tiny_t5_dir, prepared_dir):

    out, first = cli_run["out"], cli_run["first"]
    assert first["steps"] == 4 and first["finetune"] == "lora"
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["data"]["prepared_dir"] == str(prepared_dir)
    assert config["model"]["lora"]["r"] == 4 and config["trainer"]["max_steps"] == 6
    model = LoraModel.from_pretrained(load_base_model(str(tiny_t5_dir)), out / "adapter")
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)

    client = client_for(cli_run["uri"])
    run = client.get_run(first["mlflow_run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "lora-cli_test"
    assert experiment.artifact_location == cli_run["home"].artifact_location("lora-cli_test")
    assert run.data.params["trainable_params"] == str(first["trainable_params"])
    assert "train/loss" in run.data.metrics and "train/tokens_per_sec" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "adapter",
        "metrics.json",
        "config.yaml",
    }


def test_run_fit_resume_continues_step_count(cli_run):
    second = cli_run["second"]
    assert second["steps"] == 6
    log = (cli_run["out"] / "logs" / "fit.log").read_text()
    assert "--ckpt_path" in log and "Restoring states from the checkpoint path" in log


def test_validate_and_predict_subcommands(cli_run, tiny_t5_dir, prepared_dir, tmp_path, capsys):
    ckpt = cli_run["out"] / "checkpoints" / "last.ckpt"
    base = overrides(tiny_t5_dir, prepared_dir, tmp_path, 1, "--trainer.logger", "false")
    cli = LoraCLI(args=["validate", "--config", str(DEMO_CONFIG), *base, "--ckpt_path", str(ckpt)])
    val = cli.trainer.callback_metrics["val/loss"].item()
    assert val == pytest.approx(cli_run["second"]["val_loss"], rel=1e-4)  # same adapter, same split
    LoraCLI(
        args=[
            "predict",
            "--config",
            str(DEMO_CONFIG),
            *base,
            "--ckpt_path",
            str(ckpt),
            "--model.max_new_tokens",
            "4",
        ]
    )
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(isinstance(r["prediction"], str) and r["references"] for r in rows)


def test_print_config_shows_resolved_values(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(DEMO_CONFIG), "--model.lora.r", "2", "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["lora"]["r"] == 2 and printed["model"]["finetune"] == "lora"
    assert printed["trainer"]["logger"]["class_path"].endswith("PipelineMLFlowLogger")


def test_bad_config_fails_before_building_anything(tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(DEMO_CONFIG), "--model.lora.r", "0", "--model.output_dir", str(out),
              "--model.model_name_or_path", str(tmp_path / "base"),
              "--data.prepared_dir", str(tmp_path / "data")])
    assert e.value.code == 2
    assert "model.lora: LoraConfig.r must be an integer >= 1, got 0" in capsys.readouterr().err
    assert not out.exists()


# Each value is checked in one place: the CLI's config check calls the module's own check, so both say
# the same words, and the config check fails before anything is built (the folders here do not exist).
SHARED_CHECKS = [
    ("model", "learning_rate", -1.0, "model.learning_rate must be > 0, got -1.0",
     lambda d: FineTuneModule(str(d / "no_base"), learning_rate=-1.0)),
    ("model", "warmup_ratio", 1.5, "model.warmup_ratio must be in [0, 1), got 1.5",
     lambda d: FineTuneModule(str(d / "no_base"), warmup_ratio=1.5)),
    ("data", "batch_size", 0, "data.batch_size must be >= 1, got 0",
     lambda d: PreparedDataModule(str(d / "no_data"), batch_size=0)),
    ("data", "eval_batch_size", 0, "data.eval_batch_size must be >= 1, got 0",
     lambda d: PreparedDataModule(str(d / "no_data"), eval_batch_size=0)),
]


@pytest.mark.parametrize(("section", "key", "value", "message", "build"), SHARED_CHECKS,
                         ids=[c[1] for c in SHARED_CHECKS])
def test_config_check_and_module_share_one_check(section, key, value, message, build, tmp_path):
    config = Namespace(model=Namespace(), data=Namespace())
    config[section][key] = value
    with pytest.raises(SettingsError) as from_config:
        check_config(config)
    with pytest.raises(SettingsError) as from_module:
        build(tmp_path)
    assert str(from_config.value) == str(from_module.value) == message


def test_run_fit_failure_raises_with_log_tail(tiny_t5_dir, tmp_path):
    with pytest.raises(TrainingError) as err:
        run_fit(
            DEMO_CONFIG,
            overrides(tiny_t5_dir, tmp_path / "missing", tmp_path / "out", 2),
            env={"OMP_NUM_THREADS": "1"},
        )
    message = str(err.value)
    assert "exit code" in message and "is not a prepared-data folder" in message
    with pytest.raises(TrainingError, match="invalid training configuration"):
        run_fit(DEMO_CONFIG, ["--model.finetune", "wrong"])


@pytest.mark.slow
def test_ddp_two_cpu_processes_write_one_loadable_adapter(tiny_t5_dir, prepared_dir, tmp_path):
    out = tmp_path / "ddp"
    args = overrides(
        tiny_t5_dir,
        prepared_dir,
        out,
        3,
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.logger",
        "false",
        "--data.group_by_length",
        "true",
    )
    run_fit(DEMO_CONFIG, args, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter",
        "checkpoints",
        "config.yaml",
        "current",
        "exports",
        "logs",
        "metrics.json",
    ]
    assert len(list((out / "exports").iterdir())) == 1  # rank 0 alone exported
    model = LoraModel.from_pretrained(load_base_model(str(tiny_t5_dir)), out / "adapter")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.isfinite(p).all() for p in lora_b) and any(p.abs().sum() > 0 for p in lora_b)
