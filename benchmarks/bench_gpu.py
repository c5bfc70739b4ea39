"""GPU benchmark: bf16 LoRA (ours vs PEFT) on a FLAN-T5-base-shaped model, and NF4 QLoRA memory.

    lora-pipeline bench --only gpu     # needs CUDA; a few minutes on one GPU

The model is built from a FLAN-T5-base-shaped config with random weights (no download): d_model
768, 12+12 layers, 12 heads, d_ff 2048, vocab 32128. LoRA r=32, alpha=32 on q,v (the reference
experiment). Batch 8 x 512 source -> 128 target tokens, bf16 weights. Figures: train tokens/s and
peak GPU memory for ours vs PEFT, and peak memory of NF4 QLoRA vs bf16 LoRA. Where no CUDA GPU is
available the results say so and nothing is measured.
Writes benchmarks/out/bench_gpu.{json,md}.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import T5Config, T5ForConditionalGeneration

from lora_pipeline.benchmarks.common import Figure, main, time_interleaved, write_results

FLAN_T5_BASE = {"d_model": 768, "d_kv": 64, "num_heads": 12, "d_ff": 2048, "num_layers": 12,
                "num_decoder_layers": 12, "vocab_size": 32128, "feed_forward_proj": "gated-gelu",
                "decoder_start_token_id": 0}
SETTINGS = {"full": {"batch": 8, "source_len": 512, "target_len": 128, "repeats": 10},
            "quick": {"batch": 2, "source_len": 64, "target_len": 16, "repeats": 2}}
LORA = {"r": 32, "lora_alpha": 32, "target_modules": ["q", "v"]}


def _model(contender: str) -> torch.nn.Module:
    torch.manual_seed(0)
    base = T5ForConditionalGeneration(T5Config(**FLAN_T5_BASE)).to(torch.bfloat16)
    if contender == "qlora":
        from lora_module import quantize_nf4

        base = quantize_nf4(base.cuda(), compute_dtype=torch.bfloat16)
    base = base.cuda()
    if contender == "peft":
        import peft

        return peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_2_SEQ_LM", **LORA)).train()
    from lora_module import LoraConfig, LoraModel

    return LoraModel(base, LoraConfig(**LORA)).train()


def run(quick: bool = False, out_dir: Path | None = None) -> Path:
    """Measure on CUDA (or record that no GPU was there); returns the JSON path."""
    if not torch.cuda.is_available():
        raw = {"measured": False, "reason": "no CUDA GPU on this machine: not measured"}
        return write_results("bench_gpu", [], raw, out_dir)
    setting = SETTINGS["quick" if quick else "full"]
    g = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(2, 32128, (setting["batch"], setting["source_len"]), generator=g).cuda(),
        "labels": torch.randint(2, 32128, (setting["batch"], setting["target_len"]), generator=g).cuda(),
    }
    tokens = setting["batch"] * (setting["source_len"] + setting["target_len"])
    seconds, peak = {}, {}
    for contender in ("ours", "peft", "qlora"):
        model = _model(contender)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, opt=opt) -> None:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        torch.cuda.reset_peak_memory_stats()
        seconds[contender] = time_interleaved({contender: step}, repeats=setting["repeats"])[contender]
        peak[contender] = torch.cuda.max_memory_allocated()
        del model, opt
        torch.cuda.empty_cache()
    tps = {k: tokens / v for k, v in seconds.items()}
    figures = [
        Figure("ours / PEFT bf16 train tokens/s", tps["ours"] / tps["peft"], goal=1.0, direction=">="),
        Figure("ours / PEFT bf16 peak GPU memory", peak["ours"] / peak["peft"], goal=1.0),
        Figure("NF4 QLoRA / bf16 LoRA peak GPU memory", peak["qlora"] / peak["ours"]),
    ]
    raw = {"measured": True, "setting": setting, "model": FLAN_T5_BASE, "lora": LORA,
           "step_seconds": seconds, "tokens_per_second": tps, "peak_bytes": peak}
    return write_results("bench_gpu", figures, raw, out_dir)


if __name__ == "__main__":
    main(run, __doc__, "small batch (seconds)")
