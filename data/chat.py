"""Tokenization of conversations for prompt_format chat: the chat template, assistant-only labels.

    from lora_pipeline.data.chat import assistant_labels, make_chat_encoder
    ids, labels = assistant_labels(tokenizer, messages, last_only=False)  # -100 but on assistant turns
    encode = make_chat_encoder(tokenizer, cfg)    # the batched map function `encode.tokenize_splits` runs

A row's conversation (`validate` built it: it ends with the assistant turn to learn) gets the
system prompt first unless it has its own system turn, is rendered by the tokenizer's chat template
and tokenized WITHOUT special tokens (the template writes BOS itself: no double BOS).

Which tokens are an assistant's: for assistant turn i, the conversation up to turn i rendered with the
generation prompt must be a text prefix of the conversation up to and including turn i, and that of
the whole; the characters between the two are the turn (its text and the template's end-of-turn
tokens, so the model learns to stop; not the whitespace after those), mapped to tokens by their
offsets. Comparing texts rather
than token ids is immune to tokens merging across a turn boundary; a template that rewrites earlier
turns (so the prefixes differ) is refused with a one-line error. Labels are the ids on every
assistant turn (`assistant_loss: all`) or on the last one only (`last`), -100 elsewhere.

Lengths: the prompt (every turn before the last assistant turn, plus the generation prompt) is fitted
to max_source_length by `lora_module.prompt.fit_conversation` (oldest turns dropped first, then the
end of the last user turn's input; evaluation and serving cut the same way), and the last assistant
turn's text is cut so that it takes at most max_target_length tokens (its end-of-turn tokens kept).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lora_module.prompt import (
    PromptError,
    check_chat_tokenizer,
    fit_conversation,
    fit_text,
    render_chat,
)
from lora_pipeline.data.config import DataConfig, DataConfigError

IGNORE_INDEX = -100
CHAT_STATS = ("_src_len", "_tgt_len", "_src_cut", "_tgt_cut", "_turns_cut")

Messages = list[dict[str, str]]


def _assistant_spans(tokenizer: Any, messages: Messages, text: str, last_only: bool) -> list[tuple[int, int]]:
    """Character spans of the assistant turns to learn inside `text` (the whole rendered conversation)."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = []
    for i in turns[-1:] if last_only else turns:
        before = render_chat(tokenizer, messages[:i], True)
        through = render_chat(tokenizer, messages[: i + 1], False)
        if not (text.startswith(through) and through.startswith(before)):
            raise PromptError(
                f"the chat template of {type(tokenizer).__name__} renders the conversation up to assistant "
                f"turn {i} differently from the start of the whole conversation, so its tokens cannot "
                "be found; use a template that writes earlier turns unchanged, or assistant_loss: last")
        # Whitespace the template writes after the end-of-turn token is no part of the reply to learn.
        end = len(through.rstrip())
        spans.append((len(before), end if end > len(before) else len(through)))
    return spans


def assistant_labels(tokenizer: Any, messages: Messages,
                     last_only: bool = False) -> tuple[list[int], list[int]]:
    """(input ids, labels) of the rendered conversation: labels are the ids on assistant turns (the last
    one only with `last_only`), -100 elsewhere. Needs a fast tokenizer (character offsets)."""
    text = render_chat(tokenizer, messages, False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = _assistant_spans(tokenizer, messages, text, last_only)
    labels = [tok if any(s <= start < e for s, e in spans) else IGNORE_INDEX
              for tok, (start, _) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]
    return list(enc["input_ids"]), labels


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def with_system(messages: Messages, system_prompt: str | None) -> Messages:
    """`messages` with the system prompt first, unless there is none or the conversation has its own."""
    if not system_prompt or messages[0]["role"] == "system":
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def encode_conversation(tokenizer: Any, messages: Messages, parts: list[str],
                        cfg: DataConfig) -> dict[str, Any]:
    """One row: prompt text, ids, labels and the untruncated lengths and cuts (see the module docstring).
    `messages` ends with the assistant turn to learn; the user turn before it holds the raw input of
    `parts`."""
    conv = with_system(messages, cfg.system_prompt)
    context, reply = conv[:-1], conv[-1]["content"]
    whole_context = [*context[:-1], {"role": "user", "content": context[-1]["content"].join(parts)}]
    src_len = _count(tokenizer, render_chat(tokenizer, whole_context, True))
    kept, dropped, cut = fit_conversation(tokenizer, context, cfg.max_source_length, parts)
    prompt = render_chat(tokenizer, kept, True)
    prompt_len = _count(tokenizer, prompt)

    def answered(x: str) -> str:
        return render_chat(tokenizer, [*kept, {"role": "assistant", "content": x}], False)

    tgt_len = _count(tokenizer, answered(reply)) - prompt_len
    kept_reply, tgt_cut = fit_text(answered, reply, tokenizer, prompt_len + cfg.max_target_length)
    ids, labels = assistant_labels(tokenizer, [*kept, {"role": "assistant", "content": kept_reply}],
                                   last_only=cfg.assistant_loss == "last")
    return {"prompt": prompt, "input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels,
            "_src_len": src_len, "_tgt_len": tgt_len, "_src_cut": cut, "_tgt_cut": tgt_cut > 0,
            "_turns_cut": dropped}


def make_chat_encoder(tokenizer: Any, cfg: DataConfig) -> Callable[[dict[str, list]], dict[str, list]]:
    """The batched map function for prompt_format chat; checks the tokenizer first."""
    check_chat_tokenizer(tokenizer, f"tokenizer={cfg.tokenizer!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise DataConfigError(f"prompt_format='chat' needs a fast tokenizer (character offsets find the "
                              f"assistant turns); tokenizer={cfg.tokenizer!r} is a slow one")

    def encode(batch: dict[str, list]) -> dict[str, list]:
        rows = [encode_conversation(tokenizer, m, p, cfg)
                for m, p in zip(batch["messages"], batch["parts"], strict=True)]
        return {k: [r[k] for r in rows] for k in rows[0]}

    return encode
