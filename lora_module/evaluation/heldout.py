"""Held-out loss on the test references: what the `loss` and `perplexity` metrics are computed from.

    from lora_module.evaluation.heldout import reference_nll
    nll = reference_nll(model, tokenizer, prompts, references, gen)   # nll[i][j] = [summed NLL, tokens]

Each (prompt, reference) pair is scored teacher-forced, as training scores its validation rows: the
prompt is cut exactly as for generation (`generation.encode_prompts`), the reference is tokenized with
the tokenizer's own special tokens (seq2seq) or followed by EOS (causal), cut at `max_new_tokens`
(the prepared data's `max_target_length`), and only reference tokens count. Per-pair sums (not
means) let the metric registry pool tokens under any evaluation protocol.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from lora_module.evaluation.generation import (
    DEFAULT_MAX_NEW_TOKENS,
    GenerationConfig,
    encode_prompts,
    pad_batch,
    pad_token_id,
    unwrap_model,
)
from lora_module.prompt import special_affixes

_IGNORE = -100


def _targets(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_len: int, is_seq2seq: bool
             ) -> list[list[int]]:
    prefix, suffix = special_affixes(tokenizer)
    if not is_seq2seq:  # a causal target ends with EOS, as the data stage encodes it
        prefix, suffix = [], [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    room = max(1, max_len - len(prefix) - len(suffix))
    content = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [prefix + c[:room] + suffix for c in content]


@torch.inference_mode()
def reference_nll(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                  references: Sequence[Sequence[str]], config: GenerationConfig | None = None
                  ) -> list[list[list[float]]]:
    """Per example, per reference: [summed negative log-likelihood (nats), reference tokens]."""
    config = config or GenerationConfig()
    hf_model = unwrap_model(model)
    is_seq2seq = bool(getattr(hf_model.config, "is_encoder_decoder", False))
    device = next(hf_model.parameters()).device
    sources = encode_prompts(tokenizer, prompts, config.max_source_length, is_seq2seq,
                             add_special_tokens=config.add_special_tokens)
    pairs = [(i, j) for i, refs in enumerate(references) for j in range(len(refs))]
    targets = _targets(tokenizer, [references[i][j] for i, j in pairs],
                       config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, is_seq2seq)
    out: list[list[list[float]]] = [[[0.0, 0] for _ in refs] for refs in references]
    pad = pad_token_id(tokenizer)
    for start in range(0, len(pairs), config.batch_size):
        batch = list(range(start, min(start + config.batch_size, len(pairs))))
        src = [sources[pairs[k][0]] for k in batch]
        tgt = [targets[k] for k in batch]
        nll, count = _batch_nll(hf_model, src, tgt, pad, is_seq2seq, device)
        for k, total, n in zip(batch, nll, count, strict=True):
            i, j = pairs[k]
            out[i][j] = [total, n]
    return out


def _batch_nll(model: torch.nn.Module, src: list[list[int]], tgt: list[list[int]], pad: int, is_seq2seq: bool,
               device: torch.device) -> tuple[list[float], list[int]]:
    """Summed NLL and token count of each target given its source, one forward pass."""
    if is_seq2seq:
        input_ids, attention = pad_batch(src, pad, left=False)
        labels, _ = pad_batch(tgt, _IGNORE, left=False)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                       labels=labels.to(device)).logits  # [B, T_tgt, V]
    else:
        input_ids, attention = pad_batch([s + t for s, t in zip(src, tgt, strict=True)], pad, left=False)
        labels, _ = pad_batch([[_IGNORE] * len(s) + t for s, t in zip(src, tgt, strict=True)], _IGNORE,
                              left=False)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits[:, :-1]
        labels = labels[:, 1:]  # token t is predicted at position t - 1
    labels = labels.to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=_IGNORE,
                                            reduction="none").sum(dim=1)  # [B]
    return nll.tolist(), (labels != _IGNORE).sum(dim=1).tolist()
