"""The causal demo base model: a small Llama with a chat template that learns the corpus's language by
next-token prediction, then answers instructions given as chat turns.

    lora-pipeline demo-base runs/demo_base --family causal    # builds (or reuses) and prints the folder
    from lora_module.training.demo_causal import build_causal_demo_base
    base_dir = build_causal_demo_base("runs/demo_base", corpus_size=2000, seed=0, steps=300)

The decoder-only counterpart of the T5 demo base (lora_module/training/demo_base.py), in the same two
stages at demo size, as instruct models are made:
1. Language modelling (`steps`): packed corpus texts (dialogues and summaries, `<s> text </s>`),
   loss on every token.
2. Instruction tuning (`instruction_steps`): the demo corpus's OTHER tasks
   (`lora_pipeline.data.demo_instructions`: key facts, names, days, quoted lines, ...) as one user turn
   rendered by the tokenizer's chat template with its generation prompt, then the answer and `</s>`;
   loss on the answer tokens only (the assistant's turn), as chat fine-tuning does. The demo's
   evaluation tasks (summary, topic) are never trained on.

The tokenizer is the byte-level BPE of lora_pipeline.data.tokenizer (style "causal": `<s>` first,
left padding), trained on the corpus, the prompts and the chat markup, with `CHAT_TEMPLATE` set:
`<s><|user|>\\n...</s>\\n<|assistant|>\\n` (Llama-3 / ChatML-like over the tokenizer's own specials).

The result is a `save_pretrained` folder under `<out_dir>/demo-llama-<fingerprint[:12]>/`, reused when
the fingerprint (every build parameter, the procedure version, the texts, the chat template) matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from lora_module.errors import SettingsError
from lora_module.files import move_aside, publish_dir
from lora_module.training.demo_common import (
    MANIFEST,
    complete,
    corpus_texts,
    lr_schedule,
    padded,
    tokenizer_texts,
)
from lora_pipeline.data.tokenizer import train_tokenizer

BUILD_VERSION = 1
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# The chat markup, repeated in the tokenizer's training texts so each marker is one or two tokens.
_MARKUP = ["<|system|>\n", "<|user|>\n", "<|assistant|>\n"]


@dataclass(frozen=True)
class CausalDemoConfig:
    """Everything that determines the causal demo base; its hash names the output folder."""

    corpus_size: int = 2000
    """Demo corpus examples (dialogue + summary texts) for the tokenizer and language modelling."""
    seed: int = 0
    """Seed of the weight init and the batch order."""
    corpus_seed: int = 1
    """Seed of the corpus rows; the demo tasks use seed 0, so the base never sees their test dialogues."""
    steps: int = 250
    """Optimizer steps of language modelling."""
    batch_size: int = 16
    """Sequences per step."""
    seq_len: int = 96
    """Tokens per packed language-modelling sequence."""
    lr: float = 3e-3
    """Peak learning rate (linear warmup over 5% of all steps, then cosine decay to 10%)."""
    vocab_size: int = 4000
    """Byte-level BPE vocabulary size."""
    hidden_size: int = 128
    """Hidden size."""
    num_layers: int = 2
    """Decoder layers."""
    num_heads: int = 4
    """Attention heads (as many key/value heads)."""
    intermediate_size: int = 384
    """Gated (SwiGLU) feed-forward inner size."""
    instruction_steps: int = 600
    """Optimizer steps on the chat-formatted instruction mixture after language modelling (0: none). 600,
    not 250: LoRA on a base tuned this long copies names and details from the prompt as full
    fine-tuning does (benchmarks/RESULTS.md, "Causal demo: a stronger base")."""
    instruction_rows: int = 2000
    """(prompt, answer) pairs in the instruction mixture."""
    max_prompt_tokens: int = 320
    """Instruction prompts longer than this (chat markup included) are left out of the mixture."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "lr":
                if not isinstance(value, int | float) or not 0 < value < float("inf"):
                    raise SettingsError(f"CausalDemoConfig.lr must be a finite number > 0, got {value!r}")
                continue
            low = 0 if f.name in ("seed", "corpus_seed", "instruction_steps") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SettingsError(f"CausalDemoConfig.{f.name} must be an integer >= {low}, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise SettingsError(f"CausalDemoConfig.hidden_size ({self.hidden_size}) must be divisible by "
                                f"num_heads ({self.num_heads})")


def chat_instructions(rows: int, seed: int) -> list[tuple[str, str]]:
    """(user turn, answer) pairs: the instruction mixture with each prompt's answer cue ("Key facts: ")
    dropped, since in a chat the assistant's turn is the cue."""
    from lora_pipeline.data.demo_instructions import generate_instructions

    return [(prompt.rstrip().rsplit("\n\n", 1)[0], answer)
            for prompt, answer in generate_instructions(rows, seed)]


def fingerprint(config: CausalDemoConfig, texts: list[str]) -> str:
    """Hash of the build parameters, the procedure version, the chat template and the texts."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": BUILD_VERSION, "family": "causal", "chat_template": CHAT_TEMPLATE,
                         **asdict(config)}, sort_keys=True).encode())
    for text in texts:
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()


def make_model(config: CausalDemoConfig, vocab_size: int) -> LlamaForCausalLM:
    """A Llama-shaped model (RMSNorm, rotary positions, SwiGLU, untied head) at demo size."""
    torch.manual_seed(config.seed)
    llama = LlamaConfig(
        vocab_size=vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads, max_position_embeddings=1024, rms_norm_eps=1e-6,
        pad_token_id=0, eos_token_id=1, bos_token_id=3, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(llama)


def pack_causal(tokenizer: PreTrainedTokenizerBase, texts: list[str], seq_len: int) -> torch.Tensor:
    """`<s> text </s>` for every text, concatenated and cut into rows of `seq_len` tokens."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = [i for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in (bos, *row, eos)]
    rows = len(ids) // seq_len
    if rows < 1:
        raise SettingsError(f"the corpus has {len(ids)} tokens, fewer than one sequence of "
                            f"seq_len={seq_len}; raise the corpus size or lower seq_len")
    return torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)  # [rows, seq_len]


def encode_chat(tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], max_prompt: int
                ) -> list[tuple[list[int], list[int]]]:
    """(prompt ids: the user turn rendered with the generation prompt, answer ids + `</s>`); pairs whose
    prompt is over `max_prompt` tokens are left out. The chat template writes `<s>` itself."""
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True) for p, _ in pairs]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer([a for _, a in pairs], add_special_tokens=False)["input_ids"]
    return [(p, [*a[:63], tokenizer.eos_token_id])
            for p, a in zip(prompt_ids, answer_ids, strict=True) if len(p) <= max_prompt]


def _batch(config: CausalDemoConfig, step: int, rows: torch.Tensor, chats: list[tuple[list[int], list[int]]],
           gen: torch.Generator, pad: int) -> dict[str, torch.Tensor]:
    """Step `step`'s batch: packed text (every token a label) or chat pairs (answer tokens only)."""
    if step < config.steps:
        picked = rows[torch.randint(len(rows), (config.batch_size,), generator=gen)]  # [B, seq_len]
        return {"input_ids": picked, "labels": picked}
    pairs = [chats[i] for i in torch.randint(len(chats), (config.batch_size,), generator=gen).tolist()]
    input_ids = padded([p + a for p, a in pairs], pad)  # [B, L], right padding
    labels = padded([[-100] * len(p) + a for p, a in pairs], -100)  # [B, L]: the answer and </s> only
    attention_mask = padded([[1] * (len(p) + len(a)) for p, a in pairs], 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pretrain(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, texts: list[str],
             config: CausalDemoConfig, chats: list[tuple[list[int], list[int]]], log_every: int = 50
             ) -> list[float]:
    """Language modelling, then chat instruction tuning, in a plain torch loop; every step's loss."""
    rows = pack_causal(tokenizer, texts, config.seq_len)
    total = config.steps + (config.instruction_steps if chats else 0)
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    sched = lr_schedule(opt, total)
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(total):
        loss = model(**_batch(config, step, rows, chats, gen, tokenizer.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            print(f"[demo_base causal] step {step + 1}/{total} loss {recent:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    return losses


def _train_tokenizer(texts: list[str], out: Path, vocab_size: int) -> PreTrainedTokenizerBase:
    train_tokenizer(texts, out, vocab_size=vocab_size, style="causal")
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return tokenizer


def build_causal_demo_base(out_dir: str | Path, corpus_size: int = 2000, seed: int = 0, steps: int = 250,
                           log_every: int = 50, **overrides: object) -> Path:
    """Build (or reuse) the causal demo base; returns its `save_pretrained` folder (model + tokenizer
    with its chat template). `overrides` sets any other `CausalDemoConfig` field."""
    config = CausalDemoConfig(corpus_size=corpus_size, seed=seed, steps=steps, **overrides)  # type: ignore[arg-type]
    texts = corpus_texts(config.corpus_size, config.corpus_seed)
    pairs = chat_instructions(config.instruction_rows, config.corpus_seed) if config.instruction_steps else []
    tok_texts = tokenizer_texts(config.corpus_size, config.corpus_seed, texts) + _MARKUP * 200
    fp = fingerprint(config, tok_texts + [text for pair in pairs for text in pair])
    final = Path(out_dir) / f"demo-llama-{fp[:12]}"
    if complete(final, fp):
        return final
    # Built beside the final folder and renamed at the end: a crash leaves nothing a later call reuses.
    tmp = Path(out_dir) / f".tmp-demo-llama-{fp[:12]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    tokenizer = _train_tokenizer(tok_texts, tmp, config.vocab_size)
    model = make_model(config, len(tokenizer))
    chats = encode_chat(tokenizer, pairs, config.max_prompt_tokens)
    random.Random(config.seed).shuffle(chats)
    losses = pretrain(model, tokenizer, texts, config, chats, log_every=log_every)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    window = max(1, min(50, len(losses) // 4))
    manifest = {
        "fingerprint": fp, "family": "causal", "config": asdict(config), "build_version": BUILD_VERSION,
        "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
        "instruction_pairs": len(chats), "instruction_pairs_left_out": len(pairs) - len(chats),
        "loss_first": sum(losses[:window]) / window, "loss_last": sum(losses[-window:]) / window,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if final.exists():
        move_aside(final)  # an incomplete folder left by a crashed build: kept, under another name
    publish_dir(tmp, final)
    return final
