"""`lora-pipeline inspect`: columns, row counts, token-length percentiles and a suggested config.

    .venv/bin/pytest tests/test_inspect.py -q

Local files only (CSV, Parquet, JSON lines) written from the demo corpus; lengths are checked
against the tokenizer directly; the suggested YAML must load as a DataConfig and prepare.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import yaml
from transformers import AutoTokenizer

from lora_pipeline.data import DataConfig, prepare
from lora_pipeline.data.demo_corpus import generate
from lora_pipeline.data.inspection import inspect_source
from lora_pipeline.flows.cli import main as lora_pipeline


@pytest.fixture
def frames():
    rows = generate(120, seed=5)
    train = pd.DataFrame({"id": range(100), "conversation": [r["dialogue"] for r in rows[:100]],
                          "abstract": [r["summary"] for r in rows[:100]]})
    test = pd.DataFrame({"dialogue": [r["dialogue"] for r in rows[100:]],
                         **{f"summary{i}": [r["summary"] for r in rows[100:]] for i in (1, 2, 3)}})
    return train, test


def _yaml_part(out: str) -> dict:
    return yaml.safe_load(out.split("`lora-pipeline prepare --config FILE`):\n", 1)[1])


def _row(out: str, column: str) -> list[str]:
    line = next(x for x in out.splitlines() if x.split() and x.split()[0] == column)
    return line.split()


def test_csv_columns_rows_lengths_and_suggestion(tmp_path, frames, seq2seq_tokenizer_dir, monkeypatch):
    train, _ = frames
    train.loc[3, "abstract"] = ""  # an empty cell is not counted as non-empty
    path = tmp_path / "train.csv"
    train.to_csv(path, index=False)
    out = inspect_source(str(path), tokenizer=str(seq2seq_tokenizer_dir))
    assert "split train: 100 rows" in out
    tok = AutoTokenizer.from_pretrained(seq2seq_tokenizer_dir)
    lengths = [len(x) for x in tok(list(train["conversation"]), add_special_tokens=False)["input_ids"]]
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    assert _row(out, "conversation")[2:] == ["100", f"{p50:.0f}/{p90:.0f}/{p99:.0f}/{max(lengths)}"]
    assert _row(out, "abstract")[2] == "99"
    assert _row(out, "id")[1:] == ["int64", "100", "-"]

    cfg = _yaml_part(out)
    assert cfg["input_column"] == "conversation" and cfg["target_column"] == "abstract"
    assert cfg["files"] == {"train": str(path)} and "{conversation}" in cfg["prompt_template"]
    assert cfg["max_source_length"] >= p99 and cfg["max_source_length"] % 64 == 0
    # The suggestion is a valid config that prepares as it is.
    prepared = prepare(DataConfig.from_dict({**cfg, "output_root": str(tmp_path / "out")}))
    assert prepared.manifest["rows"]["train"] > 0


def test_parquet_with_numbered_references_and_demo_tokenizer(tmp_path, frames):
    _, test = frames
    path = tmp_path / "test.parquet"
    test.to_parquet(path, index=False)
    out = inspect_source(str(path))  # default: the demo tokenizer, trained on these rows
    assert "lengths in tokens of 'demo', trained on these rows" in out and "20 rows" in out
    cfg = _yaml_part(out)
    assert cfg["input_column"] == "dialogue"
    assert cfg["reference_columns"] == ["summary1", "summary2", "summary3"]
    assert DataConfig.from_dict(cfg).columns_for("test")[1] == ["summary1", "summary2", "summary3"]
    assert re.search(r"summary2 +\S*string +20 +\d+/\d+/\d+/\d+", out)


def test_command_line_and_bad_input(tmp_path, frames, capsys):
    train, _ = frames
    path = tmp_path / "rows.jsonl"
    train.to_json(path, orient="records", lines=True)
    assert lora_pipeline(["inspect", str(path)]) == 0
    assert "input_column: conversation" in capsys.readouterr().out
    assert lora_pipeline(["inspect", str(tmp_path / "missing.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "file not found" in err[0] and "missing.csv" in err[0]
    with pytest.raises(SystemExit) as e:
        lora_pipeline(["inspect", "--help"])
    assert e.value.code == 0
    assert "--tokenizer" in capsys.readouterr().out


def test_lettered_references_are_suggested_as_reference_columns(tmp_path, frames):
    """Three references named ref_a/ref_b/ref_c (not numbered): reference_columns, not one target."""
    _, test = frames
    refs = test.rename(columns={"summary1": "ref_a", "summary2": "ref_b", "summary3": "ref_c"})
    refs.loc[:, "ref_c"] = refs["ref_c"].str.split().str[:3].str.join(" ")  # the shortest column
    path = tmp_path / "refs.jsonl"
    refs.to_json(path, orient="records", lines=True)
    cfg = _yaml_part(inspect_source(str(path)))
    assert cfg["input_column"] == "dialogue" and cfg["reference_columns"] == ["ref_a", "ref_b", "ref_c"]
    assert cfg["target_column"] == "ref_a"  # the train split's label: the first reference
    assert DataConfig.from_dict(cfg).columns_for("test")[1] == ["ref_a", "ref_b", "ref_c"]


@pytest.mark.parametrize(("columns", "expected"), [
    (["dialogue", "summary1", "summary2", "summary10"], {"reference_columns": ["summary1", "summary2",
                                                                              "summary10"]}),
    (["text", "gold-1", "gold-2"], {"reference_columns": ["gold-1", "gold-2"]}),
    (["dialogue", "summary", "turn_1", "turn_2"], {"target_column": "summary"}),  # named target wins
    (["conversation", "abstract"], {"target_column": "abstract"}),  # 't' is no letter suffix
])
def test_reference_guess_rules(columns, expected):
    from lora_pipeline.data.inspection import ColumnInfo, SplitInfo, guess_columns

    cols = [ColumnInfo(name, "string", 3, {"mean_chars": 500.0 if i == 0 else 40.0 + i})
            for i, name in enumerate(columns)]
    assert guess_columns(SplitInfo("train", "x", 3, cols)) == {"input_column": columns[0], **expected}


def test_inspect_help_says_what_it_suggests(capsys):
    with pytest.raises(SystemExit):
        lora_pipeline(["inspect", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "reference_columns" in out and "ref_a" in out
