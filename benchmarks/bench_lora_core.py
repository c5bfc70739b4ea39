"""LoRA core benchmark: our LoRA train step vs PEFT's, and LoRA vs full fine-tuning, on the CPU.

    python -m lora_pipeline.benchmarks.bench_lora_core [--threads 1]   # full size (minutes on 2 cores)

Full size: a T5 of ~35M parameters built from a config (d_model 512, 6+6 layers, 8 heads,
d_ff 1024, vocab 8000), batch 8 x 256 source -> 64 target tokens, LoRA r=8 on q and v.
A train step is forward + backward + AdamW step + zero_grad. Step times are medians of
interleaved runs in one process (common.time_interleaved); the process CPU time of the same calls
is reported too, since on a shared machine wall time mostly measures the neighbours (pass
--threads 1 there: idle OpenMP threads spin and inflate both). PEFT's step is timed twice per
round, an A/A control: its distance from 1 says how far apart two identical contenders land.
Memory is reported two ways:
- `train_state_bytes`: exact bytes of what training adds to the weights: gradients, AdamW state
  and the activations autograd saves for backward (counted once per storage, parameters excluded);
- `rss_delta_bytes` (full size only): peak resident set during two train steps minus the resident
  set just before them (Linux VmHWM, reset through /proc/self/clear_refs), each contender in a
  fresh subprocess; it includes allocator overhead and the weights' copies, so it is noisier.
DoRA (`use_dora`, same r and targets): ours and PEFT's DoRA steps are timed interleaved with our
LoRA step, after the main rounds: ours / PEFT (goal <= 1, as LoRA's), DoRA / LoRA step time and
training memory; raw figures under `dora` in the JSON.
Profile: one more train step of full, PEFT and ours under torch.profiler; the Markdown lists the
operators with the most self CPU time per step. PEFT's column is also what our LoraLinear computed
before it scaled the r-wide hidden instead of the output and added in place (it copied PEFT's steps).
Writes benchmarks/out/bench_lora_core.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import T5Config, T5ForConditionalGeneration

from lora_pipeline.benchmarks.common import Figure, time_interleaved, write_results

CONTENDERS = ("ours", "peft", "full")
SETTINGS = {
    "full": {"model": {"d_model": 512, "d_kv": 64, "num_heads": 8, "d_ff": 1024, "num_layers": 6,
                       "num_decoder_layers": 6, "vocab_size": 8000},
             "batch": 8, "source_len": 256, "target_len": 64, "repeats": 7, "warmup": 1},
    "quick": {"model": {"d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 64, "num_layers": 2,
                        "num_decoder_layers": 2, "vocab_size": 512},
              "batch": 2, "source_len": 16, "target_len": 8, "repeats": 1, "warmup": 0},
}
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q", "v"]}


def build(contender: str, setting: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model for one contender (same base weights for all) and its AdamW over trainable params;
    `ours_dora` / `peft_dora` are ours and PEFT's with `use_dora`."""
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(**setting["model"], decoder_start_token_id=0))
    lora = {**LORA, "use_dora": True} if contender.endswith("_dora") else LORA
    if contender.startswith("ours"):
        from lora_module import LoraConfig, LoraModel

        model = LoraModel(model, LoraConfig(**lora))
    elif contender.startswith("peft"):
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_2_SEQ_LM", **lora))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def make_batch(setting: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    vocab = setting["model"]["vocab_size"]
    return {
        "input_ids": torch.randint(2, vocab, (setting["batch"], setting["source_len"]), generator=g),
        "attention_mask": torch.ones(setting["batch"], setting["source_len"], dtype=torch.long),
        "labels": torch.randint(2, vocab, (setting["batch"], setting["target_len"]), generator=g),
    }


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def train_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      batch: dict) -> dict[str, int]:
    """Bytes of gradients, optimizer state and saved activations at the peak of one train step."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    optimizer.step()  # creates the AdamW state on the first step
    states = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                 if torch.is_tensor(v))
    optimizer.zero_grad(set_to_none=True)
    activations = sum(saved.values())
    return {"activations": activations, "gradients": grads, "optimizer_state": states,
            "total": activations + grads + states}


PROFILED = ("full", "peft", "ours")


def profile_ops(built: dict, batch: dict) -> dict[str, dict[str, dict[str, float]]]:
    """Self CPU milliseconds and calls per operator over one train step of each profiled contender."""
    from torch.profiler import ProfilerActivity, profile

    ops = {}
    for name in PROFILED:
        model, optimizer = built[name]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(model, optimizer, batch)
        ops[name] = {e.key: {"self_cpu_ms": e.self_cpu_time_total / 1000, "calls": e.count}
                     for e in prof.key_averages()}
    return ops


def profile_markdown(ops: dict[str, dict[str, dict[str, float]]], top: int = 12) -> str:
    """The operators in any contender's top `top` by self CPU time, one column pair per contender."""
    names = set()
    for per_op in ops.values():
        names |= set(sorted(per_op, key=lambda k: -per_op[k]["self_cpu_ms"])[:top])
    rows = sorted(names, key=lambda k: -max(o.get(k, {}).get("self_cpu_ms", 0) for o in ops.values()))
    head = " | ".join(f"{c} ms | {c} calls" for c in ops)
    lines = ["### Profile: operators by self CPU time, one train step", "",
             f"| operator | {head} |", "| --- |" + " --- | --- |" * len(ops)]
    for op in [*rows, "total"]:
        cells = []
        for per_op in ops.values():
            if op == "total":
                cells += [f"{sum(v['self_cpu_ms'] for v in per_op.values()):.0f}", "-"]
            else:
                entry = per_op.get(op, {"self_cpu_ms": 0.0, "calls": 0})
                cells += [f"{entry['self_cpu_ms']:.0f}", str(entry["calls"])]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rss_in_subprocess(contender: str) -> dict[str, int | None]:
    """Peak-RSS growth over two train steps of one contender, in a fresh interpreter."""
    cmd = [sys.executable, "-m", "lora_pipeline.benchmarks.bench_lora_core", "--rss", contender,
           "--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _proc_status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _rss_child(contender: str) -> None:
    setting = SETTINGS["full"]
    model, optimizer = build(contender, setting)
    batch = make_batch(setting)
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    except OSError:
        print(json.dumps({"rss_before_bytes": None, "rss_peak_bytes": None, "rss_delta_bytes": None}))
        return
    before = _proc_status_kib("VmRSS") * 1024
    for _ in range(2):  # the first step allocates gradients and AdamW state, the second is steady
        train_step(model, optimizer, batch)
    peak = _proc_status_kib("VmHWM") * 1024
    print(json.dumps({"rss_before_bytes": before, "rss_peak_bytes": peak, "rss_delta_bytes": peak - before}))


DORA_CONTENDERS = ("ours_dora", "peft_dora")


def measure_dora(lora: tuple[torch.nn.Module, torch.optim.Optimizer], setting: dict, batch: dict
                 ) -> tuple[list[Figure], dict]:
    """DoRA's figures: ours and PEFT's DoRA steps timed interleaved with our (warm) LoRA step `lora`."""
    built = {"ours": lora, **{c: build(c, setting) for c in DORA_CONTENDERS}}
    first_loss = {}
    for name in DORA_CONTENDERS:
        torch.manual_seed(2)  # the dropout masks of the main rounds' first step: the same start for both
        first_loss[name] = train_step(*built[name], batch)
    seconds = time_interleaved({name: (lambda m=m: train_step(*m, batch)) for name, m in built.items()},
                               repeats=setting["repeats"], warmup=setting["warmup"])
    memory = {name: train_state_bytes(*m, batch) for name, m in built.items()}
    params = {name: sum(p.numel() for p in m[0].parameters() if p.requires_grad) for name, m in built.items()}
    total = {name: m["total"] for name, m in memory.items()}
    figures = [
        Figure("ours / PEFT train step time, DoRA", seconds["ours_dora"] / seconds["peft_dora"], goal=1.00,
               detail={"ours_s": seconds["ours_dora"], "peft_s": seconds["peft_dora"]}),
        Figure("DoRA / LoRA step time (ours)", seconds["ours_dora"] / seconds["ours"],
               detail={"dora_s": seconds["ours_dora"], "lora_s": seconds["ours"]}),
        Figure("ours / PEFT training memory, DoRA", total["ours_dora"] / total["peft_dora"]),
        Figure("DoRA / LoRA training memory (ours)", total["ours_dora"] / total["ours"]),
    ]
    return figures, {"step_seconds": seconds, "memory_bytes": memory, "trainable": params,
                     "first_step_loss": first_loss}


def run(quick: bool = False, out_dir: Path | None = None, threads: int | None = None) -> Path:
    """Measure and write JSON + Markdown; returns the JSON path. `threads` fixes torch's thread count."""
    if threads:
        torch.set_num_threads(threads)
    setting = SETTINGS["quick" if quick else "full"]
    batch = make_batch(setting)
    built = {c: build(c, setting) for c in CONTENDERS}
    counts = {}
    for name, (model, _) in built.items():
        params = list(model.parameters())
        counts[name] = {"trainable": sum(p.numel() for p in params if p.requires_grad),
                        "total": sum(p.numel() for p in params)}
    first_loss = {}
    for name, (model, optimizer) in built.items():
        torch.manual_seed(2)  # same dropout masks: ours and PEFT must start from the same loss
        first_loss[name] = train_step(model, optimizer, batch)
    # PEFT is timed twice per round: an A/A control whose distance from 1 is the noise floor.
    timed = {**{name: name for name in built}, "peft_again": "peft"}
    cpu_samples: dict[str, list[float]] = {key: [] for key in timed}

    def timed_step(key: str) -> None:
        model, optimizer = built[timed[key]]
        start = time.process_time()
        train_step(model, optimizer, batch)
        cpu_samples[key].append(time.process_time() - start)

    steps = {key: (lambda key=key: timed_step(key)) for key in timed}
    seconds = time_interleaved(steps, repeats=setting["repeats"], warmup=setting["warmup"])
    cpu_seconds = {name: statistics.median(v[setting["warmup"]:]) for name, v in cpu_samples.items()}
    memory = {name: train_state_bytes(model, optimizer, batch) for name, (model, optimizer) in built.items()}
    ops = profile_ops(built, batch)
    dora_figures, dora_raw = measure_dora(built["ours"], setting, batch)
    built.clear()  # free the models before the memory subprocesses
    gc.collect()
    if not quick:
        for name in CONTENDERS:
            memory[name] |= rss_in_subprocess(name)

    figures = [
        Figure("ours / PEFT train step time", seconds["ours"] / seconds["peft"], goal=1.00,
               detail={"ours_s": seconds["ours"], "peft_s": seconds["peft"]}),
        Figure("PEFT / PEFT train step time, A/A control: the noise floor of these step ratios",
               seconds["peft_again"] / seconds["peft"]),
        Figure("LoRA (ours) / full fine-tuning step time", seconds["ours"] / seconds["full"], goal=0.75,
               detail={"ours_s": seconds["ours"], "full_s": seconds["full"]}),
        Figure("ours / PEFT train step CPU time", cpu_seconds["ours"] / cpu_seconds["peft"], goal=1.00),
        Figure("LoRA (ours) / full fine-tuning step CPU time", cpu_seconds["ours"] / cpu_seconds["full"],
               goal=0.75),
        Figure("ours / PEFT training memory (grads + AdamW + saved activations)",
               memory["ours"]["total"] / memory["peft"]["total"]),
        Figure("LoRA (ours) / full fine-tuning training memory",
               memory["ours"]["total"] / memory["full"]["total"]),
    ]
    rss = {name: memory[name].get("rss_delta_bytes") for name in CONTENDERS}
    if rss["ours"] and rss["peft"] and rss["full"]:
        figures.append(Figure("ours / PEFT peak-RSS growth", rss["ours"] / rss["peft"]))
        figures.append(Figure("LoRA (ours) / full fine-tuning peak-RSS growth", rss["ours"] / rss["full"]))
    figures += dora_figures
    raw = {"setting": setting, "lora": LORA, "quick": quick, "torch_threads": torch.get_num_threads(),
           "step_seconds": seconds, "step_cpu_seconds": cpu_seconds,
           "memory_bytes": memory, "parameters": counts, "first_step_loss": first_loss, "profile_ops": ops,
           "dora": dora_raw,
           "memory_note": "total = gradients + AdamW state + activations saved for backward "
                          "(weights excluded); rss_delta = ru_maxrss growth over 3 steps in a new process"}
    path = write_results("bench_lora_core", figures, raw, out_dir)
    markdown = path.with_suffix(".md")
    markdown.write_text(markdown.read_text() + "\n" + profile_markdown(ops))
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny setting (seconds)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--rss", choices=CONTENDERS, help=argparse.SUPPRESS)  # internal: one RSS measurement
    args = parser.parse_args()
    if args.rss:
        if args.threads:
            torch.set_num_threads(args.threads)
        _rss_child(args.rss)
    else:
        path = run(quick=args.quick, threads=args.threads)
        print(path.with_suffix(".md").read_text())
