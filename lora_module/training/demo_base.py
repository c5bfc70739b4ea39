"""The demo base model: a small T5 that learns the corpus's language by denoising, then follows instructions.

    lora-pipeline demo-base runs/demo_base            # builds (or reuses) and prints the folder
    lora-pipeline demo-base runs/demo_base --steps 100 --instruction-steps 50   # stage 1, stage 2 steps
    lora-pipeline demo-base runs/demo_base --family causal   # the Llama with a chat template (demo_causal.py)
    from lora_module.training.demo_base import build_demo_base
    base_dir = build_demo_base("runs/demo_base", corpus_size=2000, seed=0, steps=300)

Why this recipe: the reference experiment adapts FLAN-T5, a T5 pretrained by denoising and then
instruction-tuned on a mixture of tasks, which is why it already scores on DialogSum (ROUGE-1 23.3)
before any fine-tuning. The demo base follows the same two stages at demo size:
1. Denoising (`steps`): each step corrupts packed corpus text T5-style (15% of tokens masked in
   spans of mean length 3, each span replaced by a sentinel `<extra_id_N>`); every other step the
   target is the masked spans (T5 span corruption), in between the whole original sequence
   (BART-style denoising).
2. Instruction tuning (`instruction_steps`): (prompt, answer) pairs of OTHER tasks on the corpus's
   dialogues, from `lora_pipeline.data.demo_instructions` (key facts, who speaks first, quote a
   speaker's first or last line, names, days, turn count), several phrasings each. The demo's
   evaluation tasks (summary, topic) are never trained on: their prompts and labels only shape the
   tokenizer, so the base answers the summary prompt zero-shot, as FLAN-T5 does.

What we measured before the instruction stage (topic, ROUGE-L): after span corruption alone (300
steps) the decoder ignored its input (same loss with another text's input) and full fine-tuning
reached only 28 after 400 steps, against 92 from random weights; from the denoising mixture, 81
after 150 steps. That base scored 0 on both demo tasks; with the instruction stage it scores above
0 on summary without fine-tuning (numbers in benchmarks/RESULTS.md, "Demo").

The result is a standard `save_pretrained` folder (model + tokenizer) under
`<out_dir>/demo-t5-<fingerprint[:12]>/`; the fingerprint covers every build parameter and the corpus
text, so a second call with the same arguments returns the existing folder at once and a call with
other arguments builds next to it (earlier builds are never deleted).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5Config, T5ForConditionalGeneration

from lora_module.errors import ArgumentParser, SettingsError, check_output_dir
from lora_module.files import move_aside, publish_dir
from lora_module.training.demo_common import (
    MANIFEST,
    complete,
    corpus_texts,
    lr_schedule,
    padded,
    tokenizer_texts,
)
from lora_pipeline.data.tokenizer import NUM_SENTINELS, train_tokenizer

# Bump when the build procedure changes in a way the parameters do not show.
BUILD_VERSION = 3
OBJECTIVES = ("span", "denoise", "mixed")
FAMILIES = ("seq2seq", "causal")  # seq2seq: the T5 below; causal: demo_causal's Llama with a chat template


@dataclass(frozen=True)
class DemoBaseConfig:
    """Everything that determines the demo base model; its hash names the output folder."""

    corpus_size: int = 2000
    """Demo corpus examples (dialogue + summary texts) used for the tokenizer and pretraining."""
    seed: int = 0
    """Seed for the weight init, the batch order and the span masks."""
    corpus_seed: int = 1
    """Seed of the corpus rows; the demo tasks use seed 0, so the base never sees their test dialogues."""
    steps: int = 300
    """Optimizer steps of span-corruption pretraining."""
    batch_size: int = 16
    """Sequences per step."""
    seq_len: int = 96
    """Tokens per packed sequence before corruption."""
    lr: float = 3e-3
    """Peak learning rate (linear warmup over 5% of steps, then cosine decay to 10%)."""
    vocab_size: int = 4000
    """Byte-level BPE vocabulary size of the demo tokenizer."""
    d_model: int = 128
    """Hidden size."""
    num_layers: int = 2
    """Encoder layers (the decoder has as many)."""
    num_heads: int = 4
    """Attention heads; d_kv = d_model / num_heads."""
    d_ff: int = 512
    """Feed-forward inner size (gated GELU, as in T5 v1.1 / FLAN-T5)."""
    noise_density: float = 0.15
    """Share of tokens masked."""
    mean_span: float = 3.0
    """Mean masked span length in tokens."""
    objective: str = "mixed"
    """"span" (T5: targets are the masked spans), "denoise" (targets are the whole original sequence,
    as in BART) or "mixed" (alternate the two step by step)."""
    instruction_steps: int = 300
    """Optimizer steps on the instruction mixture after denoising (0: a denoising-only base)."""
    instruction_rows: int = 2000
    """(prompt, answer) pairs in the instruction mixture (lora_pipeline.data.demo_instructions)."""
    max_prompt_tokens: int = 256
    """Instruction prompts are cut to this many tokens."""

    def __post_init__(self) -> None:
        for name in ("seed", "corpus_seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise SettingsError(f"DemoBaseConfig.{name} must be an integer >= 0, got {value!r}")
        sizes = ("corpus_size", "steps", "batch_size", "seq_len", "d_model", "num_layers", "num_heads",
                 "d_ff", "instruction_rows", "max_prompt_tokens")
        for name in sizes:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SettingsError(f"DemoBaseConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.instruction_steps, int) or self.instruction_steps < 0:
            raise SettingsError(f"DemoBaseConfig.instruction_steps must be an integer >= 0, "
                                f"got {self.instruction_steps!r}")
        if self.d_model % self.num_heads:
            raise SettingsError(
                f"DemoBaseConfig.d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"
            )
        for name in ("lr", "mean_span"):  # NaN and inf fail too
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 < value < float("inf"):
                raise SettingsError(f"DemoBaseConfig.{name} must be a finite number > 0, got {value!r}")
        if not 0.0 < self.noise_density < 0.5:
            raise SettingsError(
                f"DemoBaseConfig.noise_density must be in (0, 0.5), got {self.noise_density!r}")
        if self.objective not in OBJECTIVES:
            raise SettingsError(f"DemoBaseConfig.objective must be one of {list(OBJECTIVES)}, "
                                f"got {self.objective!r}")
        if self.mean_span < 1:
            raise SettingsError(f"DemoBaseConfig.mean_span must be >= 1, got {self.mean_span!r}")
        if self.seq_len < 16:
            raise SettingsError(f"DemoBaseConfig.seq_len must be >= 16 tokens, got {self.seq_len!r}")
        if self.lr <= 0:
            raise SettingsError(f"DemoBaseConfig.lr must be > 0, got {self.lr!r}")
        spans = _num_spans(self.seq_len, self.noise_density, self.mean_span)
        if spans > NUM_SENTINELS:
            raise SettingsError(
                f"DemoBaseConfig: seq_len={self.seq_len} needs {spans} sentinels but the tokenizer has "
                f"{NUM_SENTINELS}; lower seq_len or noise_density, or raise mean_span"
            )


def fingerprint(config: DemoBaseConfig, texts: list[str]) -> str:
    """Hash of the build parameters, the procedure version and the corpus text (tokenizer texts)."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": BUILD_VERSION, **asdict(config)}, sort_keys=True).encode())
    for text in texts:
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()


def _num_spans(length: int, noise_density: float, mean_span: float) -> int:
    num_noise = min(max(1, round(length * noise_density)), length - 1)
    return max(1, round(num_noise / mean_span))


def _segment(total: int, parts: int, rng: random.Random) -> list[int]:
    """Split `total` into `parts` positive integers uniformly at random."""
    cuts = sorted(rng.sample(range(1, total), parts - 1)) if parts > 1 else []
    edges = [0, *cuts, total]
    return [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]


def span_corrupt(
    tokens: list[int], sentinel_ids: list[int], eos_id: int, noise_density: float, mean_span: float,
    rng: random.Random,
) -> tuple[list[int], list[int]]:
    """T5 span corruption of one sequence: (inputs with sentinels, targets = sentinel + masked span, ...).

    The number of masked tokens and spans depends only on the length, so every sequence of one length
    yields inputs and targets of fixed lengths and a batch needs no padding.
    """
    length = len(tokens)
    num_noise = min(max(1, round(length * noise_density)), length - 1)
    num_spans = _num_spans(length, noise_density, mean_span)
    noise_lens = _segment(num_noise, num_spans, rng)
    keep_lens = _segment(length - num_noise, num_spans, rng)
    inputs: list[int] = []
    targets: list[int] = []
    pos = 0
    for i, (keep, noise) in enumerate(zip(keep_lens, noise_lens, strict=True)):
        inputs.extend(tokens[pos : pos + keep])
        pos += keep
        inputs.append(sentinel_ids[i])
        targets.append(sentinel_ids[i])
        targets.extend(tokens[pos : pos + noise])
        pos += noise
    inputs.append(eos_id)
    targets.append(eos_id)
    return inputs, targets


def pack(tokenizer: PreTrainedTokenizerBase, texts: list[str], seq_len: int) -> torch.Tensor:
    """Tokenize texts (each ends with </s>), concatenate and cut into rows of `seq_len` tokens."""
    ids = [i for row in tokenizer(texts, add_special_tokens=True)["input_ids"] for i in row]
    rows = len(ids) // seq_len
    if rows < 1:
        raise SettingsError(f"the corpus has {len(ids)} tokens, fewer than one sequence of "
                            f"seq_len={seq_len}; raise the corpus size or lower seq_len")
    return torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)  # [rows, seq_len]


def make_model(config: DemoBaseConfig, vocab_size: int) -> T5ForConditionalGeneration:
    """A FLAN-T5-shaped model (gated GELU, untied head, relative attention) at demo size."""
    torch.manual_seed(config.seed)
    t5 = T5Config(
        vocab_size=vocab_size, d_model=config.d_model, d_kv=config.d_model // config.num_heads,
        d_ff=config.d_ff, num_layers=config.num_layers, num_decoder_layers=config.num_layers,
        num_heads=config.num_heads, relative_attention_num_buckets=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
    model = T5ForConditionalGeneration(t5)
    # An untied head initialised at std 1 starts with logits of size ~sqrt(d_model) and a loss near 80;
    # the tied-embedding scale d_model**-0.5 starts near log(vocab) and converges in fewer steps.
    torch.nn.init.normal_(model.lm_head.weight, std=config.d_model**-0.5)
    return model


def encode_instructions(tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], max_prompt: int
                        ) -> list[tuple[list[int], list[int]]]:
    """(prompt ids cut to `max_prompt` tokens, answer ids), each ending with </s>."""
    prompts = tokenizer([p for p, _ in pairs], max_length=max_prompt, truncation=True)["input_ids"]
    answers = tokenizer([a for _, a in pairs], max_length=64, truncation=True)["input_ids"]
    return list(zip(prompts, answers, strict=True))


def pretrain(
    model: T5ForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, texts: list[str],
    config: DemoBaseConfig, log_every: int = 50,
    instructions: list[tuple[list[int], list[int]]] | None = None,
) -> list[float]:
    """Denoising pretraining, then instruction tuning, in a plain torch loop; returns every step's loss.

    Why not span corruption alone: in a run this short the decoder settles on predicting likely
    span tokens without reading the encoder (its loss was the same with another text's input), and
    fine-tuning from such a base learned slower than from random weights. Reconstruction steps give
    the decoder targets that depend on the whole input. The `config.instruction_steps` steps after
    them train on `instructions` (encoded (prompt, answer) pairs), as FLAN-T5 follows T5.
    """
    rows = pack(tokenizer, texts, config.seq_len)  # [n, seq_len]
    sentinels = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(NUM_SENTINELS)])
    if tokenizer.unk_token_id in sentinels:
        raise SettingsError("the tokenizer lacks the <extra_id_N> sentinels span corruption needs; use one "
                            "trained by lora_pipeline.data.tokenizer.train_tokenizer (it adds them)")
    instruct_steps = config.instruction_steps if instructions else 0
    eos, rng = tokenizer.eos_token_id, random.Random(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    sched = lr_schedule(opt, config.steps + instruct_steps)
    model.train()
    losses: list[float] = []
    order, cursor = torch.randperm(len(rows), generator=gen), 0
    t0 = time.perf_counter()
    for step in range(config.steps + instruct_steps):
        if step >= config.steps:
            batch = [instructions[i] for i in torch.randint(len(instructions), (config.batch_size,),
                                                            generator=gen).tolist()]
            input_ids = padded([p for p, _ in batch], tokenizer.pad_token_id)  # [B, L_prompt]
            labels = padded([a for _, a in batch], -100)  # [B, L_answer], padding ignored by the loss
            attention_mask = (input_ids != tokenizer.pad_token_id).long()
        else:
            if cursor + config.batch_size > len(order):
                order, cursor = torch.randperm(len(rows), generator=gen), 0
            batch = rows[order[cursor : cursor + config.batch_size]].tolist()
            cursor += config.batch_size
            pairs = [span_corrupt(r, sentinels, eos, config.noise_density, config.mean_span, rng)
                     for r in batch]
            input_ids, attention_mask = torch.tensor([p[0] for p in pairs]), None  # [B, L_in]
            if config.objective == "denoise" or (config.objective == "mixed" and step % 2):
                labels = torch.tensor([[*r, eos] for r in batch])  # [B, seq_len + 1]: the original text
            else:
                labels = torch.tensor([p[1] for p in pairs])  # [B, L_tgt]: sentinel + masked span, ...
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            print(f"[demo_base] step {step + 1}/{config.steps + instruct_steps} loss {recent:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    return losses


def _build_other_family(family: str, out_dir: str | Path, corpus_size: int, seed: int, log_every: int,
                        overrides: dict[str, object]) -> Path:
    """The causal base (lora_module.training.demo_causal); an unknown family is refused in one line."""
    if family not in FAMILIES:
        raise SettingsError(f"demo base family must be one of {list(FAMILIES)}, got {family!r}")
    from lora_module.training.demo_causal import build_causal_demo_base

    return build_causal_demo_base(out_dir, corpus_size, seed, log_every=log_every, **overrides)


def build_demo_base(
    out_dir: str | Path,
    corpus_size: int = 2000,
    seed: int = 0,
    steps: int | None = None,
    log_every: int = 50,
    family: str = "seq2seq",
    **overrides: object,
) -> Path:
    """Build (or reuse) the demo base model: the T5 (`family` "seq2seq") or the Llama with a chat template
    ("causal", lora_module.training.demo_causal); returns its `save_pretrained` folder. `overrides` sets
    other fields of that family's config (DemoBaseConfig / CausalDemoConfig); `steps` None: its default."""
    if steps is not None:
        overrides["steps"] = steps
    if family != "seq2seq":
        return _build_other_family(family, out_dir, corpus_size, seed, log_every, overrides)
    config = DemoBaseConfig(corpus_size=corpus_size, seed=seed, **overrides)  # type: ignore[arg-type]
    texts = corpus_texts(config.corpus_size, config.corpus_seed)
    tok_texts = tokenizer_texts(config.corpus_size, config.corpus_seed, texts)
    from lora_pipeline.data.demo_instructions import generate_instructions

    pairs = (generate_instructions(config.instruction_rows, config.corpus_seed)
             if config.instruction_steps else [])
    fp = fingerprint(config, tok_texts + [text for pair in pairs for text in pair])
    final = Path(out_dir) / f"demo-t5-{fp[:12]}"
    if complete(final, fp):
        return final

    # Build beside the final folder and rename at the end: a crash leaves no half-written model
    # that a later call could mistake for a finished one.
    tmp = Path(out_dir) / f".tmp-demo-t5-{fp[:12]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    train_tokenizer(tok_texts, tmp, vocab_size=config.vocab_size, style="seq2seq")
    tokenizer = AutoTokenizer.from_pretrained(tmp)
    model = make_model(config, len(tokenizer))
    t_tok = time.perf_counter() - t0
    instructions = encode_instructions(tokenizer, pairs, config.max_prompt_tokens) if pairs else None
    losses = pretrain(model, tokenizer, texts, config, log_every=log_every, instructions=instructions)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    window = max(1, min(50, len(losses) // 4))
    manifest = {
        "fingerprint": fp,
        "config": asdict(config),
        "build_version": BUILD_VERSION,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "loss_first": sum(losses[:window]) / window,
        "loss_last": sum(losses[-window:]) / window,
        "tokenizer_seconds": round(t_tok, 2),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if final.exists():
        move_aside(final)  # an incomplete folder left by a crashed older build: keep it, under another name
    publish_dir(tmp, final)
    return final


def read_manifest(path: str | Path) -> dict:
    """The build record written next to the model (fingerprint, config, losses, seconds)."""
    return json.loads((Path(path) / MANIFEST).read_text())


def main(argv: list[str] | None = None) -> None:
    """`lora-pipeline demo-base OUT_DIR [...]`: build (or reuse), then print the folder and its manifest."""
    parser = ArgumentParser(prog="lora-pipeline demo-base",
                            description="Build (or reuse) the demo base T5 model: --steps of denoising "
                            "pretraining, then --instruction-steps of instruction tuning.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out_dir", type=Path,
                        help="folder that holds the builds (each in demo-t5-<fingerprint>/)")
    parser.add_argument("--corpus-size", type=int, default=DemoBaseConfig.corpus_size,
                        help="demo corpus examples for the tokenizer and pretraining")
    parser.add_argument("--seed", type=int, default=0, help="seed of weight init, batch order and span masks")
    parser.add_argument("--steps", type=int,
                        help="optimizer steps of stage 1, denoising pretraining, only; stage 2 runs "
                        "--instruction-steps more (None: the family's default, 300 seq2seq, 250 causal)")
    parser.add_argument("--family", choices=FAMILIES, default="seq2seq",
                        help="seq2seq: the T5 (demo-t5-*); causal: a Llama with a chat template "
                        "(demo-llama-*)")
    parser.add_argument("--instruction-steps", type=int,
                        help="optimizer steps of stage 2, instruction tuning, after --steps (None: the "
                        "family's default, 300 seq2seq, 600 causal; 0: a "
                        "denoising-only base, which does not answer the summary prompt zero-shot)")
    args = parser.parse_args(argv)
    check_output_dir(args.out_dir, "demo-base OUT_DIR")  # before minutes of training, not after
    from lora_module.training.demo_causal import CausalDemoConfig

    family = {"family": "causal"} if args.family == "causal" else {}
    config = CausalDemoConfig if family else DemoBaseConfig
    instruction_steps = config.instruction_steps if args.instruction_steps is None else args.instruction_steps
    path = build_demo_base(args.out_dir, args.corpus_size, args.seed, args.steps,
                           instruction_steps=instruction_steps, **family)
    print(path)
    print(json.dumps(read_manifest(path), indent=2))
