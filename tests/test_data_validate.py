"""Validation and file loading: every bad case gives its message, and every drop is counted by reason.

.venv/bin/pytest tests/test_data_validate.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pandas as pd
import pytest

from lora_pipeline.data import DataConfig, DataSourceError, DataValidationError
from lora_pipeline.data.sources import load_splits
from lora_pipeline.data.validate import validate_splits


def _cfg(tmp_path: Path, **kw) -> DataConfig:
    kw.setdefault("files", {"train": str(tmp_path / "train.jsonl")})
    return DataConfig(name="t", source="files", output_root=str(tmp_path / "out"), **kw)


def _rows(n: int, prefix: str = "d") -> list[dict]:
    return [{"dialogue": f"{prefix} dialogue {i}", "summary": f"summary {i}"} for i in range(n)]


def _ds(rows: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows)


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- columns and empty splits -------------------------------------------------------------------


def test_missing_column_lists_existing_columns(tmp_path):
    raw = {"train": _ds([{"text": "a", "summary": "b"}]), "test": _ds(_rows(2))}
    with pytest.raises(DataValidationError) as e:
        validate_splits(raw, _cfg(tmp_path))
    assert "split 'train' has no column 'dialogue' (input_column)" in str(e.value)
    assert "its columns are ['text', 'summary']" in str(e.value)


def test_missing_reference_column_in_test(tmp_path):
    cfg = _cfg(tmp_path, reference_columns=["summary1", "summary2"])
    raw = {"train": _ds(_rows(5)), "test": _ds([{"dialogue": "x", "summary1": "y"}])}
    with pytest.raises(
        DataValidationError, match=r"split 'test' has no column 'summary2' \(reference_columns\)"
    ):
        validate_splits(raw, cfg)


def test_empty_split_is_named(tmp_path):
    empty = _ds(_rows(1)).select([])
    with pytest.raises(DataValidationError, match=r"split 'validation' is empty \(0 rows\)"):
        validate_splits(
            {"train": _ds(_rows(5)), "validation": empty, "test": _ds(_rows(2, "t"))}, _cfg(tmp_path)
        )


def test_split_with_no_valid_rows_left(tmp_path):
    raw = {"train": _ds(_rows(5)), "test": _ds([{"dialogue": " ", "summary": "s"}])}
    with pytest.raises(
        DataValidationError,
        match=r"split 'test' has no valid rows left after dropping \{'empty:dialogue': 1\}",
    ):
        validate_splits(raw, _cfg(tmp_path))


# ---- dropped rows ---------------------------------------------------------------------------------


def test_bad_rows_dropped_and_counted_by_reason(tmp_path):
    # Mixed types load as a JSON feature, so nulls, numbers and lists reach validation intact.
    bad = [
        {"dialogue": None, "summary": "s1"},
        {"dialogue": "   \n", "summary": "s2"},
        {"dialogue": "", "summary": "s3"},
        {"dialogue": 42, "summary": "s4"},
        {"dialogue": "ok 1", "summary": None},
        {"dialogue": "ok 2", "summary": "\t"},
        {"dialogue": "ok 3", "summary": ["a", "list"]},
    ]
    rows = _rows(10) + bad + [_rows(10)[3], _rows(10)[4], _rows(10)[4]]  # three exact duplicates
    cfg = _cfg(tmp_path, files={"train": str(_write_jsonl(tmp_path / "train.jsonl", rows))}, test_size=2)
    raw, _ = load_splits(cfg, tmp_path / "out")
    clean = validate_splits(raw, cfg)
    assert clean.drops["train"] == {
        "duplicate": 3,
        "empty:dialogue": 2,
        "empty:summary": 1,
        "non_string:dialogue": 1,
        "non_string:summary": 1,
        "null:dialogue": 1,
        "null:summary": 1,
    }
    kept = sum(len(clean.rows[s]["prompt"]) for s in ("train", "validation", "test"))
    assert kept == 10 and clean.carved == {"test": 2, "validation": 1}


def test_duplicates_keep_first_and_only_exact_pairs(tmp_path):
    rows = [
        {"dialogue": "a", "summary": "x"},
        {"dialogue": "a", "summary": "y"},  # same input, other target: kept
        {"dialogue": "a", "summary": "x"},
        {"dialogue": "b", "summary": "x"},
    ]
    raw = {"train": _ds(rows), "validation": _ds(_rows(2, "v")), "test": _ds(_rows(2, "t"))}
    clean = validate_splits(raw, _cfg(tmp_path))
    assert clean.drops["train"] == {"duplicate": 1}
    assert clean.rows["train"]["target"] == ["x", "y", "x"]


def test_test_inputs_are_removed_from_train(tmp_path):
    train = _rows(8)
    test = [{"dialogue": train[2]["dialogue"], "summary": "other"}, {"dialogue": "fresh", "summary": "s"}]
    validation = [{"dialogue": "fresh", "summary": "s"}, {"dialogue": "v", "summary": "s"}]
    raw = {"train": _ds(train), "validation": _ds(validation), "test": _ds(test)}
    clean = validate_splits(raw, _cfg(tmp_path))
    assert clean.drops["train"] == {"in_test": 1}
    assert train[2]["dialogue"] not in clean.rows["train"]["input"]
    assert len(clean.rows["train"]["input"]) == 7
    assert clean.leakage["test_inputs_in_train"] == 1
    assert clean.leakage["validation_inputs_in_test"] == 1  # reported, not removed
    assert clean.leakage["examples"] == [train[2]["dialogue"]]


def test_grouped_test_references(tmp_path):
    test = [
        {"dialogue": "a", "summary": "r1"},
        {"dialogue": "b", "summary": "q1"},
        {"dialogue": "a", "summary": "r2"},
        {"dialogue": "a", "summary": "r3"},
    ]
    cfg = _cfg(tmp_path, group_test_references=True)
    raw = {"train": _ds(_rows(5)), "validation": _ds(_rows(2, "v")), "test": _ds(test)}
    clean = validate_splits(raw, cfg)
    assert clean.rows["test"]["references"] == [["r1", "r2", "r3"], ["q1"]]
    assert clean.rows["test"]["target"] == ["r1", "q1"]
    assert clean.drops["test"] == {"merged_into_references": 2}


def test_carving_is_seeded_and_checked(tmp_path):
    raw = {"train": _ds(_rows(20))}
    a = validate_splits(raw, _cfg(tmp_path, validation_size=0.2, test_size=3, seed=1))
    b = validate_splits(raw, _cfg(tmp_path, validation_size=0.2, test_size=3, seed=1))
    c = validate_splits(raw, _cfg(tmp_path, validation_size=0.2, test_size=3, seed=2))
    assert a.rows == b.rows and a.rows != c.rows
    assert {s: len(r["prompt"]) for s, r in a.rows.items()} == {"train": 13, "validation": 4, "test": 3}
    assert set(a.rows["train"]["input"]).isdisjoint(a.rows["test"]["input"])
    with pytest.raises(DataValidationError, match="no training rows would be left"):
        validate_splits(raw, _cfg(tmp_path, validation_size=10, test_size=10))


def test_prompt_uses_every_placeholder(tmp_path):
    cfg = _cfg(tmp_path, prompt_template="Topic {topic}. {dialogue} =>")
    rows = [
        {"dialogue": "hi", "summary": "s", "topic": "t"},
        {"dialogue": "yo", "summary": "s", "topic": None},
    ]
    raw = {"train": _ds(rows * 1), "validation": _ds(rows[:1]), "test": _ds([{**rows[0], "dialogue": "z"}])}
    clean = validate_splits(raw, cfg)
    assert clean.rows["train"]["prompt"] == ["Topic t. hi =>"]
    assert clean.drops["train"] == {"null:topic": 1}


# ---- files ----------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    cfg = _cfg(tmp_path, files={"train": str(tmp_path / "nope.jsonl")})
    with pytest.raises(DataSourceError, match=r"files\['train'\]: file not found: .*nope\.jsonl"):
        load_splits(cfg, tmp_path / "out")


def test_malformed_jsonl_names_path_and_line(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"dialogue": "a", "summary": "b"}\n\n{"dialogue": "c", summary: "d"}\n')
    with pytest.raises(DataSourceError) as e:
        load_splits(_cfg(tmp_path), tmp_path / "out")
    msg = str(e.value)
    assert f"split 'train': cannot read {p} as json: line 3, column 19:" in msg
    assert "Expecting property name enclosed in double quotes" in msg


def test_jsonl_line_that_is_not_an_object(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"dialogue": "a", "summary": "b"}\n["x", "y"]\n')
    with pytest.raises(DataSourceError, match=r"line 2: expected a JSON object per line, got list"):
        load_splits(_cfg(tmp_path), tmp_path / "out")


def test_malformed_json_array_and_non_utf8(tmp_path):
    p = tmp_path / "train.json"
    p.write_text('[\n {"dialogue": "a", "summary": "b"},\n {"dialogue": "c" "summary": "d"}\n]')
    cfg = _cfg(tmp_path, files={"train": str(p)})
    with pytest.raises(DataSourceError, match=r"train\.json as json: line 3, column 19: Expecting ','"):
        load_splits(cfg, tmp_path / "out")
    p.write_bytes(b'{"dialogue": "a", "summary": "b"}\n{"dialogue": "caf\xe9", "summary": "b"}\n')
    with pytest.raises(
        DataSourceError,
        match=r"train\.json as json: not UTF-8 text \(line 2, byte offset 51: invalid continuation",
    ):
        load_splits(cfg, tmp_path / "out")


def test_empty_file_is_an_empty_split(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(DataSourceError, match=r"split 'train' is empty: .*train\.jsonl has no rows"):
        load_splits(_cfg(tmp_path), tmp_path / "out")


def test_malformed_csv_and_parquet(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text('dialogue,summary\n"a,b\n')
    with pytest.raises(DataSourceError, match=r"train\.csv as csv: ParserError: .*EOF inside string"):
        load_splits(_cfg(tmp_path, files={"train": str(csv)}), tmp_path / "out")
    pq = tmp_path / "train.parquet"
    pq.write_bytes(b"not a parquet file at all")
    with pytest.raises(DataSourceError, match=r"train\.parquet as parquet: ArrowInvalid"):
        load_splits(_cfg(tmp_path, files={"train": str(pq)}), tmp_path / "out")


def test_csv_and_parquet_load(tmp_path):
    pd.DataFrame(_rows(6)).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(_rows(3, "t")).to_parquet(tmp_path / "test.parquet")
    files = {"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.parquet")}
    raw, origins = load_splits(_cfg(tmp_path, files=files), tmp_path / "out")
    assert {s: d.num_rows for s, d in raw.items()} == {"train": 6, "test": 3}
    assert raw["test"][0] == {"dialogue": "t dialogue 0", "summary": "summary 0"}
    assert origins["train"].endswith("train.csv")
