"""prepare(): the prepared folder's contract, tokenization, caching and atomic writes.

.venv/bin/pytest tests/test_data_prepare.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from lora_pipeline.data import DataConfig, DataSourceError, encode, load_prepared, load_tokenizer, prepare
from lora_pipeline.flows.cli import main as lora_pipeline

SMALL = {"demo_train_size": 120, "demo_validation_size": 20, "demo_test_size": 20}


def _cfg(tmp_path: Path, tokenizer: Path, **kw) -> DataConfig:
    return DataConfig(output_root=str(tmp_path / "out"), tokenizer=str(tokenizer), **{**SMALL, **kw})


def _no_tokenizing(monkeypatch):
    def boom(*a, **kw):
        raise AssertionError("tokenization ran although the prepared folder should have been reused")

    monkeypatch.setattr(encode, "tokenize_splits", boom)


def test_seq2seq_folder_follows_the_contract(tmp_path, seq2seq_tokenizer_dir):
    cfg = _cfg(tmp_path, seq2seq_tokenizer_dir)
    p = prepare(cfg)
    assert not p.reused and p.path == tmp_path / "out" / f"demo_summary-{p.fingerprint[:12]}"
    dd, manifest = load_prepared(p.path)
    tok = load_tokenizer(p.path)
    assert set(dd) == {"train", "validation", "test"}
    assert manifest == p.manifest and manifest["rows"] == {"train": 120, "validation": 20, "test": 20}
    for key in ("fingerprint", "name", "model_type", "tokenizer", "rows", "drops", "truncation", "lengths"):
        assert key in manifest
    assert manifest["tokenizer"] == str(seq2seq_tokenizer_dir) and manifest["model_type"] == "seq2seq"
    assert manifest["config"] == {**cfg.to_dict(), "model_type": "seq2seq"}  # the base's type, recorded
    assert manifest["sources"]["kind"] == "demo"
    assert set(manifest["lengths"]["train"]["source"]) == {"p50", "p90", "p99", "max", "mean"}
    for split in dd:
        ds = dd[split]
        assert set(ds.column_names) == {"input_ids", "attention_mask", "labels", "prompt", "references"}
        row = ds[0]
        assert row["prompt"].startswith("Summarize the following conversation.\n\n#Person1#: ")
        assert row["prompt"].endswith("\n\nSummary: ")
        assert row["input_ids"] == tok(row["prompt"])["input_ids"]  # seq2seq style ends with </s>
        assert row["input_ids"][-1] == tok.eos_token_id and row["attention_mask"] == [1] * len(
            row["input_ids"]
        )
        assert tok.decode(row["labels"], skip_special_tokens=True) == row["references"][0]
        assert row["labels"][-1] == tok.eos_token_id
        assert isinstance(row["references"], list) and len(row["references"]) == 1
    assert manifest["truncation"]["train"] == {
        "rows": 120, "source": 0, "target": 0, "input_tokens_cut": {"mean": 0.0, "max": 0}}


def test_cache_reuse_and_what_invalidates_it(tmp_path, seq2seq_tokenizer_dir, monkeypatch):
    first = prepare(_cfg(tmp_path, seq2seq_tokenizer_dir))
    _no_tokenizing(monkeypatch)
    again = prepare(_cfg(tmp_path, seq2seq_tokenizer_dir, name="demo_summary", num_proc=2))
    assert again.reused and again.path == first.path and again.manifest == first.manifest
    assert prepare(_cfg(tmp_path, seq2seq_tokenizer_dir).to_dict()).reused  # a dict of fields works too

    monkeypatch.undo()

    changed = {
        "template": {"prompt_template": "Sum up:\n{dialogue}\nSummary: "},
        "max_source_length": {"max_source_length": 64},
        "data": {"demo_seed": 1},
    }
    paths = {first.path}
    for kw in changed.values():
        p = prepare(_cfg(tmp_path, seq2seq_tokenizer_dir, **kw))
        assert not p.reused
        paths.add(p.path)

    # The tokenizer's files are hashed: editing one in place gives a new fingerprint.
    copy = tmp_path / "tok_copy"
    shutil.copytree(seq2seq_tokenizer_dir, copy)
    before = prepare(_cfg(tmp_path, copy))
    assert prepare(_cfg(tmp_path, copy)).reused
    cfg_file = copy / "tokenizer_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "model_max_length": 77}))
    after = prepare(_cfg(tmp_path, copy))
    assert not after.reused and after.path != before.path
    paths |= {before.path, after.path}
    assert len(paths) == 6 and all(x.is_dir() for x in paths)  # earlier folders are kept


def test_changed_source_file_makes_a_new_folder(tmp_path, seq2seq_tokenizer_dir):
    train = tmp_path / "train.jsonl"
    rows = [{"dialogue": f"hello number {i}", "summary": f"s {i}"} for i in range(30)]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(
        name="f",
        source="files",
        files={"train": str(train)},
        tokenizer=str(seq2seq_tokenizer_dir),
        output_root=str(tmp_path / "out"),
        validation_size=5,
        test_size=5,
    )
    a = prepare(cfg)
    assert a.manifest["rows"] == {"train": 20, "validation": 5, "test": 5}
    assert a.manifest["sources"]["carved_from_train"] == {"test": 5, "validation": 5}
    assert prepare(cfg).reused
    train.write_text(train.read_text().replace("s 7", "s seven"))
    b = prepare(cfg)
    assert not b.reused and b.path != a.path


def test_causal_masks_the_prompt(tmp_path, causal_tokenizer_dir):
    p = prepare(_cfg(tmp_path, causal_tokenizer_dir, model_type="causal", name="demo_causal"))
    dd, manifest = load_prepared(p.path)
    tok = load_tokenizer(p.path)
    assert manifest["model_type"] == "causal"
    for row in dd["test"].select(range(5)):
        prompt_ids = tok(row["prompt"])["input_ids"]  # causal style: starts with <s>
        target_ids = tok(row["references"][0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert prompt_ids[0] == tok.bos_token_id
        assert row["input_ids"] == prompt_ids + target_ids
        assert row["labels"] == [-100] * len(prompt_ids) + target_ids
        assert (
            tok.decode([t for t in row["labels"] if t != -100], skip_special_tokens=True)
            == row["references"][0]
        )


def test_truncation_is_counted(tmp_path, seq2seq_tokenizer_dir, causal_tokenizer_dir):
    p = prepare(_cfg(tmp_path, seq2seq_tokenizer_dir, max_source_length=40, max_target_length=8))
    dd, m = load_prepared(p.path)
    tok = load_tokenizer(p.path)
    full_tgt = [len(tok(r[0])["input_ids"]) for r in dd["train"]["references"]]
    cut = m["truncation"]["train"]
    assert m["lengths"]["train"]["source"]["max"] > 40  # lengths are the untruncated ones
    assert 0 < cut["source"] <= cut["rows"]
    assert cut["input_tokens_cut"]["max"] >= cut["input_tokens_cut"]["mean"] > 0
    assert m["truncation"]["train"]["target"] == sum(n > 8 for n in full_tgt) > 0
    for row in dd["train"]:
        # The input was cut, not the template: the prompt as stored is what the ids hold, whole.
        assert len(row["input_ids"]) <= 40 and row["input_ids"][-1] == tok.eos_token_id
        assert row["input_ids"] == tok(row["prompt"])["input_ids"]
        assert row["prompt"].endswith("\n\nSummary: ")
        assert len(row["labels"]) <= 8 and row["labels"][-1] == tok.eos_token_id

    # Causal: BOS, then the prompt whose input was cut (its "Summary: " cue kept), then the target.
    c = prepare(_cfg(tmp_path, causal_tokenizer_dir, model_type="causal", max_source_length=40))
    dd, m = load_prepared(c.path)
    tok = load_tokenizer(c.path)
    for row in dd["train"]:
        n_prompt = sum(x == -100 for x in row["labels"])
        assert n_prompt <= 40 and row["input_ids"][0] == tok.bos_token_id
        assert row["input_ids"][:n_prompt] == tok(row["prompt"])["input_ids"]
        assert row["prompt"].endswith("\n\nSummary: ")
    assert m["truncation"]["train"]["source"] > 0


def test_demo_tokenizer_is_trained_once_and_shared_by_both_tasks(tmp_path):
    root = tmp_path / "out"
    kw = {**SMALL, "output_root": str(root), "tokenizer_vocab_size": 400}
    s = prepare(DataConfig(name="demo_summary", **kw))
    t = prepare(DataConfig(name="demo_topic", demo_task="topic", **kw))
    assert s.path != t.path
    assert s.manifest["tokenizer_source"] == t.manifest["tokenizer_source"]
    assert len(list((root / "tokenizers").iterdir())) == 1
    tok = load_tokenizer(t.path)
    assert len(tok) <= 400 and tok.eos_token_id == 1 and tok.pad_token_id == 0
    dd, m = load_prepared(t.path)
    row = dd["train"][0]
    assert row["prompt"].startswith("What is the topic of the following conversation?")
    assert tok.decode(row["labels"], skip_special_tokens=True) == row["references"][0]
    # topics are a few words, summaries a sentence
    assert m["lengths"]["train"]["target"]["max"] < s.manifest["lengths"]["train"]["target"]["p50"]


def test_crash_leaves_no_folder_and_incomplete_folder_is_set_aside(
    tmp_path, seq2seq_tokenizer_dir, monkeypatch
):
    cfg = _cfg(tmp_path, seq2seq_tokenizer_dir)

    def crash(self, *a, **kw):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(datasets.DatasetDict, "save_to_disk", crash)
        with pytest.raises(OSError, match="disk full"):
            prepare(cfg)
    out = tmp_path / "out"
    assert not [d for d in out.iterdir() if d.name.startswith(("demo_summary", ".tmp-demo_summary"))]

    p = prepare(cfg)
    (p.path / "manifest.json").unlink()  # e.g. a half copy made by hand
    again = prepare(cfg)
    assert not again.reused and (again.path / "manifest.json").is_file()
    assert len(list(out.glob(f"{p.path.name}.incomplete-*"))) == 1  # kept, not deleted


def test_load_prepared_rejects_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a complete prepared data folder"):
        load_prepared(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer/ folder"):
        load_tokenizer(tmp_path)


def test_causal_tokenizer_without_pad_gets_eos_as_pad(tmp_path, causal_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(causal_tokenizer_dir)
    tok.pad_token = None
    nopad = tmp_path / "nopad"
    tok.save_pretrained(nopad)
    p = prepare(_cfg(tmp_path, nopad, model_type="causal", name="nopad"))
    assert load_tokenizer(p.path).pad_token == "</s>"
    assert p.manifest["tokenizer_notes"] == ["tokenizer had no pad token; set pad_token = eos_token ('</s>')"]


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_cli_prepare_prints_summary(tmp_path, seq2seq_tokenizer_dir, capsys):
    yml = tmp_path / "data.yaml"
    yml.write_text(f"name: cli_demo\ndemo_train_size: 60\ntokenizer: {seq2seq_tokenizer_dir}\n")
    args = ["prepare", "--config", str(yml), "--output_root", str(tmp_path / "out"), "--demo_test_size", "10"]
    assert lora_pipeline(args) == 0
    out = capsys.readouterr().out
    assert "prepared cli_demo -> " in out and "reused: no" in out
    assert "rows: train=60  validation=300  test=10" in out
    assert lora_pipeline(args) == 0
    assert "reused: yes" in capsys.readouterr().out
    assert lora_pipeline(["prepare", "--config", str(yml), "--demo_test_size", "0"]) == 2
    assert "demo_test_size must be an integer >= 1, got 0" in _one_error_line(capsys)
    # an option that is no DataConfig field: argparse's usage error, as one line too
    assert lora_pipeline(["prepare", "--config", str(yml), "--bogus", "1"]) == 2
    assert "unrecognized arguments: --bogus" in _one_error_line(capsys)
    yml.write_text(yml.read_text() + "bogus: 1\n")
    assert lora_pipeline(["prepare", "--config", str(yml)]) == 2
    assert "unknown data config keys ['bogus']" in _one_error_line(capsys)


def test_hub_source_without_network(tmp_path, seq2seq_tokenizer_dir, monkeypatch):
    """The Hub path with `datasets.load_dataset` stubbed: name, config and revision are passed through."""
    calls = []
    rows = [{"dialogue": f"talk {i}", "summary": f"sum {i}"} for i in range(40)]
    hub = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:30]), "test": datasets.Dataset.from_list(rows[30:])}
    )

    def fake_load(name, config=None, **kw):
        calls.append((name, config, kw.get("revision")))
        if name == "offline/unreachable":
            raise ConnectionError("no network")
        return hub if name == "someone/dialogs" else datasets.DatasetDict({"dev": hub["train"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = DataConfig(
        name="hub",
        source="hub",
        hub_name="someone/dialogs",
        hub_revision="abc123",
        tokenizer=str(seq2seq_tokenizer_dir),
        output_root=str(tmp_path / "out"),
        validation_size=5,
    )
    p = prepare(cfg)
    assert calls == [("someone/dialogs", None, "abc123")]
    assert p.manifest["rows"] == {"train": 25, "validation": 5, "test": 10}
    assert p.manifest["sources"]["kind"] == "hub" and p.manifest["sources"]["revision"] == "abc123"
    assert prepare(cfg).reused and len(calls) == 1  # reuse loads nothing
    with pytest.raises(
        DataSourceError, match=r"hub_name='offline/unreachable' .*ConnectionError: no network"
    ):
        prepare(DataConfig(**{**cfg.to_dict(), "hub_name": "offline/unreachable"}))
    with pytest.raises(
        DataSourceError, match=r"Hub data set 'other/x' has no 'train' split; it has \['dev'\]"
    ):
        prepare(DataConfig(**{**cfg.to_dict(), "hub_name": "other/x"}))
