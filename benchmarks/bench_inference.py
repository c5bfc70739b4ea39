"""Inference benchmark: merged adapter vs bare base, unmerged overhead, adapter switching, load/size.

    lora-pipeline bench --only inference       # full size (about a minute on 2 cores)

One T5 built from a config (full size: the ~35M model of the other benchmarks), greedy decoding of
a fixed batch with a fixed number of new tokens (no early stop, so every contender emits the same
number of tokens). Contenders measured side by side in one process:
- per-token latency of the bare base, of the adapter merged and unloaded (`merge_and_unload`: what
  evaluation and serving run), merged in place (`merge_adapter`: our LoRA layers stay, skipping
  their adapter branch), and unmerged; plus the bare base timed twice per round, an A/A control
  whose distance from 1 is the noise floor of these ratios on the machine;
- switching between two adapters on one base (`set_adapter`) vs loading a second base from disk;
- adapter load time and bytes on disk vs a full `save_pretrained` of the model.
Writes benchmarks/out/bench_inference.{json,md}.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import T5Config, T5ForConditionalGeneration

from lora_module import LoraConfig, LoraModel
from lora_pipeline.benchmarks.common import Figure, main, time_interleaved, write_results

SETTINGS = {
    "full": {"model": {"d_model": 512, "d_kv": 64, "num_heads": 8, "d_ff": 1024, "num_layers": 6,
                       "num_decoder_layers": 6, "vocab_size": 8000},
             "batch": 4, "source_len": 128, "new_tokens": 32, "repeats": 7},
    "quick": {"model": {"d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 64, "num_layers": 2,
                        "num_decoder_layers": 2, "vocab_size": 512},
              "batch": 2, "source_len": 16, "new_tokens": 4, "repeats": 1},
}
LORA = LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"])


def _base(setting: dict) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(**setting["model"], decoder_start_token_id=0)).eval()


def _randomize_b(model: LoraModel, seed: int) -> None:
    """Give lora_B non-zero values so an adapter changes the outputs (a fresh one is a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(quick: bool = False, out_dir: Path | None = None) -> Path:
    """Measure and write JSON + Markdown; returns the JSON path."""
    setting = SETTINGS["quick" if quick else "full"]
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(2, setting["model"]["vocab_size"], (setting["batch"], setting["source_len"]),
                           generator=g)
    n_new = setting["new_tokens"]
    gen_kwargs = {"max_new_tokens": n_new, "min_new_tokens": n_new, "do_sample": False, "num_beams": 1}

    bare = _base(setting)
    lora = LoraModel(_base(setting), LORA, adapter_name="a")
    lora.add_adapter("b", LORA)
    for i, name in enumerate(("a", "b")):
        lora.set_adapter(name)
        _randomize_b(lora, seed=10 + i)
    lora.set_adapter("a")
    merged = LoraModel(_base(setting), LORA)
    _randomize_b(merged, seed=10)
    merged.merge_adapter()
    unloaded = LoraModel(_base(setting), LORA)
    _randomize_b(unloaded, seed=10)
    unloaded = unloaded.merge_and_unload()  # what evaluation and serving run: a plain transformers model

    def generate(model: torch.nn.Module) -> None:
        with torch.inference_mode():
            model.generate(input_ids=inputs, **gen_kwargs)

    seconds = time_interleaved(
        {"base": lambda: generate(bare), "base_again": lambda: generate(bare),
         "merged_unloaded": lambda: generate(unloaded),
         "merged": lambda: generate(merged), "unmerged": lambda: generate(lora)},
        repeats=setting["repeats"],
    )
    tokens = setting["batch"] * n_new
    per_token = {k: v / tokens for k, v in seconds.items()}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lora.save_pretrained(tmp / "adapter", adapter_name="a")
        bare.save_pretrained(tmp / "full")
        adapter_bytes, full_bytes = _dir_bytes(tmp / "adapter"), _dir_bytes(tmp / "full")

        def load_adapter() -> None:
            lora.load_adapter(tmp / "adapter", adapter_name="loaded", force=True)
            lora.delete_adapter("loaded")

        def switch() -> None:
            lora.set_adapter("b")
            lora.set_adapter("a")

        load_s = time_interleaved(
            {"adapter_load": load_adapter,
             "base_load": lambda: T5ForConditionalGeneration.from_pretrained(tmp / "full"),
             "switch_two": switch},
            repeats=setting["repeats"],
        )
    switch_s = load_s["switch_two"] / 2
    raw = {
        "setting": setting, "quick": quick, "generate_seconds": seconds, "per_token_seconds": per_token,
        "load_seconds": load_s, "switch_seconds": switch_s,
        "bytes": {"adapter": adapter_bytes, "full_model": full_bytes},
    }
    figures = [
        Figure("merged adapter / bare base per-token latency",
               per_token["merged_unloaded"] / per_token["base"], goal=1.02),
        Figure("merged in place (LoRA layers kept) / bare base per-token latency",
               per_token["merged"] / per_token["base"]),
        Figure("bare base / bare base, A/A control: the noise floor of these latency ratios",
               per_token["base_again"] / per_token["base"]),
        Figure("unmerged adapter / bare base per-token latency", per_token["unmerged"] / per_token["base"]),
        Figure("switch adapter on one base / load a second base", switch_s / load_s["base_load"]),
        Figure("adapter load / full model load time", load_s["adapter_load"] / load_s["base_load"]),
        Figure("adapter bytes / full model save bytes", adapter_bytes / full_bytes),
    ]
    return write_results("bench_inference", figures, raw, out_dir)


if __name__ == "__main__":
    main(run, __doc__, "tiny setting (seconds)")
