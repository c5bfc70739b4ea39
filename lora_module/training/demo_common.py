"""What both demo bases share (the T5 of demo_base.py, the Llama of demo_causal.py): the corpus texts, the
tokenizer's texts, the learning-rate schedule, padding, and the build record that marks a finished build.

    from lora_module.training.demo_common import corpus_texts, lr_schedule
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

MANIFEST = "demo_base.json"


def corpus_texts(corpus_size: int, seed: int) -> list[str]:
    """Dialogues and summaries of the demo corpus as plain texts (no task framing, no topic labels)."""
    from lora_pipeline.data.demo_corpus import generate

    texts: list[str] = []
    for row in generate(corpus_size, seed):
        texts.append(row["dialogue"])
        texts.append(row["summary"])
    return texts


def tokenizer_texts(corpus_size: int, seed: int, pretrain_texts: list[str]) -> list[str]:
    """Pretraining texts plus the topic labels and prompt templates, so the task prompts of both demo
    tasks and of the instruction mixture tokenize into whole words (the data stage reuses this
    tokenizer for the prepared data). Only the tokenizer sees the labels: no training step does."""
    from lora_pipeline.data.config import DEFAULT_TEMPLATES
    from lora_pipeline.data.demo_corpus import generate
    from lora_pipeline.data.demo_instructions import all_phrasings

    topics = [row["topic"] for row in generate(corpus_size, seed)]
    templates = [t.replace("{dialogue}", "") for t in DEFAULT_TEMPLATES.values()] + all_phrasings()
    return pretrain_texts + topics + templates * 50


def lr_schedule(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over 5% of `total` steps, then cosine decay to 10% of the peak."""
    warmup = max(1, total // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def padded(rows: list[list[int]], fill: int) -> torch.Tensor:
    """Rows right-padded with `fill` to the longest: [len(rows), width]."""
    width = max(map(len, rows))
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows])


def complete(path: Path, fp: str) -> bool:
    """True when `path` holds a finished build with fingerprint `fp` (manifest, weights, tokenizer)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    has_weights = any((path / name).exists() for name in ("model.safetensors", "pytorch_model.bin"))
    return manifest.get("fingerprint") == fp and has_weights and (path / "tokenizer.json").exists()
