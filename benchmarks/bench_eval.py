"""Generation throughput for evaluation: batching + length sorting, and merged vs unmerged LoRA.

Contenders, all greedy on the same prompts with a randomly initialised small T5 (no download):

- one prompt at a time (`batch_size=1`), batched in input order, batched after sorting by length;
- a LoRA adapter (r=16 on q, k, v, o) generating unmerged vs merged into the base weights.

Outputs are checked to be identical between contenders; the figures are throughput ratios.

    lora-pipeline bench --only eval       # full size, writes benchmarks/out/bench_eval.{json,md}
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

from lora_module import LoraConfig, LoraModel
from lora_module.evaluation.generation import GenerationConfig, generate
from lora_pipeline.benchmarks.common import Figure, time_interleaved, write_results
from lora_pipeline.data.demo_corpus import generate as demo_corpus
from lora_pipeline.data.tokenizer import train_tokenizer

NAME = "bench_eval"


def _setting(quick: bool) -> dict:
    if quick:
        return {
            "n": 8,
            "batch_size": 4,
            "max_new_tokens": 4,
            "d_model": 32,
            "layers": 1,
            "heads": 2,
            "d_ff": 64,
            "vocab": 512,
            "repeats": 1,
            "lora_r": 4,
        }
    return {
        "n": 64,
        "batch_size": 16,
        "max_new_tokens": 32,
        "d_model": 256,
        "layers": 4,
        "heads": 4,
        "d_ff": 1024,
        "vocab": 4000,
        "repeats": 3,
        "lora_r": 16,
    }


def _prompts(n: int) -> list[str]:
    """Demo dialogues joined 1-4 at a time: prompt lengths spread like real dialogue data."""
    rows = demo_corpus(4 * n, seed=0)
    out = []
    for i in range(n):
        k = 1 + (i * 7) % 4
        body = "\n".join(r["dialogue"] for r in rows[4 * i : 4 * i + k])
        out.append(f"Summarize the following conversation.\n\n{body}\n\nSummary: ")
    return out


def _model(s: dict, vocab_size: int) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=s["d_model"],
        d_kv=s["d_model"] // s["heads"],
        d_ff=s["d_ff"],
        num_layers=s["layers"],
        num_decoder_layers=s["layers"],
        num_heads=s["heads"],
        dropout_rate=0.0,
        feed_forward_proj="relu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
    return T5ForConditionalGeneration(config).eval()


def run(quick: bool = False, out_dir: Path | None = None) -> Path:
    """Measure and write `bench_eval.json` / `.md`; returns the JSON path."""
    s = _setting(quick)
    prompts = _prompts(s["n"])
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = train_tokenizer(
            [r["dialogue"] for r in demo_corpus(300, seed=1)], Path(tmp), s["vocab"], "seq2seq"
        )
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    model = _model(s, len(tokenizer))
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]

    def gen_cfg(batch_size: int, sort: bool) -> GenerationConfig:
        return GenerationConfig(
            batch_size=batch_size, max_new_tokens=s["max_new_tokens"], sort_by_length=sort, device="cpu"
        )

    contenders = {
        "one_at_a_time": lambda: generate(model, tokenizer, prompts, gen_cfg(1, False)),
        "batched_unsorted": lambda: generate(model, tokenizer, prompts, gen_cfg(s["batch_size"], False)),
        "batched_sorted": lambda: generate(model, tokenizer, prompts, gen_cfg(s["batch_size"], True)),
    }
    outputs = {k: fn() for k, fn in contenders.items()}
    # The runs above (kept for the identical-output check) are the warm-up.
    batching = time_interleaved(contenders, repeats=s["repeats"], warmup=0)

    lora = LoraModel(
        copy.deepcopy(model),
        LoraConfig(r=s["lora_r"], lora_alpha=2 * s["lora_r"], target_modules=["q", "k", "v", "o"]),
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    merged = copy.deepcopy(lora).merge_and_unload()
    sorted_cfg = gen_cfg(s["batch_size"], True)
    lora_contenders = {
        "lora_unmerged": lambda: generate(lora, tokenizer, prompts, sorted_cfg),
        "lora_merged": lambda: generate(merged, tokenizer, prompts, sorted_cfg),
    }
    lora_outputs = {k: fn() for k, fn in lora_contenders.items()}
    merging = time_interleaved(lora_contenders, repeats=s["repeats"], warmup=0)

    n = len(prompts)
    throughput = {k: n / v for k, v in {**batching, **merging}.items()}  # examples per second
    figures = [
        Figure(
            "batched+sorted vs one at a time (throughput ratio)",
            batching["one_at_a_time"] / batching["batched_sorted"],
            goal=3.0,
            direction=">=",
            detail={"batch_size": s["batch_size"]},
        ),
        Figure(
            "batched+sorted vs batched in input order (throughput ratio)",
            batching["batched_unsorted"] / batching["batched_sorted"],
        ),
        Figure(
            "merged vs unmerged LoRA generation (throughput ratio)",
            merging["lora_unmerged"] / merging["lora_merged"],
            goal=1.0,
            direction=">=",
            detail={"r": s["lora_r"], "targets": ["q", "k", "v", "o"]},
        ),
    ]
    for k, v in throughput.items():
        figures.append(Figure(f"throughput {k}", v, unit="examples/s"))
    raw = {
        "setting": s,
        "quick": quick,
        "prompt_tokens": {"min": min(lengths), "max": max(lengths), "mean": sum(lengths) / n},
        "seconds": {**batching, **merging},
        "examples_per_s": throughput,
        "outputs_identical": {
            "batched_sorted_vs_one_at_a_time": outputs["batched_sorted"] == outputs["one_at_a_time"],
            "batched_unsorted_vs_one_at_a_time": outputs["batched_unsorted"] == outputs["one_at_a_time"],
            "lora_merged_vs_unmerged": lora_outputs["lora_merged"] == lora_outputs["lora_unmerged"],
        },
        "threads": torch.get_num_threads(),
    }
    return write_results(NAME, figures, raw, out_dir)


if __name__ == "__main__":
    path = run(quick=False)
    print(path.with_suffix(".md").read_text())
