"""Tokenization of cleaned splits with `Dataset.map(batched=True)`, counting truncation.

    from lora_pipeline.data.encode import tokenize_splits
    dd, truncation, lengths = tokenize_splits(clean.rows, tokenizer, cfg, fingerprint)

seq2seq: `input_ids`/`attention_mask` = the templated prompt (right-truncated to max_source_length),
`labels` = the target (truncated to max_target_length), both with the tokenizer's own special tokens.
causal: `input_ids` = prompt (with the tokenizer's prefix tokens, e.g. BOS) + target + EOS;
`labels` = -100 on prompt positions so only the target is learnt. A long causal prompt keeps its
*last* tokens, because its end (the "Summary: " cue) is what the answer follows.

Texts are tokenized without special tokens once, and the tokenizer's prefix/suffix special tokens
(found by probing it) are added around the content; that equals tokenizing with special tokens,
and gives untruncated lengths for the statistics without a second pass.
"""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np

from lora_pipeline.data.config import SPLITS, DataConfig
from lora_pipeline.data.validate import Rows

IGNORE_INDEX = -100
_STATS = ("_src_len", "_tgt_len", "_src_cut", "_tgt_cut")


def special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text's content (e.g. ([], [eos]) for T5)."""
    probe = "hello world"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise ValueError(
        f"cannot locate the text inside its special tokens for tokenizer {type(tokenizer).__name__}"
    )


def _cut(ids: list[int], keep: int, left: bool) -> list[int]:
    return ids[-keep:] if left else ids[:keep]


def make_encoder(tokenizer: Any, cfg: DataConfig):
    """The batched map function for `cfg.model_type`."""
    prefix, suffix = special_affixes(tokenizer)
    eos = tokenizer.eos_token_id
    causal = cfg.model_type == "causal"
    if causal and eos is None:
        raise ValueError(
            f"model_type='causal' needs a tokenizer with an EOS token; {cfg.tokenizer!r} has none"
        )
    # causal: the prompt gets only the prefix (BOS); EOS ends the target instead.
    src_affix = (prefix, []) if causal else (prefix, suffix)
    tgt_affix = ([], [eos]) if causal else (prefix, suffix)
    src_room = cfg.max_source_length - len(src_affix[0]) - len(src_affix[1])
    tgt_room = cfg.max_target_length - len(tgt_affix[0]) - len(tgt_affix[1])
    if src_room < 1 or tgt_room < 1:
        raise ValueError(
            "max_source_length/max_target_length leave no room for text after the special tokens"
        )

    def wrap(texts: list[str], affix, room: int, left: bool) -> tuple[list[list[int]], list[int], list[bool]]:
        content = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        lengths = [len(c) + len(affix[0]) + len(affix[1]) for c in content]
        cut = [len(c) > room for c in content]
        ids = [
            affix[0] + (_cut(c, room, left) if k else c) + affix[1] for c, k in zip(content, cut, strict=True)
        ]
        return ids, lengths, cut

    def encode(batch: dict[str, list]) -> dict[str, list]:
        src, src_len, src_cut = wrap(batch["prompt"], src_affix, src_room, left=causal)
        tgt, tgt_len, tgt_cut = wrap(batch["target"], tgt_affix, tgt_room, left=False)
        if causal:
            input_ids = [s + t for s, t in zip(src, tgt, strict=True)]
            labels = [[IGNORE_INDEX] * len(s) + t for s, t in zip(src, tgt, strict=True)]
        else:
            input_ids, labels = src, tgt
        return {
            "input_ids": input_ids,
            "attention_mask": [[1] * len(x) for x in input_ids],
            "labels": labels,
            "_src_len": src_len,
            "_tgt_len": tgt_len,
            "_src_cut": src_cut,
            "_tgt_cut": tgt_cut,
        }

    return encode


def _percentiles(values: list[int]) -> dict[str, float]:
    a = np.asarray(values)
    p50, p90, p99 = (round(float(x), 1) for x in np.percentile(a, [50, 90, 99]))
    return {"p50": p50, "p90": p90, "p99": p99, "max": int(a.max()), "mean": round(float(a.mean()), 1)}


def tokenize_splits(
    rows: dict[str, Rows], tokenizer: Any, cfg: DataConfig, fingerprint: str
) -> tuple[datasets.DatasetDict, dict, dict]:
    """Tokenize every split; returns the DatasetDict (contract columns only), truncation and lengths."""
    encode = make_encoder(tokenizer, cfg)
    out, truncation, lengths = {}, {}, {}
    for split in SPLITS:
        ds = datasets.Dataset.from_dict(rows[split])
        ds = ds.map(
            encode,
            batched=True,
            batch_size=1000,
            num_proc=cfg.num_proc if cfg.num_proc and cfg.num_proc > 1 else None,
            remove_columns=["input", "target"],
            # An explicit fingerprint spares datasets from hashing the closure (and the tokenizer in it).
            new_fingerprint=f"{fingerprint[:16]}-{split}",
            desc=f"tokenizing {split}",
        )
        stats = ds.select_columns(list(_STATS)).to_dict()
        truncation[split] = {
            "rows": ds.num_rows,
            "source": int(sum(stats["_src_cut"])),
            "target": int(sum(stats["_tgt_cut"])),
        }
        lengths[split] = {
            "source": _percentiles(stats["_src_len"]),
            "target": _percentiles(stats["_tgt_len"]),
        }
        out[split] = ds.remove_columns(list(_STATS))
    return datasets.DatasetDict(out), truncation, lengths
