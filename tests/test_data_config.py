"""DataConfig: defaults, validation messages, unknown keys, YAML loading.

.venv/bin/pytest tests/test_data_config.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_pipeline.data import DataConfig, DataConfigError
from lora_pipeline.data.config import SUMMARY_TEMPLATE, TOPIC_TEMPLATE

CONFIGS = Path(__file__).resolve().parents[1] / "deploy" / "configs"


def test_defaults_follow_demo_task():
    cfg = DataConfig()
    assert (cfg.source, cfg.target_column, cfg.reference_columns) == ("demo", "summary", ["summary"])
    assert cfg.prompt_template == SUMMARY_TEMPLATE
    assert cfg.prompt_template == "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "
    topic = DataConfig(demo_task="topic")
    assert (topic.target_column, topic.prompt_template) == ("topic", TOPIC_TEMPLATE)
    assert DataConfig.from_dict(topic.to_dict()) == topic  # resolved defaults round-trip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": "web"}, "source must be one of ['demo', 'hub', 'files'], got 'web'"),
        ({"model_type": "encoder"}, "model_type must be one of ['seq2seq', 'causal'], got 'encoder'"),
        ({"demo_task": "title"}, "demo_task must be one of ['summary', 'topic'], got 'title'"),
        ({"source": "hub"}, "hub_name is required when source='hub'"),
        ({"source": "files"}, "files must map split names ['train', 'validation', 'test'] to paths"),
        ({"source": "files", "files": {"train": "a.txt"}}, "files['train']='a.txt' must end with one of"),
        ({"source": "files", "files": {"train": "a.csv", "dev": "b.csv"}}, "files has unknown split 'dev'"),
        ({"files": {"train": "a.csv"}}, "files is only used with source='files'"),
        ({"max_source_length": 0}, "max_source_length must be an integer >= 4, got 0"),
        ({"demo_train_size": 2.5}, "demo_train_size must be an integer >= 1, got 2.5"),
        (
            {"validation_size": 0},
            "validation_size must be a fraction in (0, 1) or a whole row count >= 1, got 0",
        ),
        ({"test_size": 2.5}, "test_size must be a fraction in (0, 1) or a whole row count >= 1, got 2.5"),
        ({"name": "a/b"}, "name must be a non-empty string without slashes or spaces, got 'a/b'"),
        ({"target_column": "topic"}, "target_column='topic' disagrees with demo_task='summary'"),
        ({"reference_columns": []}, "reference_columns must be a non-empty list of column names, got []"),
        (
            {"prompt_template": "Summarize: {text}"},
            "prompt_template must contain the input column as {dialogue}",
        ),
        (
            {"prompt_template": "{dialogue} {summary}"},
            "must not contain target/reference columns, found ['summary']",
        ),
        ({"prompt_template": "{dialogue} {0}"}, "placeholder {0}"),
        ({"prompt_template": "{dialogue!r}"}, "uses a conversion or format spec (!r)"),
        ({"prompt_template": "{dialogue"}, "is not a valid format string"),
        ({"num_proc": 0}, "num_proc must be an integer >= 1, got 0"),
    ],
)
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(DataConfigError) as e:
        DataConfig(**kwargs)
    assert message in str(e.value)


def test_unknown_keys_list_valid_ones():
    with pytest.raises(DataConfigError) as e:
        DataConfig.from_dict({"name": "x", "max_len": 5, "tokeniser": "t5"})
    msg = str(e.value)
    assert "unknown data config keys ['max_len', 'tokeniser']" in msg
    assert "'max_source_length'" in msg and "'tokenizer'" in msg


def test_from_yaml_with_overrides_and_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  name: demo_topic\n  demo_task: topic\n  demo_train_size: 50\n")
    cfg = DataConfig.from_yaml(p, overrides={"demo_train_size": 70})
    assert (cfg.name, cfg.target_column, cfg.demo_train_size) == ("demo_topic", "topic", 70)
    p.write_text("name: x\nbogus: 1\n")
    with pytest.raises(DataConfigError, match=r"c\.yaml: unknown data config keys \['bogus'\]"):
        DataConfig.from_yaml(p)
    with pytest.raises(FileNotFoundError, match="data config file not found"):
        DataConfig.from_yaml(tmp_path / "missing.yaml")


def test_hash_ignores_name_and_output_root():
    a = DataConfig(name="a", output_root="/x").hash_dict()
    assert a == DataConfig(name="b", output_root="/y", num_proc=2).hash_dict()
    assert a != DataConfig(max_source_length=64).hash_dict()


def test_output_root_default(monkeypatch, tmp_path):
    # The environment is read by PipelineHome.from_env at an edge, never by the data config.
    monkeypatch.setenv("LORA_PIPELINE_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.chdir(tmp_path)
    assert DataConfig().output_dir_root == tmp_path / ".lora_pipeline" / "data"
    assert DataConfig(output_root=str(tmp_path / "h" / "data")).output_dir_root == tmp_path / "h" / "data"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("data_*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = DataConfig.from_yaml(path)
    assert cfg.name
