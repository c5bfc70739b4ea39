"""Real data: DialogSum dev as train/validation, test with three human references (skips without shared/).

.venv/bin/pytest tests/test_data_dialogsum.py -q
"""

from __future__ import annotations

import json

import pytest

from lora_pipeline.data import DataConfig, load_prepared, load_tokenizer, prepare

TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "


@pytest.fixture
def dialogsum_prepared(dialogsum_dir, seq2seq_tokenizer_dir, tmp_path):
    cfg = DataConfig(
        name="dialogsum",
        source="files",
        files={
            "train": str(dialogsum_dir / "dialogsum.dev.jsonl"),
            "test": str(dialogsum_dir / "dialogsum.test.jsonl"),
        },
        reference_columns=["summary1", "summary2", "summary3"],
        validation_size=50,
        max_source_length=4096,  # no truncation, so labels must decode back to the exact text
        max_target_length=1024,
        tokenizer=str(seq2seq_tokenizer_dir),
        output_root=str(tmp_path / "out"),
    )
    return cfg, prepare(cfg)


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_dialogsum_counts_template_labels_and_references(dialogsum_dir, dialogsum_prepared):
    cfg, p = dialogsum_prepared
    dd, m = load_prepared(p.path)
    tok = load_tokenizer(p.path)
    dev, test = _read(dialogsum_dir / "dialogsum.dev.jsonl"), _read(dialogsum_dir / "dialogsum.test.jsonl")

    # counts: every loaded row is either kept or counted as a drop
    assert (
        m["sources"]["rows_loaded"] == {"train": len(dev), "test": len(test)} == {"train": 500, "test": 500}
    )
    assert m["rows"]["validation"] == 50 == m["sources"]["carved_from_train"]["validation"]
    assert m["rows"]["train"] + m["rows"]["validation"] + sum(m["drops"]["train"].values()) == len(dev)
    assert m["rows"]["test"] + sum(m["drops"]["test"].values()) == len(test)
    assert m["rows"]["test"] >= 495 and m["rows"]["train"] >= 440
    assert m["truncation"]["test"] == {"rows": m["rows"]["test"], "source": 0, "target": 0,
                                       "input_tokens_cut": {"mean": 0.0, "max": 0}}

    # test: prompt = template(dialogue), labels = summary1, references = summary1..3, in file order
    by_dialogue = {r["dialogue"]: r for r in test}
    for row in dd["test"]:
        dialogue = row["prompt"][len("Summarize the following conversation.\n\n") : -len("\n\nSummary: ")]
        src = by_dialogue[dialogue]
        assert row["prompt"] == TEMPLATE.format(dialogue=src["dialogue"])
        assert row["references"] == [src["summary1"], src["summary2"], src["summary3"]]
        assert tok.decode(row["labels"], skip_special_tokens=True) == src["summary1"]
        assert row["input_ids"] == tok(row["prompt"])["input_ids"]
    assert dd["test"][0]["prompt"] == TEMPLATE.format(dialogue=test[0]["dialogue"])

    # train/validation: one reference each, the dev summary; no test input leaks into train
    dev_summary = {r["dialogue"]: r["summary"] for r in dev}
    test_prompts = set(dd["test"]["prompt"])
    for split in ("train", "validation"):
        for row in dd[split].select(range(0, dd[split].num_rows, 7)):
            dialogue = row["prompt"][len("Summarize the following conversation.\n\n") : -len("\n\nSummary: ")]
            assert row["references"] == [dev_summary[dialogue]]
            assert tok.decode(row["labels"], skip_special_tokens=True) == dev_summary[dialogue]
    assert not test_prompts & set(dd["train"]["prompt"])
    assert m["leakage"]["test_inputs_in_train"] == m["drops"]["train"].get("in_test", 0)
