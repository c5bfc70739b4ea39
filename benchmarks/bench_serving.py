"""Serving benchmark: many tasks on one base, mixed-task batches vs the alternatives.

    lora-pipeline bench --only serving         # full size (about 40 s on 2 idle cores)
    python -m lora_pipeline.benchmarks.bench_serving --quick

One T5 built from a config (full size: d_model 256, 4+4 layers, 9.4M parameters), LoRA r=8 on q and v
(the reference experiment's targets) with random non-zero weights per task; greedy decoding of a
fixed batch with a fixed number of new tokens (no early stop). For 2 and 8 tasks, rows assigned to
tasks round-robin, contenders measured side by side (interleaved) in one process:
- `mixed`: ours, one batch through one base with per-row adapters (`generate(adapter_names=...)`);
- `switching`: ours, one base, `set_adapter` per task and one batch per task's rows;
- `merged_per_task`: one merged model per task (what one served model per task costs), one batch per
  task's rows;
- `merged`: one merged model running the whole batch (a single task): the throughput reference;
- `peft_mixed`: PEFT's mixed-adapter batches (`adapter_names`) on the same weights: the reference
  implementation; its outputs must equal ours;
- `merged_again`: the merged model timed twice per round, an A/A control (the noise floor).
Resident memory is the bytes of the parameters and buffers each setup holds (one base + n adapters
vs n merged models vs one model). Writes benchmarks/out/bench_serving.{json,md}.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import peft
import torch
from transformers import T5Config, T5ForConditionalGeneration

from lora_module import LoraConfig, LoraModel
from lora_pipeline.benchmarks.common import Figure, main, time_interleaved, write_results

SETTINGS = {
    # Smaller than the other benchmarks' 35M T5: the per-task contenders run up to 8 batches per round.
    "full": {"model": {"d_model": 256, "d_kv": 32, "num_heads": 8, "d_ff": 1024, "num_layers": 4,
                       "num_decoder_layers": 4, "vocab_size": 8000},
             "batch": 16, "source_len": 32, "new_tokens": 12, "repeats": 7, "tasks": (2, 8)},
    "quick": {"model": {"d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 64, "num_layers": 2,
                        "num_decoder_layers": 2, "vocab_size": 512},
              "batch": 4, "source_len": 8, "new_tokens": 3, "repeats": 1, "tasks": (2,)},
}
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q", "v"]}


def _base(setting: dict) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(**setting["model"], decoder_start_token_id=0)).eval()


def _bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _setups(setting: dict, n: int) -> dict:
    """Ours with n adapters, PEFT with the same n adapters, and n merged models."""
    ours = LoraModel(_base(setting), None)
    theirs = None
    g = torch.Generator().manual_seed(n)
    for i in range(n):
        name = f"task{i}"
        ours.add_adapter(name, LoraConfig(**LORA))
        config = peft.LoraConfig(task_type="SEQ_2_SEQ_LM", **LORA)
        theirs = peft.get_peft_model(_base(setting), config, adapter_name=name) if theirs is None else theirs
        if name not in theirs.peft_config:
            theirs.add_adapter(name, config)
        with torch.no_grad():
            for path, layer in ours.lora_layers():
                for part in ("lora_A", "lora_B"):
                    weight = getattr(layer, part)[name].weight
                    weight.copy_(torch.randn(weight.shape, generator=g) * 0.05)
                    theirs.get_parameter(f"base_model.model.{path}.{part}.{name}.weight").copy_(weight)
    merged = []
    for i in range(n):
        copy_ = copy.deepcopy(ours)
        copy_.set_adapter(f"task{i}")
        merged.append(copy_.merge_and_unload().eval())
    return {"ours": ours.eval(), "peft": theirs.eval(), "merged": merged}


def _contenders(setups: dict, ids: torch.Tensor, names: list[str], new_tokens: int) -> dict:
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "num_beams": 1}
    mask = torch.ones_like(ids)
    ours, theirs, merged = setups["ours"], setups["peft"], setups["merged"]
    groups = {name: [i for i, n in enumerate(names) if n == name] for name in dict.fromkeys(names)}

    def mixed():
        return ours.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kwargs)

    def switching():
        for name, rows in groups.items():
            ours.set_adapter(name)
            ours.generate(input_ids=ids[rows], attention_mask=mask[rows], **kwargs)

    def merged_per_task():
        for i, rows in enumerate(groups.values()):
            merged[i].generate(input_ids=ids[rows], attention_mask=mask[rows], **kwargs)

    def one_merged():
        return merged[0].generate(input_ids=ids, attention_mask=mask, **kwargs)

    def peft_mixed():
        return theirs.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kwargs)

    return {"mixed": mixed, "switching": switching, "merged_per_task": merged_per_task, "merged": one_merged,
            "peft_mixed": peft_mixed, "merged_again": one_merged}


@torch.inference_mode()
def _measure(setting: dict, n: int) -> dict:
    setups = _setups(setting, n)
    g = torch.Generator().manual_seed(2)
    batch = setting["batch"]
    ids = torch.randint(2, setting["model"]["vocab_size"], (batch, setting["source_len"]), generator=g)
    names = [f"task{i % n}" for i in range(batch)]
    fns = _contenders(setups, ids, names, setting["new_tokens"])
    same_as_peft = torch.equal(fns["mixed"](), fns["peft_mixed"]())
    seconds = time_interleaved(fns, repeats=setting["repeats"])
    one = _bytes(setups["merged"][0])
    return {
        "seconds": seconds,
        "rows_per_s": {k: batch / v for k, v in seconds.items()},
        "outputs_equal_peft": same_as_peft,
        "resident_bytes": {"one_model": one, "mixed_one_base": _bytes(setups["ours"]),
                           "merged_per_task": sum(_bytes(m) for m in setups["merged"]),
                           "peft_one_base": _bytes(setups["peft"])},
    }


def _figures(n: int, batch: int, r: dict) -> list[Figure]:
    rows, mem = r["rows_per_s"], r["resident_bytes"]
    tag = f"{n} tasks, batch {batch}"
    return [
        Figure(f"mixed / one merged model rows/s, {tag}", rows["mixed"] / rows["merged"], 0.8, ">="),
        Figure(f"switching adapters / one merged model rows/s, {tag}", rows["switching"] / rows["merged"]),
        Figure(f"merged model per task / one merged model rows/s, {tag}",
               rows["merged_per_task"] / rows["merged"]),
        Figure(f"ours / PEFT mixed-batch time, {tag}", r["seconds"]["mixed"] / r["seconds"]["peft_mixed"],
               1.0, "<="),
        Figure(f"merged / merged time, A/A control, {tag}",
               r["seconds"]["merged_again"] / r["seconds"]["merged"]),
        Figure(f"resident memory, one base + {n} adapters / one model",
               mem["mixed_one_base"] / mem["one_model"],
               1.1 if n >= 8 else None, "<="),
        Figure(f"resident memory, {n} merged models / one model", mem["merged_per_task"] / mem["one_model"]),
    ]


def run(quick: bool = False, out_dir: Path | None = None) -> Path:
    """Measure and write JSON + Markdown; returns the JSON path."""
    setting = SETTINGS["quick" if quick else "full"]
    raw = {"setting": dict(setting), "lora": LORA, "torch_threads": torch.get_num_threads(),
           "load_average": os.getloadavg(), "tasks": {}}
    figures = []
    for n in setting["tasks"]:
        result = _measure(setting, n)
        raw["tasks"][str(n)] = result
        figures += _figures(n, setting["batch"], result)
    raw["load_average_after"] = os.getloadavg()
    return write_results("bench_serving", figures, raw, out_dir)


if __name__ == "__main__":
    main(run, __doc__, "tiny model, 2 tasks, one repeat (a smoke run)")
