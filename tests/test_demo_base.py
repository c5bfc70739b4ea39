"""The demo base model: span corruption is well formed, pretraining lowers its loss, builds are cached."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import AutoTokenizer, T5ForConditionalGeneration

from lora_module.training.demo_base import (
    DemoBaseConfig,
    build_demo_base,
    corpus_texts,
    make_model,
    pack,
    pretrain,
    read_manifest,
    span_corrupt,
)

TINY = {"batch_size": 8, "seq_len": 48, "d_model": 32, "num_layers": 1, "num_heads": 2, "d_ff": 64,
        "vocab_size": 400, "lr": 1e-2}


def test_span_corrupt_round_trips():
    """Inputs keep the unmasked tokens in order, targets hold the masked spans: together, the text."""
    tokens = list(range(100, 160))  # 60 distinct ids
    sentinels = list(range(4, 24))
    inputs, targets = span_corrupt(tokens, sentinels, 1, 0.15, 3.0, random.Random(0))
    assert inputs[-1] == 1 and targets[-1] == 1
    masked = [t for t in targets[:-1] if t not in sentinels]
    assert len(masked) == round(60 * 0.15)
    rebuilt, spans = [], {}
    current = None
    for t in targets[:-1]:
        if t in sentinels:
            current = t
            spans[t] = []
        else:
            spans[current].append(t)
    for t in inputs[:-1]:
        rebuilt.extend(spans[t] if t in sentinels else [t])
    assert rebuilt == tokens
    # Lengths depend only on the sequence length, so batches need no padding.
    other_in, other_tgt = span_corrupt(tokens, sentinels, 1, 0.15, 3.0, random.Random(1))
    assert (len(other_in), len(other_tgt)) == (len(inputs), len(targets))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="d_model"):
        DemoBaseConfig(d_model=130, num_heads=4)
    with pytest.raises(ValueError, match="steps"):
        DemoBaseConfig(steps=0)
    with pytest.raises(ValueError, match="sentinels"):
        DemoBaseConfig(seq_len=1000)


def _losses(model, tok, texts, config):
    """Span-corruption and whole-sequence reconstruction losses of `model` on `texts`."""
    rows = pack(tok, texts, config.seq_len)[:16].tolist()
    sentinels = tok.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(20)])
    pairs = [span_corrupt(r, sentinels, 1, 0.15, 3.0, random.Random(i)) for i, r in enumerate(rows)]
    x = torch.tensor([p[0] for p in pairs])
    with torch.no_grad():
        span = model(input_ids=x, labels=torch.tensor([p[1] for p in pairs])).loss.item()
        whole = model(input_ids=x, labels=torch.tensor([[*r, 1] for r in rows])).loss.item()
    return span, whole


def test_pretraining_lowers_both_losses_on_held_out_text(seq2seq_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(seq2seq_tokenizer_dir)
    config = DemoBaseConfig(steps=60, **TINY)
    model = make_model(config, len(tok))
    held_out = corpus_texts(40, 99)  # other rows than the 150 it trains on
    before = _losses(model.eval(), tok, held_out, config)
    losses = pretrain(model, tok, corpus_texts(150, 1), config, log_every=0)
    after = _losses(model, tok, held_out, config)
    assert after[0] < 0.8 * before[0] and after[1] < 0.8 * before[1], (before, after)
    assert len(losses) == 60 and all(math.isfinite(loss) for loss in losses)


def test_build_is_cached_and_loadable(tmp_path):
    kw = {"corpus_size": 60, "steps": 3, "log_every": 0, **TINY}
    path = build_demo_base(tmp_path, **kw)
    manifest = read_manifest(path)
    assert manifest["config"]["steps"] == 3 and path.name.startswith("demo-t5-")
    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert build_demo_base(tmp_path, **kw) == path  # cache hit: same folder, not rewritten
    assert weights.stat().st_mtime_ns == mtime
    other = build_demo_base(tmp_path, **{**kw, "steps": 4})  # other parameters: built beside it
    assert other != path and path.exists()

    model = T5ForConditionalGeneration.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tok)
    assert tok.convert_tokens_to_ids("<extra_id_0>") != tok.unk_token_id
    out = model.generate(**tok(["#Person1#: Hello"], return_tensors="pt"), max_new_tokens=3)
    assert out.shape[0] == 1
