"""Bring your own data: README's worked example prepares, per-split columns, Hub config and revision.

    .venv/bin/pytest tests/test_data_byo.py -q

The example's files (CSV train/validation with `id`, `conversation`, `abstract`; a Parquet test split
with `dialogue`, `summary1..3`) are written from real DialogSum rows, or from the demo corpus when
shared/ is absent, into a temporary working directory; the shipped YAML is used as it is, only with
the offline demo tokenizer. The Hub is replaced by a stub (no network in tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pandas as pd
import pytest
from conftest import SHARED_DIALOGSUM

from lora_pipeline.data import (
    DataConfig,
    DataConfigError,
    DataValidationError,
    load_prepared,
    prepare,
    sources,
)
from lora_pipeline.data.demo_corpus import generate
from lora_pipeline.data.prepare import fingerprint

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "deploy" / "configs" / "data_byo_example.yaml"


def _rows() -> tuple[list[dict], list[dict]]:
    """(train-like rows with id/conversation/abstract, test rows with dialogue/summary1..3)."""
    if (SHARED_DIALOGSUM / "dialogsum.test.jsonl").exists():
        read = lambda name: [json.loads(x) for x in (SHARED_DIALOGSUM / name).read_text().splitlines()]  # noqa: E731
        dev, test = read("dialogsum.dev.jsonl")[:240], read("dialogsum.test.jsonl")[:60]
        return ([{"id": r["fname"], "conversation": r["dialogue"], "abstract": r["summary"]} for r in dev],
                [{k: r[k] for k in ("dialogue", "summary1", "summary2", "summary3")} for r in test])
    demo = generate(300, seed=3)
    train = [{"id": f"d{i}", "conversation": r["dialogue"], "abstract": r["summary"]}
             for i, r in enumerate(demo[:240])]
    test = [{"dialogue": r["dialogue"], "summary1": r["summary"], "summary2": r["summary"].lower(),
             "summary3": r["topic"]} for r in demo[240:]]
    return train, test


@pytest.fixture
def byo_dir(tmp_path, monkeypatch) -> Path:
    train, test = _rows()
    data = tmp_path / "my_data"
    data.mkdir()
    pd.DataFrame(train[:200]).to_csv(data / "train.csv", index=False)
    pd.DataFrame(train[200:]).to_csv(data / "validation.csv", index=False)
    pd.DataFrame(test).to_parquet(data / "test.parquet", index=False)
    monkeypatch.chdir(tmp_path)  # the example's paths are relative to the working directory
    return tmp_path


def test_worked_example_prepares(byo_dir):
    cfg = DataConfig.from_yaml(EXAMPLE, overrides={"tokenizer": "demo", "output_root": str(byo_dir / "out")})
    assert cfg.columns_for("test") == ("dialogue", ["summary1", "summary2", "summary3"])
    prepared = prepare(cfg)
    dd, m = load_prepared(prepared.path)
    assert m["sources"]["rows_loaded"] == {"train": 200, "validation": 40, "test": 60}
    assert m["rows"]["validation"] == 40 - sum(m["drops"]["validation"].values())
    assert m["rows"]["test"] + sum(m["drops"]["test"].values()) == 60
    assert m["config"]["split_columns"] == {
        "test": {"input_column": "dialogue", "reference_columns": ["summary1", "summary2", "summary3"]}}
    test = pd.read_parquet(byo_dir / "my_data" / "test.parquet")
    first = dd["test"][0]
    # The Parquet file's `dialogue` column filled the template's {conversation}; three references each.
    assert first["prompt"].startswith("Summarize the following conversation.\n\n" + test["dialogue"][0][:50])
    assert first["prompt"].endswith("\n\nSummary: ")
    assert first["references"] == list(test.loc[0, ["summary1", "summary2", "summary3"]])
    train = pd.read_csv(byo_dir / "my_data" / "train.csv")
    assert set(r[0] for r in dd["train"]["references"]) <= set(train["abstract"])


def test_missing_column_names_split_file_column_and_choices(byo_dir):
    cfg = DataConfig.from_yaml(EXAMPLE, overrides={
        "tokenizer": "demo", "output_root": str(byo_dir / "out"),
        "split_columns": {"test": {"input_column": "conversation"}}})
    with pytest.raises(DataValidationError) as e:
        prepare(cfg)
    msg = str(e.value)
    assert "split 'test'" in msg and "test.parquet" in msg
    assert "'conversation' (split_columns['test'].input_column)" in msg
    assert "'abstract' (reference_columns)" in msg  # without the test's own, the default: [target_column]
    assert "['dialogue', 'summary1', 'summary2', 'summary3']" in msg
    assert not (byo_dir / "out").exists() or not any((byo_dir / "out").glob("my_dialogues-*"))


@pytest.mark.parametrize(("split_columns", "expected"), [
    ({"dev": {"input_column": "x"}}, "unknown split 'dev'"),
    ({"test": {"target_column": "x"}}, "keys among ['input_column', 'reference_columns']"),
    ({"train": {"reference_columns": ["x"]}}, "keys among ['input_column', 'target_column']"),
    ({"test": {"reference_columns": "x"}}, "must be a non-empty list of column names"),
    ({"train": {"input_column": ""}}, "must be a name"),
])
def test_bad_split_columns_are_one_clear_error(split_columns, expected):
    with pytest.raises(DataConfigError, match="split_columns") as e:
        DataConfig(source="files", files={"train": "a.csv"}, split_columns=split_columns)
    assert expected in str(e.value)
    # A test reference column must not feed the prompt either.
    with pytest.raises(DataConfigError, match="must not contain"):
        DataConfig(source="files", files={"train": "a.csv"}, prompt_template="{dialogue} {s1}",
                   split_columns={"test": {"reference_columns": ["s1"]}})


def test_default_template_follows_the_input_column():
    cfg = DataConfig(source="files", files={"train": "a.csv"}, input_column="conversation")
    assert "{conversation}" in cfg.prompt_template and cfg.prompt_template.endswith("Summary: ")


def test_hub_config_and_revision_reach_the_loader_fingerprint_and_manifest(tmp_path, monkeypatch):
    calls = []
    rows = generate(60, seed=1)

    def fake_load_dataset(name, config=None, revision=None, **kw):
        calls.append((name, config, revision))
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})

    monkeypatch.setattr(sources.datasets, "load_dataset", fake_load_dataset)
    kw = {"name": "hubby", "source": "hub", "hub_name": "org/dialogs", "tokenizer_vocab_size": 400,
          "output_root": str(tmp_path / "out")}
    a = DataConfig(**kw, hub_config="en", hub_revision="0123abc")
    fps = {fingerprint(c)[0] for c in (a, DataConfig(**kw, hub_config="en", hub_revision="4567def"),
                                        DataConfig(**kw, hub_config="de", hub_revision="0123abc"))}
    assert len(fps) == 3
    m = prepare(a).manifest
    assert calls == [("org/dialogs", "en", "0123abc")]
    assert m["sources"]["config"] == "en" and m["sources"]["revision"] == "0123abc"
    assert m["sources"]["origins"]["train"] == "hub:org/dialogs:en@0123abc[train]"
