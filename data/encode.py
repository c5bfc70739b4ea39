"""Tokenization of cleaned splits with `Dataset.map(batched=True)`, counting truncation.

    from lora_pipeline.data.encode import tokenize_splits
    dd, truncation, lengths = tokenize_splits(clean.rows, tokenizer, cfg, fingerprint)

seq2seq: `input_ids`/`attention_mask` = the templated prompt, `labels` = the target (cut to
max_target_length), both with the tokenizer's own special tokens. causal: `input_ids` = prompt
(with the tokenizer's prefix tokens, e.g. BOS) + target + EOS; `labels` = -100 on prompt positions
so only the target is learnt.

A prompt longer than max_source_length loses the end of its input field, never the template's own
text (`lora_module.prompt.fit_prompt`, which evaluation and serving use too): the trailing
"Summary: " cue stays. The `prompt` column then holds the prompt as the model sees it, and the
truncation record counts per split how many inputs were cut and by how many input tokens.

Texts are tokenized without special tokens, and the tokenizer's prefix/suffix special tokens
(found by probing it) are added around the content; that equals tokenizing with special tokens,
and gives untruncated lengths for the statistics without a second pass.

prompt_format chat is encoded by `lora_pipeline.data.chat` (chat template, labels on assistant turns
only); its truncation record also counts the conversations that lost their oldest turns.
"""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np

from lora_module.prompt import fit_prompt, special_affixes
from lora_pipeline.data.chat import CHAT_STATS, make_chat_encoder
from lora_pipeline.data.config import SPLITS, DataConfig, DataConfigError
from lora_pipeline.data.validate import Rows

IGNORE_INDEX = -100
_STATS = ("_src_len", "_tgt_len", "_src_cut", "_tgt_cut")
__all__ = ["IGNORE_INDEX", "make_encoder", "special_affixes", "tokenize_splits"]


Affixes = tuple[list[int], list[int]]  # special-token ids before and after a text


def _affixes(tokenizer: Any, cfg: DataConfig) -> tuple[Affixes, Affixes]:
    """(source affixes, target affixes): the special tokens put around prompts and targets."""
    prefix, suffix = special_affixes(tokenizer)
    if cfg.model_type == "causal":
        if tokenizer.eos_token_id is None:
            raise DataConfigError(
                f"model_type='causal' needs a tokenizer with an EOS token; tokenizer={cfg.tokenizer!r} has "
                "none"
            )
        # causal: the prompt gets only the prefix (BOS); EOS ends the target instead.
        return (prefix, []), ([], [tokenizer.eos_token_id])
    return (prefix, suffix), (prefix, suffix)


def make_encoder(tokenizer: Any, cfg: DataConfig):
    """The batched map function for `cfg.model_type`."""
    src_affix, tgt_affix = _affixes(tokenizer, cfg)
    src_room = cfg.max_source_length - len(src_affix[0]) - len(src_affix[1])
    tgt_room = cfg.max_target_length - len(tgt_affix[0]) - len(tgt_affix[1])
    if src_room < 1 or tgt_room < 1:
        raise DataConfigError(
            f"max_source_length={cfg.max_source_length}/max_target_length={cfg.max_target_length} leave no "
            f"room for text after the tokenizer's special tokens ({len(src_affix[0]) + len(src_affix[1])} "
            f"source, {len(tgt_affix[0]) + len(tgt_affix[1])} target): raise them"
        )

    def sources(batch: dict[str, list]) -> tuple[list[str], list[list[int]], list[int], list[int]]:
        """(prompts as fed, their ids, untruncated lengths, input tokens cut) of a batch."""
        prompts = list(batch["prompt"])
        content = tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]
        lengths = [len(c) + len(src_affix[0]) + len(src_affix[1]) for c in content]
        cut = [0] * len(prompts)
        for i, c in enumerate(content):
            if len(c) > src_room:
                parts = batch["parts"][i]
                prompts[i], cut[i] = fit_prompt(
                    lambda x, p=parts: x.join(p), batch["input"][i], tokenizer, src_room)
                content[i] = tokenizer(prompts[i], add_special_tokens=False)["input_ids"]
        return prompts, [src_affix[0] + c + src_affix[1] for c in content], lengths, cut

    def targets(texts: list[str]) -> tuple[list[list[int]], list[int], list[bool]]:
        content = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        lengths = [len(c) + len(tgt_affix[0]) + len(tgt_affix[1]) for c in content]
        return [tgt_affix[0] + c[:tgt_room] + tgt_affix[1] for c in content], lengths, [
            len(c) > tgt_room for c in content]

    def encode(batch: dict[str, list]) -> dict[str, list]:
        prompts, src, src_len, src_cut = sources(batch)
        tgt, tgt_len, tgt_cut = targets(batch["target"])
        if cfg.model_type == "causal":
            input_ids = [s + t for s, t in zip(src, tgt, strict=True)]
            labels = [[IGNORE_INDEX] * len(s) + t for s, t in zip(src, tgt, strict=True)]
        else:
            input_ids, labels = src, tgt
        return {
            "prompt": prompts,
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


def _truncation(rows: int, stats: dict[str, list]) -> dict[str, Any]:
    """How many prompts lost input tokens (and how many tokens: mean/max over those cut), and targets cut."""
    cut = [n for n in stats["_src_cut"] if n]
    out = {
        "rows": rows,
        "source": len(cut),
        "target": int(sum(stats["_tgt_cut"])),
        "input_tokens_cut": {
            "mean": round(float(np.mean(cut)), 1) if cut else 0.0,
            "max": max(cut, default=0),
        },
    }
    if "_turns_cut" in stats:  # chat: conversations that lost their oldest turns, and how many turns
        dropped = [n for n in stats["_turns_cut"] if n]
        out["turns_dropped"] = {"rows": len(dropped), "turns": int(sum(dropped))}
    return out


def tokenize_splits(
    rows: dict[str, Rows], tokenizer: Any, cfg: DataConfig, fingerprint: str
) -> tuple[datasets.DatasetDict, dict, dict]:
    """Tokenize every split; returns the DatasetDict (contract columns only), truncation and lengths."""
    chat = cfg.prompt_format == "chat"
    encode = make_chat_encoder(tokenizer, cfg) if chat else make_encoder(tokenizer, cfg)
    stat_columns = list(CHAT_STATS if chat else _STATS)
    out, truncation, lengths = {}, {}, {}
    for split in SPLITS:
        ds = datasets.Dataset.from_dict(rows[split])
        ds = ds.map(
            encode,
            batched=True,
            batch_size=1000,
            num_proc=cfg.num_proc if cfg.num_proc and cfg.num_proc > 1 else None,
            remove_columns=["input", "target", "parts", *(["messages"] if chat else [])],
            # An explicit fingerprint spares datasets from hashing the closure (and the tokenizer in it).
            new_fingerprint=f"{fingerprint[:16]}-{split}",
            desc=f"tokenizing {split}",
        )
        stats = ds.select_columns(stat_columns).to_dict()
        truncation[split] = _truncation(ds.num_rows, stats)
        lengths[split] = {
            "source": _percentiles(stats["_src_len"]),
            "target": _percentiles(stats["_tgt_len"]),
        }
        out[split] = ds.remove_columns(stat_columns)
    return datasets.DatasetDict(out), truncation, lengths
