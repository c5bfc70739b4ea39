"""Truncation keeps the instruction: over-long prompts lose the end of their input, never the template.

    .venv/bin/pytest tests/test_truncation.py -q

`lora_module.prompt.fit_prompt` is the one cutting function: the data stage uses it for training
rows, `PromptSettings.render(texts, tokenizer)` for evaluation and serving. The DialogSum test
(skipped without shared/) prepares 400 real rows at max_source_length 256 for seq2seq and causal.
"""

from __future__ import annotations

import json

import pytest
from conftest import tokenizer_corpus
from transformers import AutoTokenizer

from lora_module.prompt import PromptSettings, PromptTooLongError, fit_prompt, prompt_room, template_parts
from lora_pipeline.data import DataConfig, load_prepared, load_tokenizer, prepare
from lora_pipeline.data.config import SUMMARY_TEMPLATE

HEAD, TAIL = template_parts(SUMMARY_TEMPLATE, {}, "dialogue")


def _count(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


class _SlowTokenizer:
    """A tokenizer without offsets (like the sentencepiece "slow" ones): fit_prompt's fallback path."""

    is_fast = False

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, text, add_special_tokens=True, **kw):
        assert "return_offsets_mapping" not in kw
        return self.tok(text, add_special_tokens=add_special_tokens)


@pytest.mark.parametrize("slow", [False, True], ids=["fast", "slow"])
def test_fit_prompt_cuts_the_input_and_keeps_the_template(seq2seq_tokenizer_dir, slow):
    fast = AutoTokenizer.from_pretrained(seq2seq_tokenizer_dir)
    tok = _SlowTokenizer(fast) if slow else fast
    text = " ".join(tokenizer_corpus(20))

    def render(x: str) -> str:
        return x.join([HEAD, TAIL])

    full = _count(fast, render(text))
    empty = _count(fast, render(""))
    assert fit_prompt(render, text, tok, full) == (render(text), 0)
    for room in (full - 1, (full + empty) // 2, empty + 3):
        prompt, cut = fit_prompt(render, text, tok, room)
        assert prompt.startswith(HEAD) and prompt.endswith(TAIL)
        kept = prompt[len(HEAD) : -len(TAIL)]
        assert text.startswith(kept) and len(kept) < len(text)
        assert room - 8 <= _count(fast, prompt) <= room  # fits, and little room is wasted
        assert cut >= _count(fast, text) - _count(fast, kept) - 1 and cut > 0
    assert fit_prompt(render, text, tok, empty) == (render(""), _count(fast, text))
    with pytest.raises(PromptTooLongError, match="template alone takes"):
        fit_prompt(render, text, tok, empty - 1)


def test_render_with_a_tokenizer_cuts_like_training(seq2seq_tokenizer_dir, causal_tokenizer_dir):
    text = " ".join(tokenizer_corpus(30))
    for path, model_type in ((seq2seq_tokenizer_dir, "seq2seq"), (causal_tokenizer_dir, "causal")):
        tok = AutoTokenizer.from_pretrained(path)
        settings = PromptSettings(SUMMARY_TEMPLATE, "dialogue", max_source_length=48, model_type=model_type)
        (prompt,) = settings.render([text], tok)
        assert prompt.endswith("\n\nSummary: ") and len(tok(prompt)["input_ids"]) <= 48
        assert prompt_room(tok, 48, model_type) == 47  # one special token: </s> (seq2seq) or <s> (causal)
        # No tokenizer, or no recorded limit: the template is filled and nothing is cut.
        assert settings.render([text]) == [SUMMARY_TEMPLATE.format(dialogue=text)]


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _prompt_ids(row, model_type):
    n = sum(x == -100 for x in row["labels"]) if model_type == "causal" else len(row["input_ids"])
    return row["input_ids"][:n]


@pytest.mark.parametrize("model_type", ["seq2seq", "causal"])
def test_dialogsum_prompts_keep_summary_cue_at_256(dialogsum_dir, tmp_path, model_type):
    dev = [json.loads(x) for x in (dialogsum_dir / "dialogsum.dev.jsonl").read_text().splitlines()[:400]]
    _write_rows(tmp_path / "train.jsonl", dev[:360])
    _write_rows(tmp_path / "test.jsonl", dev[360:])
    cfg = DataConfig(name="ds400", source="files", max_source_length=256, model_type=model_type,
                     files={"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")},
                     output_root=str(tmp_path / "out"))
    prepared = prepare(cfg)
    dd, m = load_prepared(prepared.path)
    tok = load_tokenizer(prepared.path)
    room = prompt_room(tok, 256, model_type)

    rows = [row for split in dd for row in dd[split]]
    assert len(rows) >= 395
    lost_now = lost_before = 0
    by_start = {r["dialogue"][:200]: r["dialogue"] for r in dev}
    for row in rows:
        ids = _prompt_ids(row, model_type)
        assert len(ids) <= 256 and ids == tok(row["prompt"])["input_ids"]
        lost_now += not tok.decode(ids, skip_special_tokens=True).endswith("\n\nSummary: ")
        # Before: the whole prompt cut from the right (seq2seq) lost the cue whenever it was too long.
        dialogue = by_start[row["prompt"][len(HEAD) : len(HEAD) + 200]]
        full = tok(SUMMARY_TEMPLATE.format(dialogue=dialogue), add_special_tokens=False)["input_ids"]
        lost_before += not tok.decode(full[:room]).endswith("\n\nSummary: ")
    cut = sum(t["source"] for t in m["truncation"].values())
    print(f"{model_type}: {cut} of {len(rows)} inputs cut at 256; prompts without 'Summary: ' "
          f"now {lost_now}, right-truncation {lost_before}")
    assert lost_now == 0
    assert lost_before == cut > 40  # every cut prompt would have lost its cue
    assert all(t["input_tokens_cut"]["max"] >= t["input_tokens_cut"]["mean"] > 0
               for t in m["truncation"].values())

    # Evaluation/serving: the template filled from the manifest and cut by the same function.
    settings = PromptSettings.from_manifest(m)
    test_dialogues = [by_start[p[len(HEAD) : len(HEAD) + 200]] for p in dd["test"]["prompt"]]
    assert settings.render(test_dialogues, tok) == dd["test"]["prompt"]
