"""Recipe benchmark: our training path against the Seq2SeqTrainer + PEFT recipe users would run instead.

    lora-pipeline bench --only recipe            # full size (~15 minutes on 2 idle cores)
    lora-pipeline bench --only recipe --quick    # tiny setting (well under a minute)
    python -m lora_pipeline.benchmarks.bench_recipe [--quick]

Three contenders train the same LoRA adapter on the same rows, one after the other:

- `recipe_max_length`: Hugging Face `Seq2SeqTrainer` + PEFT LoRA on rows padded to the maximum
  lengths (`padding="max_length"`, label pads -100), the recipe as it is commonly written;
- `recipe_dynamic`: the same at its best: `DataCollatorForSeq2Seq` pads each batch to its longest
  row, and the sampler groups rows of similar length (`group_by_length`);
- `ours`: `LoraCLI` (lora_module.training.cli, what `lora-pipeline fit` runs) on the folder written by
  `lora_pipeline.data.prepare`, length grouping on.

Same data: DialogSum (`../shared/data/dialogsum/`, dev split as training rows, test split with three
references each) when the folder exists, else the demo corpus; prepared once by
`lora_pipeline.data.prepare` with the locally trained demo tokenizer (vocab 8000), and every
contender trains on the same prepared token ids (the recipes get them padded their way). Same model:
the 35M-parameter T5 of the LoRA-core benchmark (d_model 512, 6+6 layers, 8 heads, d_ff 1024),
built from a config with random weights, vocabulary sized to the tokenizer. Same training: LoRA r=32,
alpha=32, dropout 0.05 on q and v (the reference experiment's adapter, not the r=8 of lora_core),
AdamW at 1e-3 with linear decay and no warmup, gradient clipping at 1.0, batch 8, 20 steps = one
epoch over the first 160 training rows, sources cut to 512 and targets to 128 tokens (the
reference's limits).

Measured per contender (full size: each in a fresh process, so peaks are its own):
- wall time: from the start of the contender's function (library imports included) to its adapter
  on disk; data preparation, done once for all, and interpreter start are not counted;
- non-pad tokens/s: source + target tokens that are not padding, over the training loop's time
  (train begin to train end callbacks);
- peak memory: the peak resident set during the training loop (VmHWM, reset at train begin), and on
  CUDA `torch.cuda.max_memory_allocated` (without CUDA: "not measured");
- ROUGE on the same test rows after training: each adapter is loaded by lora_module.evaluation and
  decodes greedily; means with 95% bootstrap intervals, and paired bootstraps ours vs each recipe.
Goals: ours <= 0.5x recipe_max_length's wall time and <= 0.95x recipe_dynamic's, with ours' ROUGE
inside both recipes' confidence intervals. Writes benchmarks/out/bench_recipe.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lora_pipeline.benchmarks.common import Figure, write_results

CONTENDERS = ("recipe_max_length", "recipe_dynamic", "ours")
DIALOGSUM = Path(__file__).resolve().parents[2] / "shared" / "data" / "dialogsum"
T5_35M = {"d_model": 512, "d_kv": 64, "num_heads": 8, "d_ff": 1024, "num_layers": 6, "num_decoder_layers": 6}
T5_TINY = {"d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2}
SETTINGS = {
    "full": {"model": T5_35M, "vocab": 8000, "source_len": 512, "target_len": 128, "batch": 8, "steps": 20,
             "test_rows": 100, "gen_batch": 16, "subprocess": True},
    "quick": {"model": T5_TINY, "vocab": 400, "source_len": 96, "target_len": 24, "batch": 4, "steps": 3,
              "test_rows": 8, "gen_batch": 8, "subprocess": False},
}
LORA = {"r": 32, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["q", "v"]}
LR = 1e-3
ROUGE_KEYS = ("rouge1", "rougeL")


# ---- shared inputs: the prepared data and the base model -------------------------------------

def prepare_inputs(setting: dict, work: Path) -> dict:
    """Prepare the data (DialogSum if present, else the demo corpus) and save the random-weight base."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from lora_pipeline.data import DataConfig, load_tokenizer, prepare

    common = {"name": "bench_recipe", "max_source_length": setting["source_len"],
              "max_target_length": setting["target_len"], "tokenizer": "demo",
              "tokenizer_vocab_size": setting["vocab"], "output_root": str(work / "data")}
    if (DIALOGSUM / "dialogsum.dev.jsonl").is_file():
        cfg = DataConfig(source="files", files={"train": str(DIALOGSUM / "dialogsum.dev.jsonl"),
                                                "test": str(DIALOGSUM / "dialogsum.test.jsonl")},
                         reference_columns=["summary1", "summary2", "summary3"], validation_size=20, **common)
    else:
        cfg = DataConfig(source="demo", demo_train_size=400, demo_validation_size=20, demo_test_size=200,
                         **common)
    prepared = prepare(cfg).path
    tokenizer = load_tokenizer(prepared)
    torch.manual_seed(0)
    config = T5Config(**setting["model"], vocab_size=max(setting["vocab"], len(tokenizer)),
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    T5ForConditionalGeneration(config).save_pretrained(work / "base")
    return {"prepared": str(prepared), "base": str(work / "base"), "source": cfg.source}


def train_rows(prepared: str, setting: dict) -> list[dict]:
    """The training rows every contender trains on: the first steps x batch rows of the train split."""
    from lora_pipeline.data import load_prepared

    dataset, _ = load_prepared(prepared)
    n = setting["steps"] * setting["batch"]
    if len(dataset["train"]) < n:
        raise ValueError(f"the prepared train split has {len(dataset['train'])} rows, needs {n}")
    rows = dataset["train"].select(range(n)).select_columns(["input_ids", "attention_mask", "labels"])
    return rows.to_list()


def non_pad_tokens(rows: list[dict]) -> int:
    """Source + target tokens of the rows, padding excluded (what our data module counts as tokens)."""
    return sum(len(r["input_ids"]) + len(r["labels"]) for r in rows)


# ---- timing and memory of the training loop --------------------------------------------------

def _status_bytes(field: str) -> int | None:
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) * 1024 if match else None


class LoopRecord:
    """Wall time and peak memory between the train-begin and train-end callbacks of one contender."""

    def __init__(self) -> None:
        self.t0 = self.seconds = 0.0
        self.rss_start = self.rss_peak = None
        self.cuda_peak: int | None = None

    def start(self) -> None:
        import torch

        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
            self.rss_start = _status_bytes("VmRSS")
        except OSError:  # not Linux: no per-loop peak
            self.rss_start = None
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()

    def stop(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.cuda_peak = torch.cuda.max_memory_allocated()
        self.seconds = time.perf_counter() - self.t0
        self.rss_peak = _status_bytes("VmHWM") if self.rss_start is not None else None

    def as_dict(self) -> dict:
        return {"loop_seconds": self.seconds, "rss_loop_start_bytes": self.rss_start,
                "rss_loop_peak_bytes": self.rss_peak, "cuda_peak_bytes": self.cuda_peak}


# ---- the contenders --------------------------------------------------------------------------

def run_recipe(kind: str, inputs: dict, setting: dict, out: Path) -> dict:
    """Seq2SeqTrainer + PEFT LoRA on rows padded to max_length (`recipe_max_length`) or per batch."""
    t0 = time.perf_counter()
    import datasets
    import peft
    import transformers
    from transformers import (
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        T5ForConditionalGeneration,
        TrainerCallback,
        default_data_collator,
    )

    tokenizer = AutoTokenizer.from_pretrained(Path(inputs["prepared"]) / "tokenizer")
    rows = train_rows(inputs["prepared"], setting)
    if kind == "recipe_max_length":
        # What tokenizer(..., padding="max_length") and the -100 label masking of the recipe produce.
        pad, src, tgt = tokenizer.pad_token_id, setting["source_len"], setting["target_len"]
        rows = [{"input_ids": r["input_ids"] + [pad] * (src - len(r["input_ids"])),
                 "attention_mask": r["attention_mask"] + [0] * (src - len(r["attention_mask"])),
                 "labels": r["labels"] + [-100] * (tgt - len(r["labels"]))} for r in rows]
    train = datasets.Dataset.from_list(rows)

    transformers.set_seed(0)
    base = T5ForConditionalGeneration.from_pretrained(inputs["base"])
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_2_SEQ_LM", bias="none", **LORA))
    record = LoopRecord()

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record.start()

        def on_train_end(self, args, state, control, **kwargs):
            record.stop()

    fields = {f.name for f in Seq2SeqTrainingArguments.__dataclass_fields__.values()}
    grouping = {}
    if kind == "recipe_dynamic":  # transformers 5 renamed group_by_length to a sampling strategy
        grouping = ({"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in fields
                    else {"group_by_length": True})
    args = Seq2SeqTrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=setting["batch"],
        max_steps=setting["steps"], learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, logging_steps=max(1, setting["steps"] // 4),
        save_strategy="no", report_to="none", seed=0, disable_tqdm=True, remove_unused_columns=False,
        **grouping)
    collator = (default_data_collator if kind == "recipe_max_length"
                else DataCollatorForSeq2Seq(tokenizer, model=base, label_pad_token_id=-100))
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=train, data_collator=collator,
                             callbacks=[Clock()])
    result = trainer.train()
    model.save_pretrained(out / "adapter")
    return {"wall_seconds": time.perf_counter() - t0, **record.as_dict(), "steps": trainer.state.global_step,
            "train_loss": result.training_loss,
            "tokens": non_pad_tokens(train_rows(inputs["prepared"], setting)),
            "padded_tokens": sum(len(r["input_ids"]) + len(r["labels"]) for r in rows),
            "adapter": str(out / "adapter")}


def ours_config(inputs: dict, setting: dict, out: Path) -> dict:
    """The training config of `ours`: the recipe's hyperparameters in our CLI's terms."""
    n = setting["steps"] * setting["batch"]
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "auto", "devices": 1, "precision": "32-true",
                    "max_steps": setting["steps"], "gradient_clip_val": 1.0, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "num_sanity_val_steps": 0, "limit_val_batches": 0,
                    "log_every_n_steps": max(1, setting["steps"] // 4)},
        "model": {"model_name_or_path": inputs["base"], "finetune": "lora", "lora": LORA, "learning_rate": LR,
                  "weight_decay": 0.0, "warmup_steps": 0, "scheduler": "linear", "output_dir": str(out)},
        "data": {"prepared_dir": inputs["prepared"], "batch_size": setting["batch"], "group_by_length": True,
                 "max_train_samples": n},
    }


def run_ours(inputs: dict, setting: dict, out: Path) -> dict:
    """Our Lightning CLI (`lora-pipeline fit`), in this process, with a clock callback added."""
    t0 = time.perf_counter()
    import warnings

    import lightning as L
    import yaml

    from lora_module.training.cli import LoraCLI

    out.mkdir(parents=True, exist_ok=True)
    config = out / "fit.yaml"
    config.write_text(yaml.safe_dump(ours_config(inputs, setting, out)))
    record = LoopRecord()

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            record.start()

        def on_train_end(self, trainer, pl_module):
            record.stop()

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        LoraCLI(args=["fit", "--config", str(config)], trainer_defaults={"callbacks": [Clock()]})
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall_seconds": time.perf_counter() - t0, **record.as_dict(), "steps": metrics["steps"],
            "train_loss": metrics["train_loss"], "tokens": metrics["tokens"],
            "padded_tokens": None, "adapter": str(out / "adapter")}


def run_contender(name: str, inputs: dict, setting: dict, work: Path) -> dict:
    out = work / name
    if name == "ours":
        return run_ours(inputs, setting, out)
    return run_recipe(name, inputs, setting, out)


def contender_in_subprocess(name: str, inputs: dict, setting_name: str, work: Path) -> dict:
    """One contender in a fresh interpreter: its memory peak is its own, nothing is shared or warm."""
    cmd = [sys.executable, "-m", "lora_pipeline.benchmarks.bench_recipe", "--contender", name,
           "--work", str(work), "--inputs", json.dumps(inputs)]
    if setting_name == "quick":
        cmd.append("--quick")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"contender {name} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- quality: ROUGE of each adapter on the same test rows --------------------------------------

def score_adapter(adapter: str, inputs: dict, setting: dict) -> dict[str, list[float]]:
    """Per-example ROUGE of greedy decodes of the first `test_rows` test prompts."""
    from lora_module.evaluation.generation import GenerationConfig, ModelSpec, generate, load_model_for_spec
    from lora_module.evaluation.rouge import score_examples
    from lora_pipeline.data import load_prepared

    dataset, _ = load_prepared(inputs["prepared"])
    test = dataset["test"].select(range(min(setting["test_rows"], len(dataset["test"]))))
    gen = GenerationConfig(batch_size=setting["gen_batch"], max_new_tokens=setting["target_len"],
                           max_source_length=setting["source_len"])
    model, tokenizer = load_model_for_spec(ModelSpec("adapter", "lora", adapter), gen,
                                           tokenizer_path=Path(inputs["prepared"]) / "tokenizer")
    predictions = generate(model, tokenizer, test["prompt"], gen)
    return score_examples(predictions, test["references"], rouge_types=ROUGE_KEYS)


def _ratio(a: float | None, b: float | None) -> float:
    return a / b if a and b else float("nan")


def make_figures(results: dict[str, dict], rouge: dict[str, dict]) -> list[Figure]:
    """Ours against each recipe: wall and loop time, tokens/s, peak RSS, ROUGE inside their intervals."""
    maxlen, dynamic, ours = (results[c] for c in CONTENDERS)
    figures = [
        Figure("ours / recipe_max_length wall time", ours["wall_seconds"] / maxlen["wall_seconds"], goal=0.5,
               detail={c: results[c]["wall_seconds"] for c in CONTENDERS}),
        Figure("ours / recipe_dynamic wall time", ours["wall_seconds"] / dynamic["wall_seconds"], goal=0.95),
        Figure("ours / recipe_max_length training-loop time", ours["loop_seconds"] / maxlen["loop_seconds"],
               detail={c: results[c]["loop_seconds"] for c in CONTENDERS}),
        Figure("ours / recipe_dynamic training-loop time", ours["loop_seconds"] / dynamic["loop_seconds"]),
        Figure("ours / recipe_max_length non-pad tokens/s",
               ours["tokens_per_second"] / maxlen["tokens_per_second"], direction=">=",
               detail={c: results[c]["tokens_per_second"] for c in CONTENDERS}),
        Figure("ours / recipe_dynamic non-pad tokens/s",
               ours["tokens_per_second"] / dynamic["tokens_per_second"], direction=">="),
        Figure("ours / recipe_max_length peak RSS in the training loop",
               _ratio(ours["rss_loop_peak_bytes"], maxlen["rss_loop_peak_bytes"]),
               detail={c: results[c]["rss_loop_peak_bytes"] for c in CONTENDERS}),
        Figure("ours / recipe_dynamic peak RSS in the training loop",
               _ratio(ours["rss_loop_peak_bytes"], dynamic["rss_loop_peak_bytes"])),
    ]
    for key in ROUGE_KEYS:
        for r in CONTENDERS[:2]:
            inside = rouge[r][key]["ci_low"] <= rouge["ours"][key]["mean"] <= rouge[r][key]["ci_high"]
            figures.append(Figure(f"ours {key} inside {r}'s 95% CI (1 = yes)", float(inside), goal=1.0,
                                  direction=">=", unit="",
                                  detail={"ours": rouge["ours"][key], r: rouge[r][key]}))
    return figures


def run(quick: bool = False, out_dir: Path | None = None) -> Path:
    """Train the three contenders, score their adapters, write JSON + Markdown; returns the JSON path."""
    import torch

    from lora_module.evaluation.rouge import paired_bootstrap, summarize

    setting_name = "quick" if quick else "full"
    setting = SETTINGS[setting_name]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs = prepare_inputs(setting, work)
        results = {}
        for name in CONTENDERS:
            if setting["subprocess"]:
                results[name] = contender_in_subprocess(name, inputs, setting_name, work)
            else:
                results[name] = run_contender(name, inputs, setting, work)
        scores = {name: score_adapter(r["adapter"], inputs, setting) for name, r in results.items()}
    rouge = {name: summarize(s) for name, s in scores.items()}
    paired = {f"ours_vs_{r}": {k: paired_bootstrap(scores["ours"][k], scores[r][k]) for k in ROUGE_KEYS}
              for r in CONTENDERS[:2]}
    for r in results.values():
        r["tokens_per_second"] = r["tokens"] / r["loop_seconds"]
        r.pop("adapter")
    figures = make_figures(results, rouge)
    cuda = torch.cuda.is_available()
    raw = {"setting": setting, "lora": LORA, "learning_rate": LR, "quick": quick,
           "data_source": inputs["source"], "device": "cuda" if cuda else "cpu",
           "torch_threads": torch.get_num_threads(),
           "contenders": results, "rouge": rouge, "paired_bootstrap": paired,
           "cuda_peak_memory": "measured (contenders' cuda_peak_bytes)" if cuda
           else "not measured: no CUDA GPU on this machine",
           "notes": "wall = contender function start (imports included) to adapter saved; loop = train begin "
                    "to train end callbacks; tokens = non-pad source + target tokens of the same rows"}
    return write_results("bench_recipe", figures, raw, out_dir)


def _child(name: str, work: str, inputs: str, quick: bool) -> None:
    setting = SETTINGS["quick" if quick else "full"]
    result = run_contender(name, json.loads(inputs), setting, Path(work))
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny setting (well under a minute)")
    parser.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)  # internal: one child
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.contender:
        _child(cli.contender, cli.work, cli.inputs, cli.quick)
    else:
        print(run(quick=cli.quick).with_suffix(".md").read_text())
