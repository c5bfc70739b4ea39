"""GPU benchmark: LoRA training through the real Lightning path (ours vs PEFT), generation, 7B-shaped QLoRA.

    bash benchmarks/gpu_check.sh                          # the prepared check: gpu tests + this, <= 8 min
    python -m lora_pipeline.benchmarks.bench_gpu --out-dir DIR [--dry-run]
    lora-pipeline bench --only gpu                        # this alone ("not measured" on a CPU)

Every model is built from a config with random weights (no download), in bf16 on the GPU:
- training: FineTuneModule + Trainer(accelerator="gpu") on a FLAN-T5-base-shaped model (batch 8 x 512 -> 128,
  LoRA r=32 on q,v: the reference experiment) and a Llama-shaped one (TinyLlama-1.1B shape, batch 4 x 512,
  r=16 on q,k,v,o). Contenders: ours, PEFT (the same module with PEFT's model swapped in) and ours again (an
  independently built copy: the A/A control that says how much of a ratio is noise). Peak memory is each
  contender's own (weights + training state) over one fit; step times: interleaved fits, first step dropped.
- generation (Llama shape, batch 8, 64 prompt + 64 new tokens, greedy): merged vs unmerged adapter vs a
  mixed-adapter batch (two adapters, rows alternating), plus unmerged measured twice (A/A).
- QLoRA (NF4, double quant, bf16 compute) vs bf16 LoRA vs full fine-tuning on a Llama-2-7B-shaped model (batch
  1 x 512, LoRA r=16 on every linear layer, gradient checkpointing for all three): peak memory of one step and
  step time. Built in bf16 directly on the GPU and quantized there in place; one contender at a time (the full
  one needs ~60 GB), so these step times are not interleaved.
`--dry-run`: the same code on tiny shapes on the CPU (fp32, 1 repeat, seconds), memory as parameter +
gradient bytes; figures are marked as a dry run and mean nothing. Without CUDA or --dry-run: not measured.
Writes DIR/bench_gpu.{json,md} (default benchmarks/out/).
"""

from __future__ import annotations

import copy
import gc
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from lora_module import LoraConfig, LoraModel, quantize_nf4
from lora_module.adapter_io import FINGERPRINT_ATTR
from lora_module.device import default_dtype, enable_cuda_fast_paths
from lora_module.errors import ArgumentParser, run_cli
from lora_module.training.datamodule import PaddingCollator
from lora_module.training.module import FineTuneModule
from lora_pipeline.benchmarks.bench_training import StepTimer
from lora_pipeline.benchmarks.common import OUT_DIR, Figure, time_interleaved, write_results

GiB = 1024**3
LLAMA_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
LLAMA_ALL = [*LLAMA_ATTENTION, "gate_proj", "up_proj", "down_proj"]
FULL = {
    "t5": {"model": {"d_model": 768, "d_kv": 64, "num_heads": 12, "d_ff": 2048, "num_layers": 12,
                     "num_decoder_layers": 12, "vocab_size": 32128, "feed_forward_proj": "gated-gelu"},
           "batch": 8, "source_len": 512, "target_len": 128, "lora": {"r": 32, "lora_alpha": 32,
                                                                      "target_modules": ["q", "v"]}},
    "llama": {"model": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                        "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000},
              "batch": 4, "seq_len": 512,
              "lora": {"r": 16, "lora_alpha": 32, "target_modules": LLAMA_ATTENTION}},
    "llama7b": {"model": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                          "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
                "batch": 1, "seq_len": 512, "lora": {"r": 16, "lora_alpha": 32, "target_modules": LLAMA_ALL}},
    "generation": {"batch": 8, "prompt_len": 64, "new_tokens": 64},
    "steps": 6, "repeats": 3,
}
DRY = {
    "t5": {**FULL["t5"], "model": {"d_model": 64, "d_kv": 16, "num_heads": 4, "d_ff": 128, "num_layers": 2,
                                   "num_decoder_layers": 2, "vocab_size": 512,
                                   "feed_forward_proj": "gated-gelu"},
           "batch": 2, "source_len": 16, "target_len": 8},
    "llama": {**FULL["llama"], "model": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                         "num_attention_heads": 4, "num_key_value_heads": 2,
                                         "vocab_size": 512},
              "batch": 2, "seq_len": 16},
    "llama7b": {**FULL["llama7b"], "model": {"hidden_size": 128, "intermediate_size": 256,
                                             "num_hidden_layers": 2, "num_attention_heads": 4,
                                             "num_key_value_heads": 4, "vocab_size": 512},
                "seq_len": 16},
    "generation": {"batch": 2, "prompt_len": 8, "new_tokens": 4},
    "steps": 2, "repeats": 1,
}
GOALS = {"tokens": 1.0, "qlora_memory": 0.35, "qlora_gb": 10.0}


class Bench:
    """Where and how this run measures: the device, the weights' dtype and the memory probe."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = default_dtype(self.device)  # bf16 on a GPU that has it, fp32 on the CPU
        self.setting = DRY if dry_run else FULL

    def start(self) -> int:
        """Begin a memory measurement; returns the bytes already allocated (others' weights)."""
        if not self.cuda:
            return 0
        gc.collect()  # a finished fit's module and trainer refer to each other: free them now
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak(self, since: int, model: torch.nn.Module) -> int:
        """Peak bytes since `start` on CUDA; on the CPU (dry run) the model's parameter + gradient bytes."""
        if self.cuda:
            return torch.cuda.max_memory_allocated() - since
        params = list(model.parameters())
        return sum(p.numel() * p.element_size() * (2 if p.grad is not None else 1) for p in params)


def _llama_config(model: dict) -> LlamaConfig:
    return LlamaConfig(**model, pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")


def save_base(bench: Bench, kind: str, shape: dict, path: Path) -> Path:
    """A random-weight base folder for FineTuneModule to load (it loads from a path, as in the pipeline)."""
    if kind == "t5":
        config = T5Config(**shape["model"], decoder_start_token_id=0)
        model = _build(bench, T5ForConditionalGeneration, config)
    else:
        model = _build(bench, LlamaForCausalLM, _llama_config(shape["model"]))
    model.save_pretrained(path)
    return path


def loader(kind: str, shape: dict, steps: int) -> DataLoader:
    """`steps` batches of fixed-length random rows, collated like the real data module."""
    g = torch.Generator().manual_seed(1)
    vocab = shape["model"]["vocab_size"]
    src, tgt = (shape["source_len"], shape["target_len"]) if kind == "t5" else (shape["seq_len"],) * 2
    rows = []
    for _ in range(steps * shape["batch"]):
        ids = torch.randint(3, vocab, (src,), generator=g).tolist()
        labels = torch.randint(3, vocab, (tgt,), generator=g).tolist() if kind == "t5" else ids
        rows.append({"input_ids": ids, "attention_mask": [1] * src, "labels": labels})
    return DataLoader(rows, batch_size=shape["batch"], collate_fn=PaddingCollator(0))


def tokens_per_step(kind: str, shape: dict) -> int:
    return shape["batch"] * (shape["source_len"] + shape["target_len"] if kind == "t5" else shape["seq_len"])


class PeftFineTune(FineTuneModule):
    """FineTuneModule with PEFT's LoRA model in place of ours: the same steps, optimizer and schedule.

    It skips the checkpoint callbacks and the final export (both write our adapter format); the step
    times exclude them for ours as well.
    """

    def _build_model(self) -> torch.nn.Module:
        import peft

        ours = super()._build_model()
        base = ours.model if isinstance(ours, LoraModel) else ours
        for layer_path, layer in list(ours.lora_layers()):
            parent, _, name = layer_path.rpartition(".")
            setattr(base.get_submodule(parent), name, layer.base_layer)
        task = "SEQ_2_SEQ_LM" if base.config.is_encoder_decoder else "CAUSAL_LM"
        lora = self.lora_config
        config = peft.LoraConfig(task_type=task, r=lora.r, lora_alpha=lora.lora_alpha,
                                 lora_dropout=lora.lora_dropout, target_modules=list(lora.target_modules))
        return peft.get_peft_model(base, config).train()

    def parameter_counts(self) -> tuple[int, int]:
        return self.model.get_nb_trainable_parameters()

    def configure_callbacks(self) -> list:
        return []

    def on_train_end(self) -> None:
        """No export (see the class docstring)."""


def _fit(bench: Bench, module: FineTuneModule, data: DataLoader, steps: int) -> list[float]:
    """One Trainer.fit of `steps` steps; the step times after the first."""
    timer = StepTimer()
    trainer = L.Trainer(accelerator="gpu" if bench.cuda else "cpu", devices=1, max_steps=steps, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, train_dataloaders=data)
    return timer.steps()[1:]


def _module(bench: Bench, contender: str, base: Path, lora: dict, out: Path) -> FineTuneModule:
    torch.manual_seed(0)
    cls = PeftFineTune if contender == "peft" else FineTuneModule
    dtype = str(bench.dtype).removeprefix("torch.")
    return cls(str(base), finetune="lora", lora=LoraConfig(**lora), learning_rate=1e-4, torch_dtype=dtype,
               output_dir=str(out / contender))


def training(bench: Bench, kind: str, tmp: Path) -> dict:
    """Ours vs PEFT vs ours again through FineTuneModule + Trainer: tokens/s and own peak memory."""
    shape, steps = bench.setting[kind], bench.setting["steps"]
    base = save_base(bench, kind, shape, tmp / f"{kind}_base")
    data = loader(kind, shape, steps)
    modules, peak, samples = {}, {}, {}
    for contender in ("ours", "peft", "ours_again"):
        since = bench.start()
        modules[contender] = _module(bench, contender, base, shape["lora"], tmp / kind)
        _fit(bench, modules[contender], data, steps)  # warm-up; its peak is this contender's memory
        peak[contender] = bench.peak(since, modules[contender])
        samples[contender] = []

    def fit_fn(name: str):
        return lambda: samples[name].extend(_fit(bench, modules[name], data, steps))

    fit_seconds = time_interleaved({n: fit_fn(n) for n in modules}, repeats=bench.setting["repeats"],
                                   warmup=0)
    step = {n: sorted(s)[len(s) // 2] for n, s in samples.items()}
    tokens = tokens_per_step(kind, shape)
    modules.clear()  # free this shape's models before the next section
    return {"tokens_per_second": {n: tokens / s for n, s in step.items()}, "step_seconds": step,
            "peak_bytes": peak, "fit_seconds": fit_seconds, "tokens_per_step": tokens}


def _build(bench: Bench, cls: type, config: Any) -> torch.nn.Module:
    """A random-weight model built in the run's dtype directly on its device (seconds even for 7B)."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(bench.dtype)
    try:
        with bench.device:
            return cls(config)
    finally:
        torch.set_default_dtype(default)


def _llama(bench: Bench, shape: dict) -> LlamaForCausalLM:
    return _build(bench, LlamaForCausalLM, _llama_config(shape["model"]))


def generation(bench: Bench) -> dict:
    """Greedy generation tokens/s: merged vs unmerged adapter vs a mixed batch of two adapters."""
    shape, gen = bench.setting["llama"], bench.setting["generation"]
    lora = LoraConfig(**shape["lora"])
    unmerged = LoraModel(_llama(bench, shape), lora).eval()
    unmerged.add_adapter("other", lora)
    merged = copy.deepcopy(unmerged)
    merged.merge_adapter()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, shape["model"]["vocab_size"], (gen["batch"], gen["prompt_len"]), generator=g)
    ids = ids.to(bench.device)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": gen["new_tokens"],
              "min_new_tokens": gen["new_tokens"], "do_sample": False, "pad_token_id": 0}
    names = [("default", "other")[i % 2] for i in range(gen["batch"])]

    def run(model: LoraModel, adapter_names: list[str] | None = None):
        def go() -> None:
            with torch.no_grad():
                model.generate(**kwargs, adapter_names=adapter_names)
        return go

    seconds = time_interleaved({"merged": run(merged), "unmerged": run(unmerged),
                                "mixed": run(unmerged, names), "unmerged_again": run(unmerged)},
                               repeats=bench.setting["repeats"], warmup=1)
    tokens = gen["batch"] * gen["new_tokens"]
    return {"tokens_per_second": {n: tokens / s for n, s in seconds.items()}, "seconds": seconds}


def _big_model(bench: Bench, contender: str, shape: dict) -> torch.nn.Module:
    """The 7B-shaped contender: NF4 base + LoRA (qlora), bf16 base + LoRA (lora), or all trainable (full)."""
    base = _llama(bench, shape)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    if contender == "full":
        return base.train()
    if contender == "qlora":
        setattr(base, FINGERPRINT_ATTR, "random weights (benchmark)")  # no point hashing 13 GB of noise
        base = quantize_nf4(base, compute_dtype=bench.dtype)
    for p in base.parameters():
        p.requires_grad_(False)
    return LoraModel(base, LoraConfig(**shape["lora"])).train()


def seven_b(bench: Bench) -> dict:
    """Peak memory and step time of one training step: QLoRA vs bf16 LoRA vs full, one model at a time."""
    shape = bench.setting["llama7b"]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, shape["model"]["vocab_size"], (shape["batch"], shape["seq_len"]), generator=g)
    batch = {"input_ids": ids.to(bench.device), "labels": ids.to(bench.device)}
    peak, seconds = {}, {}
    for contender in ("qlora", "lora", "full"):
        since = bench.start()  # whatever earlier sections left allocated is not this contender's
        model = _big_model(bench, contender, shape)
        # fused: no foreach temporaries (a 13 GB copy of a state for the full model), the same for all three
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=bench.cuda)

        def step(model=model, opt=opt) -> None:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        bench.start()  # the peak counts the resident weights, not the bf16 transient of quantizing
        try:
            seconds[contender] = time_interleaved({contender: step}, repeats=bench.setting["repeats"],
                                                  warmup=1)[contender]
            peak[contender] = bench.peak(since, model)
        except torch.OutOfMemoryError:  # full fine-tuning of 7B needs ~60 GB: recorded, not fatal
            seconds[contender] = peak[contender] = math.nan
        del model, opt, step
    return {"peak_bytes": peak, "step_seconds": seconds}


def figures(train: dict, gen: dict, big: dict) -> list[Figure]:
    """The ratios and their goals (README "Speed and memory"; issue 26)."""
    out = []
    for kind, label in (("t5", "FLAN-T5-base-shaped"), ("llama", "Llama-shaped")):
        tps, peak = train[kind]["tokens_per_second"], train[kind]["peak_bytes"]
        out += [Figure(f"{label}: ours / PEFT train tokens/s (Lightning)", tps["ours"] / tps["peft"],
                       goal=GOALS["tokens"], direction=">="),
                Figure(f"{label}: ours / ours again train tokens/s (A/A control)",
                       tps["ours"] / tps["ours_again"]),
                Figure(f"{label}: ours / PEFT peak memory", peak["ours"] / peak["peft"])]
    tps = gen["tokens_per_second"]
    out += [Figure("generation: merged / unmerged tokens/s", tps["merged"] / tps["unmerged"]),
            Figure("generation: mixed-adapter batch / unmerged tokens/s", tps["mixed"] / tps["unmerged"]),
            Figure("generation: unmerged / unmerged again tokens/s (A/A control)",
                   tps["unmerged"] / tps["unmerged_again"])]
    peak, seconds = big["peak_bytes"], big["step_seconds"]
    out += [Figure("7B-shaped: QLoRA / bf16 LoRA peak memory", peak["qlora"] / peak["lora"],
                   goal=GOALS["qlora_memory"]),
            Figure("7B-shaped: QLoRA step peak memory", peak["qlora"] / GiB, goal=GOALS["qlora_gb"],
                   unit="GiB"),
            Figure("7B-shaped: bf16 LoRA / full step time", seconds["lora"] / seconds["full"]),
            Figure("7B-shaped: QLoRA / bf16 LoRA step time", seconds["qlora"] / seconds["lora"])]
    return [f for f in out if math.isfinite(f.value)]


def run(quick: bool = False, out_dir: Path | None = None, dry_run: bool = False) -> Path:
    """Measure on CUDA (dry run: tiny shapes on whatever is here); returns the JSON path.

    `quick` (`lora-pipeline bench --quick`) takes the dry run's tiny shapes on a GPU; on the CPU only
    `dry_run` measures anything.
    """
    bench = Bench(dry_run or (quick and torch.cuda.is_available()))
    if not bench.cuda and not bench.dry_run:
        raw = {"measured": False, "reason": "no CUDA GPU on this machine: not measured"}
        return write_results("bench_gpu", [], raw, out_dir)
    enable_cuda_fast_paths(bench.device)  # as training and evaluation do on a GPU
    with tempfile.TemporaryDirectory() as tmp:
        train = {kind: training(bench, kind, Path(tmp)) for kind in ("t5", "llama")}
    gen = generation(bench)
    big = seven_b(bench)
    raw = {"measured": True, "dry_run": bench.dry_run, "device": str(bench.device), "dtype": str(bench.dtype),
           "setting": bench.setting, "training": train, "generation": gen, "llama7b": big}
    found = figures(train, gen, big)
    if bench.dry_run:
        for f in found:
            f.detail["dry_run"] = True
    path = write_results("bench_gpu", found, raw, out_dir)
    if bench.dry_run:
        md = path.with_suffix(".md")
        note = "DRY RUN: tiny shapes, 1 repeat, on " + str(bench.device) + ": these figures mean nothing.\n\n"
        md.write_text(note + md.read_text())
    return path


def main(argv: list[str] | None = None) -> None:
    """`python -m lora_pipeline.benchmarks.bench_gpu [--dry-run] [--out-dir DIR]`; prints the Markdown."""
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, 1 repeat, CPU allowed (seconds)")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help=f"where to write (default: {OUT_DIR})")
    args = parser.parse_args(argv)
    print(run(out_dir=args.out_dir, dry_run=args.dry_run).with_suffix(".md").read_text())


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
