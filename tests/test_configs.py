"""Every YAML file under deploy/ loads through the parser of its kind; bad training configs fail clearly.

    .venv/bin/pytest tests/test_configs.py -q

Dispatch by name and content: `data_*.yaml` -> `data.DataConfig.from_yaml`; `prefect.yaml` -> YAML
with deployments that name a flow entrypoint; a YAML with a `model` or `trainer` section -> the
training CLI parser (parse only: nothing is built or trained); anything else must at least be
valid YAML. Files that do not exist yet are simply not collected.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lora_module.training.cli import parse_config
from lora_pipeline.data import DataConfig

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
YAMLS = sorted(p for ext in ("*.yaml", "*.yml") for p in DEPLOY.rglob(ext))
DEMO_CONFIG = DEPLOY / "configs" / "demo_summary_lora.yaml"
# Training YAMLs name no base or prepared folder (those are run-specific): a run passes both.
RUN_PATHS = ["--model.model_name_or_path", "base/model", "--data.prepared_dir", "prepared/data"]


def kind(path: Path) -> str:
    if path.name.startswith("data_"):
        return "data"
    if path.name in ("prefect.yaml", "prefect.yml"):
        return "prefect"
    doc = yaml.safe_load(path.read_text())
    if isinstance(doc, dict) and ({"model", "trainer"} & doc.keys()):
        return "training"
    return "other"


@pytest.mark.parametrize("path", YAMLS, ids=[str(p.relative_to(DEPLOY)) for p in YAMLS])
def test_deploy_yaml_loads(path: Path):
    k = kind(path)
    if k == "data":
        assert DataConfig.from_yaml(path).name
    elif k == "prefect":
        doc = yaml.safe_load(path.read_text())
        assert isinstance(doc.get("deployments"), list) and doc["deployments"], (
            "prefect.yaml needs deployments"
        )
        for dep in doc["deployments"]:
            # Module paths (no `file.py:`): a worker imports the installed package, not a checkout.
            assert dep.get("name") and dep.get("entrypoint", "").startswith("lora_pipeline.flows."), dep
    elif k == "training":
        config = parse_config(["--config", str(path), *RUN_PATHS])
        assert config.model.finetune in ("lora", "qlora", "full")
        assert config.model.output_dir and config.data.prepared_dir == "prepared/data"
        # No placeholder paths in the file itself: a path in it must be a real one or a Hub name.
        doc = yaml.safe_load(path.read_text())
        assert "prepared_dir" not in doc.get("data", {})
        assert not str(doc["model"].get("model_name_or_path", "org/name")).startswith((".", "/"))
    else:
        yaml.safe_load(path.read_text())


def test_training_configs_exist():
    names = {p.name for p in YAMLS if kind(p) == "training"}
    expected = {f"demo_{t}_{f}.yaml" for t in ("summary", "topic") for f in ("lora", "full")}
    assert expected | {"flan_t5_dialogsum_lora.yaml", "flan_t5_dialogsum_full.yaml"} <= names


def test_reference_experiment_settings():
    lora = parse_config(["--config", str(DEPLOY / "configs" / "flan_t5_dialogsum_lora.yaml"), *RUN_PATHS[2:]])
    assert lora.model.model_name_or_path == "google/flan-t5-base" and lora.model.finetune == "lora"
    assert (lora.model.lora.r, lora.model.lora.lora_alpha, lora.model.lora.lora_dropout) == (32, 32, 0.05)
    assert lora.model.lora.target_modules == ["q", "v"] and lora.model.learning_rate == 1e-3
    assert lora.trainer.precision == "bf16-mixed"
    full = parse_config(["--config", str(DEPLOY / "configs" / "flan_t5_dialogsum_full.yaml"), *RUN_PATHS[2:]])
    assert full.model.finetune == "full" and full.model.learning_rate == 1e-5


def _bad_config(tmp_path: Path, edit) -> Path:
    doc = yaml.safe_load(DEMO_CONFIG.read_text())
    edit(doc)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    ("edit", "messages"),
    [
        (lambda d: d["model"]["lora"].update(r=0), ["model.lora", "r must be an integer >= 1, got 0"]),
        (
            lambda d: d["model"].update(finetune="wrong"),
            ['"model.finetune"', "lora", "qlora", "full", "wrong"],
        ),
        (lambda d: d["model"].update(lora_rank=4), ["lora_rank"]),
        (lambda d: d["model"]["lora"].update(rank=4), ["model.lora", "'rank' is not accepted"]),
        (lambda d: d["trainer"].update(max_stepz=4), ["max_stepz"]),
        (lambda d: d["data"].update(batch_size=0), ["data.batch_size must be >= 1, got 0"]),
    ],
    ids=["r0", "finetune", "unknown-model-key", "unknown-lora-key", "unknown-trainer-key", "batch0"],
)
def test_bad_training_config_fails_with_clear_message(tmp_path, capsys, edit, messages):
    path = _bad_config(tmp_path, edit)
    with pytest.raises(SystemExit) as e:
        parse_config(["--config", str(path), *RUN_PATHS])
    assert e.value.code == 2
    err = capsys.readouterr().err
    for m in messages:
        assert m in err, f"{m!r} not in error output:\n{err[-2000:]}"
