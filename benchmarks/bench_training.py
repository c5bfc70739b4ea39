"""Training benchmark: full vs LoRA vs QLoRA through Lightning, and Lightning's cost over a bare loop.

    lora-pipeline bench --only training                      # full size (~10 minutes on 2 idle cores)
    lora-pipeline bench --only training --quick              # tiny setting (seconds)

Full size: the ~35M-parameter T5 of the LoRA-core benchmark (d_model 512, 6+6 layers, 8 heads,
d_ff 1024, vocab 8000), batch 8 x 256 source -> 64 target tokens, LoRA r=8 on q and v; QLoRA is
the same adapter over an NF4 base (bitsandbytes' CPU kernels here). The model is saved once with
`save_pretrained` and loaded by `FineTuneModule` exactly as a real run loads it.

- Step time: median wall time between consecutive training-batch starts (data + forward + backward
  + AdamW + schedule + our hooks), warm-up steps dropped. Lightning runs with logger and progress
  bar off; our own per-step logging, the non-finite check and tokens/s accounting stay on.
- Lightning overhead (LoRA): the same module's model trained by a plain PyTorch loop doing the same
  work (forward, backward, AdamW, LambdaLR, zero_grad), rounds alternated with Lightning rounds so
  machine drift hits both. Reported per step (goal <= 5%) and per whole run including Trainer setup
  and the end-of-fit export, via `common.time_interleaved`. Because a 35M step takes seconds and a
  busy machine makes few samples noisy, the absolute per-step overhead is also measured on a tiny
  model over many steps and expressed relative to the 35M bare step (second figure).
- Bytes: AdamW state after the fit, the Lightning checkpoint (`last.ckpt`: adapter-only for LoRA and
  QLoRA, with its optimizer state) and the exported weights (`adapter/` vs `model/`).
- Peak memory: each contender in a fresh subprocess. On the CPU the footprint is the exact bytes of
  the weights (4-bit packed for QLoRA) plus the peak growth of the resident set during a 3-step fit
  (sampled from /proc every 5 ms: gradients, AdamW state, activations, allocator slack); on a GPU,
  `torch.cuda.max_memory_allocated` over the fit.
Writes benchmarks/out/bench_training.{json,md}.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader
from transformers import T5Config, T5ForConditionalGeneration

from lora_pipeline.benchmarks.common import Figure, time_interleaved, write_results

CONTENDERS = ("full", "lora", "qlora")
SETTINGS = {
    "full": {
        "model": {
            "d_model": 512,
            "d_kv": 64,
            "num_heads": 8,
            "d_ff": 1024,
            "num_layers": 6,
            "num_decoder_layers": 6,
            "vocab_size": 8000,
        },
        "batch": 8,
        "source_len": 256,
        "target_len": 64,
        "steps": 4,
        "warmup": 1,
        "rounds": 2,
    },
    "quick": {
        # Widths are multiples of 64, the NF4 block size: narrower layers stay unquantized (see qlora).
        "model": {
            "d_model": 64,
            "d_kv": 16,
            "num_heads": 4,
            "d_ff": 128,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "vocab_size": 512,
        },
        "batch": 2,
        "source_len": 16,
        "target_len": 8,
        "steps": 3,
        "warmup": 1,
        "rounds": 1,
    },
}
# Lightning's per-step overhead, measured where it is not drowned by compute: tiny model, many steps.
SETTINGS["probe"] = {**SETTINGS["quick"], "steps": 40, "rounds": 3}
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q", "v"]}
LR = 1e-4


def save_base(setting: dict, path: Path) -> Path:
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(**setting["model"], decoder_start_token_id=0)).save_pretrained(path)
    return path


def make_loader(setting: dict, steps: int) -> DataLoader:
    """`steps` batches of fixed-length random rows, collated like the real data module."""
    from lora_module.training.datamodule import PaddingCollator

    g = torch.Generator().manual_seed(1)
    vocab = setting["model"]["vocab_size"]
    rows = [
        {
            "input_ids": torch.randint(2, vocab, (setting["source_len"],), generator=g).tolist(),
            "attention_mask": [1] * setting["source_len"],
            "labels": torch.randint(2, vocab, (setting["target_len"],), generator=g).tolist(),
        }
        for _ in range(steps * setting["batch"])
    ]
    return DataLoader(rows, batch_size=setting["batch"], shuffle=False, collate_fn=PaddingCollator(0))


def build_module(finetune: str, base: Path, out: Path):
    from lora_module import LoraConfig
    from lora_module.training.module import FineTuneModule

    torch.manual_seed(0)
    return FineTuneModule(
        str(base), finetune=finetune, lora=LoraConfig(**LORA), learning_rate=LR, output_dir=str(out)
    )


class StepTimer(Callback):
    """Wall time between consecutive training-batch starts; the last step ends at its batch end.

    (So the epoch-end checkpoint and the final export are not counted as step time.)
    """

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.last_end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.last_end = time.perf_counter()

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, [*self.starts[1:], self.last_end], strict=True)]


def lightning_fit(module, loader: DataLoader, steps: int) -> list[float]:
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    return timer.steps()


def bare_loop(model: torch.nn.Module, loader: DataLoader, steps: int) -> list[float]:
    """The same training work without Lightning: forward, backward, AdamW, LambdaLR, zero_grad."""
    from lora_module.training.hparams import WarmupDecay

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(0, steps))
    starts = []
    for batch in loader:
        starts.append(time.perf_counter())
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    starts.append(time.perf_counter())
    return [b - a for a, b in zip(starts, starts[1:], strict=False)]


def lightning_vs_bare(setting: dict, base: Path, tmp: Path, steps: int, warmup: int, rounds: int) -> tuple:
    """Per-step medians (Lightning, bare) of LoRA training, and whole-run medians via time_interleaved."""
    loader = make_loader(setting, steps)
    lit, bare = build_module("lora", base, tmp / "lit"), build_module("lora", base, tmp / "bare")
    per_step: dict[str, list[float]] = {"lightning": [], "bare": []}

    def lit_run() -> None:
        per_step["lightning"].extend(lightning_fit(lit, loader, steps)[warmup:])

    def bare_run() -> None:
        per_step["bare"].extend(bare_loop(bare.model, loader, steps)[warmup:])

    whole = time_interleaved({"lightning": lit_run, "bare": bare_run}, repeats=rounds, warmup=0)
    return {k: statistics.median(v) for k, v in per_step.items()}, whole


def memory_in_subprocess(finetune: str, quick: bool) -> dict:
    cmd = [sys.executable, "-m", "lora_pipeline.benchmarks.bench_training", "--memory", finetune] + (
        ["--quick"] if quick else []
    )
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rss() -> int:
    """Current resident set size in bytes (not the peak: /proc/self/statm)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def measure_memory(finetune: str, setting: dict) -> dict:
    """Weight, optimizer-state, checkpoint and export bytes, and RSS growth during a 3-step fit.

    The RSS figures are meaningful in a fresh process only.
    """
    with tempfile.TemporaryDirectory() as tmp:
        base = save_base(setting, Path(tmp) / "base")
        module = build_module(finetune, base, Path(tmp) / "out")
        weights = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
        loader = make_loader(setting, 3)
        # Hand memory freed while loading (QLoRA drops its fp32 weights) back to the OS, so the
        # growth below counts what training itself allocates.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        # The peak starts at the start: on a busy machine the sampler may not run before a short fit ends,
        # and a peak of 0 made the growth, and the footprint, negative.
        start = _rss()
        peak, done = [start], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        lightning_fit(module, loader, 3)
        done.set()
        sampler.join()
        optimizer = module.trainer.optimizers[0]
        out = Path(tmp) / "out"
        result = {
            "optimizer_state_bytes": sum(t.numel() * t.element_size() for state in optimizer.state.values()
                                         for t in state.values() if torch.is_tensor(t)),
            "checkpoint_bytes": (out / "checkpoints" / "last.ckpt").stat().st_size,
            "export_bytes": _folder_bytes(out / ("model" if finetune == "full" else "adapter")),
            "weight_bytes": weights,
            "rss_fit_start_bytes": start,
            "rss_fit_peak_bytes": peak[0],
            "rss_fit_growth_bytes": peak[0] - start,
            "footprint_bytes": weights + peak[0] - start,
        }
        if torch.cuda.is_available():
            result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
        return result


def run(quick: bool = False, out_dir: Path | None = None) -> Path:
    """Measure and write JSON + Markdown; returns the JSON path."""
    setting = SETTINGS["quick" if quick else "full"]
    steps, warmup = setting["steps"], setting["warmup"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = save_base(setting, tmp / "base")
        loader = make_loader(setting, steps)

        # Step time of each contender through Lightning (one module each, rounds alternated).
        modules = {f: build_module(f, base, tmp / f) for f in CONTENDERS}
        counts = {
            f: dict(zip(("trainable", "total"), m.parameter_counts(), strict=True))
            for f, m in modules.items()
        }
        step_times: dict[str, list[float]] = {f: [] for f in CONTENDERS}
        for _ in range(setting["rounds"]):
            for f, m in modules.items():
                step_times[f] += lightning_fit(m, loader, steps)[warmup:]
        seconds = {f: statistics.median(v) for f, v in step_times.items()}
        del modules

        # Lightning vs bare loop on LoRA: per step, and per whole run (setup and export included).
        step_med, whole = lightning_vs_bare(setting, base, tmp, steps, warmup, setting["rounds"])
        # Lightning's cost per step does not grow with the model: measured on a tiny model with
        # many steps it is precise, and relative to the big model's step it is the overhead that
        # a long run pays (the direct comparison above has few samples on a shared machine).
        probe = {**SETTINGS["quick"], "steps": 6, "rounds": 1} if quick else SETTINGS["probe"]
        tiny_base = save_base(probe, tmp / "tiny_base")
        tiny_med, _ = lightning_vs_bare(probe, tiny_base, tmp / "tiny", probe["steps"], 2, probe["rounds"])
        overhead_s = tiny_med["lightning"] - tiny_med["bare"]

    # Quick mode stays in-process (a smoke test of the code path, numbers not meaningful).
    memory = {f: measure_memory(f, setting) if quick else memory_in_subprocess(f, quick) for f in CONTENDERS}
    mem_key = "cuda_peak_bytes" if torch.cuda.is_available() else "footprint_bytes"
    figures = [
        Figure(
            "Lightning / bare loop step time (LoRA)",
            step_med["lightning"] / step_med["bare"],
            goal=1.05,
            detail={"lightning_s": step_med["lightning"], "bare_s": step_med["bare"]},
        ),
        Figure(
            "Lightning / bare loop step time (LoRA), from the per-step overhead on a tiny model",
            (step_med["bare"] + overhead_s) / step_med["bare"],
            goal=1.05,
            detail={"overhead_s_per_step": overhead_s, "tiny_step_s": tiny_med, "bare_s": step_med["bare"]},
        ),
        Figure(
            f"Lightning / bare loop whole run of {steps} steps (LoRA, incl. setup + export)",
            whole["lightning"] / whole["bare"],
            detail=whole,
        ),
        Figure("LoRA / full step time", seconds["lora"] / seconds["full"], goal=0.75, detail=seconds),
        Figure("QLoRA / full step time", seconds["qlora"] / seconds["full"], detail=seconds),
        Figure(f"LoRA / full peak memory ({mem_key})", memory["lora"][mem_key] / memory["full"][mem_key]),
        Figure(f"QLoRA / full peak memory ({mem_key})", memory["qlora"][mem_key] / memory["full"][mem_key]),
    ]
    byte_figures = {
        "optimizer_state_bytes": "AdamW state bytes",
        "checkpoint_bytes": "checkpoint bytes",
        "export_bytes": "exported weights bytes (adapter/ vs model/)",
    }
    for key, label in byte_figures.items():
        detail = {c: memory[c][key] for c in CONTENDERS}
        for f, name in (("lora", "LoRA"), ("qlora", "QLoRA")):
            figures.append(Figure(f"{name} / full {label}", detail[f] / detail["full"], detail=detail))
    trainable = {f: c["trainable"] for f, c in counts.items()}
    ratio = trainable["lora"] / trainable["full"]
    figures.append(Figure("LoRA / full trainable parameters", ratio, detail=counts))
    raw = {
        "setting": setting,
        "lora": LORA,
        "quick": quick,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "step_seconds": seconds,
        "step_seconds_all": step_times,
        "lightning_vs_bare_step_seconds": step_med,
        "lightning_vs_bare_run_seconds": whole,
        "lightning_overhead_probe": {"setting": probe, "step_seconds": tiny_med},
        "memory_bytes": memory,
        "parameters": counts,
        "tokens_per_step": setting["batch"] * (setting["source_len"] + setting["target_len"]),
    }
    return write_results("bench_training", figures, raw, out_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny setting (seconds)")
    parser.add_argument(
        "--memory", choices=CONTENDERS, help=argparse.SUPPRESS
    )  # internal: one memory measurement
    args = parser.parse_args()
    if args.memory:
        print(json.dumps(measure_memory(args.memory, SETTINGS["quick" if args.quick else "full"])))
    else:
        path = run(quick=args.quick)
        print(path.with_suffix(".md").read_text())
