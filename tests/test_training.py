"""Training stage in-process: FineTuneModule + PreparedDataModule on tiny T5 / Llama models.

    .venv/bin/pytest tests/test_training.py -q

Each test trains for a handful of steps on a few demo rows prepared with `data.prepare`, and
checks outcomes (losses, tensors, files), not just that nothing crashed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from lora_module import LoraConfig, LoraModel, load_base_model
from lora_module.training.datamodule import (
    EpochSampler,
    PaddingCollator,
    PreparedDataModule,
    ResumableDataLoader,
)
from lora_module.training.hparams import WarmupDecay
from lora_module.training.module import FineTuneModule, NonFiniteLossError
from lora_pipeline.data import DataConfig, prepare

# Every linear layer, lm_head included: a random tiny model's output layer has tiny logits, and
# adapting it is what lets a few steps of LoRA visibly fit the data.
ALL_TARGETS = {
    "seq2seq": ["q", "k", "v", "o", "wi", "wo", "lm_head"],
    "causal": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
}


def prepare_tiny(
    tokenizer_dir: Path, model_type: str, root: Path, n_train: int = 8, task: str = "summary"
) -> Path:
    """A prepared-data folder of demo rows, tokenized with the test tokenizer; returns its path."""
    cfg = DataConfig(
        name=f"tiny_{model_type}_{task}",
        source="demo",
        demo_task=task,
        demo_train_size=n_train,
        demo_validation_size=4,
        demo_test_size=4,
        tokenizer=str(tokenizer_dir),
        model_type=model_type,
        max_source_length=48,
        max_target_length=16,
        output_root=str(root),
    )
    return prepare(cfg).path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, seq2seq_tokenizer_dir, causal_tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prepared")
    return {
        "seq2seq": prepare_tiny(seq2seq_tokenizer_dir, "seq2seq", root),
        "causal": prepare_tiny(causal_tokenizer_dir, "causal", root),
    }


@pytest.fixture(scope="module")
def models(tiny_t5_dir, tiny_llama_dir) -> dict[str, Path]:
    return {"seq2seq": tiny_t5_dir, "causal": tiny_llama_dir}


def make_trainer(max_steps: int, **kw) -> L.Trainer:
    kw = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        **kw,
    }
    return L.Trainer(max_steps=max_steps, **kw)


def mean_train_loss(module: FineTuneModule, dm: PreparedDataModule) -> float:
    module.eval()
    with torch.no_grad():
        losses = [module(**b).loss.item() for b in dm.train_dataloader()]
    module.train()
    return sum(losses) / len(losses)


def logits(model, dm: PreparedDataModule) -> torch.Tensor:
    batch = next(iter(dm.val_dataloader()))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


# ---- data module ---------------------------------------------------------------------------


def test_collator_pads_right_with_pad_id_and_ignored_labels():
    rows = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [8, 1]},
        {"input_ids": [5], "attention_mask": [1], "labels": [9, 9, 1]},
    ]
    batch = PaddingCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[8, 1, -100], [9, 9, 1]]
    assert batch["num_tokens"] == 4 + 5  # encoder tokens + decoder tokens
    left = PaddingCollator(pad_token_id=0, padding_side="left", pad_to_multiple_of=4)(rows)
    assert left["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 5]]


def test_sampler_is_seeded_per_epoch_and_shards_ranks():
    lengths = [(i * 7) % 23 + 1 for i in range(50)]
    s = EpochSampler(lengths, batch_size=4, seed=3)
    s.set_epoch(0)
    e0 = list(s)
    assert e0 == list(EpochSampler(lengths, batch_size=4, seed=3))
    s.set_epoch(1)
    assert list(s) != e0 and sorted(list(s)) == list(range(50))
    ranks = [list(EpochSampler(lengths, 4, num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 25
    assert sorted(ranks[0] + ranks[1]) == list(range(50))
    assert [list(EpochSampler([5], 1, num_replicas=3, rank=r)) for r in range(3)] == [[0], [0], [0]]


def test_loader_state_resumes_mid_epoch_or_at_next_epoch():
    sampler = EpochSampler(list(range(8)), batch_size=4)
    loader = ResumableDataLoader(list(range(8)), batch_size=4, sampler=sampler, progress=lambda: (1, 1))
    assert loader.state_dict() == {"epoch": 1, "batches_done": 1}
    loader.load_state_dict({"epoch": 1, "batches_done": 1})
    assert (sampler.epoch, sampler.skip) == (1, 4)
    reference = EpochSampler(list(range(8)), batch_size=4)
    reference.set_epoch(1)
    assert [b.tolist() for b in loader] == [list(reference)[4:]]  # only the untrained second batch
    loader.load_state_dict({"epoch": 1, "batches_done": 2})  # saved at the end of epoch 1
    assert (sampler.epoch, sampler.skip) == (2, 0)


def test_length_grouping_cuts_padding_and_resume_skips():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (400,), generator=g).tolist()

    def padded(order: list[int]) -> int:
        return sum(max(lengths[i] for i in order[k : k + 8]) * 8 for k in range(0, len(order), 8))

    plain = list(EpochSampler(lengths, 8, seed=0))
    grouped = list(EpochSampler(lengths, 8, seed=0, group_by_length=True, mega_batch_mult=10))
    assert sorted(grouped) == list(range(400))
    assert padded(grouped) < 0.75 * padded(plain)
    full = list(EpochSampler(lengths, 8, seed=0, group_by_length=True))
    s = EpochSampler(lengths, 8, seed=0, group_by_length=True)
    s.skip = 16  # what a mid-epoch resume sets
    assert list(s) == full[16:]
    assert list(s) == full  # the skip applies once


def test_datamodule_batches_and_causal_predict_prompts(prepared):
    dm = PreparedDataModule(str(prepared["causal"]), batch_size=3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    pad = dm.tokenizer.pad_token_id
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == pad).all()
    pred = next(iter(dm.predict_dataloader()))
    row = dm.dataset["test"][0]
    n_prompt = sum(1 for x in row["labels"] if x == -100)
    ids = pred["input_ids"][0][pred["attention_mask"][0] == 1].tolist()
    assert ids == row["input_ids"][:n_prompt]  # prompt only, left padded
    assert pred["references"][0] == row["references"]


def test_datamodule_rejects_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.prepared_dir"):
        PreparedDataModule(str(tmp_path / "nope"))


def test_warmup_decay_schedule():
    lin = WarmupDecay(warmup=4, total=14, kind="linear")
    assert [round(lin(s), 3) for s in (0, 3, 4, 9, 14)] == [0.2, 0.8, 1.0, 0.5, 0.0]
    cos = WarmupDecay(warmup=0, total=10, kind="cosine")
    assert cos(0) == 1.0 and abs(cos(5) - 0.5) < 1e-9 and cos(10) < 1e-9


# ---- training ------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["seq2seq", "causal"])
@pytest.mark.parametrize("finetune", ["lora", "qlora", "full"])
def test_training_fits_and_exports(model_type, finetune, prepared, models, tmp_path):
    L.seed_everything(0)
    out = tmp_path / "run"
    module = FineTuneModule(
        str(models[model_type]),
        finetune=finetune,
        lora=LoraConfig(r=8, lora_alpha=16, target_modules=ALL_TARGETS[model_type]),
        learning_rate=1e-2,
        output_dir=str(out),
    )
    dm = PreparedDataModule(str(prepared[model_type]), batch_size=4)
    dm.setup("fit")
    base_before = {n: p.detach().clone() for n, p in module.model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in module.model.named_parameters() if "lora_" in n}
    loss_before = mean_train_loss(module, dm)

    make_trainer(20).fit(module, dm)

    loss_after = mean_train_loss(module, dm)
    assert loss_after < 0.7 * loss_before, (loss_before, loss_after)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 20 and metrics["finetune"] == finetune
    assert metrics["tokens_per_sec"] > 0 and math.isfinite(metrics["train_loss"])
    assert (out / "config.yaml").exists() and (out / "checkpoints" / "last.ckpt").exists()
    after = dict(module.model.named_parameters())

    if finetune == "full":
        assert metrics["trainable_params"] == metrics["total_params"]
        assert any(not torch.equal(base_before[n], after[n]) for n in base_before)
        auto = AutoModelForSeq2SeqLM if model_type == "seq2seq" else AutoModelForCausalLM
        reloaded = auto.from_pretrained(out / "model")
        assert (out / "model" / "tokenizer.json").exists()
        torch.testing.assert_close(logits(reloaded, dm), logits(module.model, dm))
        return

    # LoRA / QLoRA: only adapter tensors trained; the base (fp32 or packed NF4) is bit-identical.
    assert all("lora_" in n for n, p in module.model.named_parameters() if p.requires_grad)
    assert all(torch.equal(base_before[n], after[n]) for n in base_before)
    assert all(not torch.equal(lora_before[n], after[n]) for n in lora_before)
    assert metrics["trainable_params"] == sum(p.numel() for p in lora_before.values())
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and adapter_cfg["base_model_name_or_path"] == str(
        Path(models[model_type]).resolve()
    )
    # The saved adapter reproduces the trained model on a freshly loaded base.
    fresh = LoraModel.from_pretrained(
        load_base_model(str(models[model_type]), quantize="nf4" if finetune == "qlora" else None),
        out / "adapter",
    )
    torch.testing.assert_close(logits(fresh, dm), logits(module.model, dm))
    # The checkpoint's weights are exactly the adapter's tensors; the file adds their two AdamW
    # moments and a bounded per-tensor overhead (zip records, step counters), never base weights.
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
    assert sum(t.numel() * t.element_size() for t in ckpt["state_dict"].values()) == adapter_bytes
    assert sorted(t.numel() for t in ckpt["state_dict"].values()) == sorted(
        t.numel() for t in adapter.values()
    )
    ckpt_bytes = (out / "checkpoints" / "last.ckpt").stat().st_size
    assert ckpt_bytes < 3 * adapter_bytes + 2048 * len(adapter) + 32_000, (ckpt_bytes, adapter_bytes)


class StopAt(Callback):
    """Simulates a crash: raises before training step `step` (after the checkpoint of the step before)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyError("simulated crash")


def test_resume_matches_uninterrupted_run(prepared, models, tmp_path):
    def run(out: Path, ckpt: str | None = None, stop: int | None = None) -> FineTuneModule:
        L.seed_everything(0)
        module = FineTuneModule(
            str(models["seq2seq"]),
            lora=LoraConfig(r=4, target_modules=["q", "v", "lm_head"]),
            learning_rate=1e-2,
            warmup_steps=2,
            scheduler="cosine",
            checkpoint_every_n_steps=1,
            output_dir=str(out),
        )
        dm = PreparedDataModule(
            str(prepared["seq2seq"]), batch_size=3, group_by_length=True
        )  # 3 batches/epoch
        trainer = make_trainer(8, callbacks=[StopAt(stop)] if stop else [])
        if stop:
            with pytest.raises(KeyError, match="simulated crash"):
                trainer.fit(module, dm)
        else:
            trainer.fit(module, dm, ckpt_path=ckpt)
        module.final_lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        return module

    straight = run(tmp_path / "a")
    run(tmp_path / "b", stop=4)  # dies mid-epoch 2, after step 4's checkpoint
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4
    resumed = run(tmp_path / "b", ckpt=str(last))
    assert resumed.global_step == straight.global_step == 8
    assert resumed.final_lr == pytest.approx(straight.final_lr, abs=1e-12)
    a = {n: p for n, p in straight.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


class NanAt(FineTuneModule):
    """The model's loss turns NaN at global step 3 (as after an overflow)."""

    def forward(self, **batch):
        out = super().forward(**batch)
        if self.training and self.global_step == 3:
            out.loss = out.loss * float("nan")
        return out


def test_nonfinite_loss_stops_with_step_and_keeps_good_checkpoint(prepared, models, tmp_path):
    out = tmp_path / "nan"
    module = NanAt(
        str(models["seq2seq"]), learning_rate=1e-3, checkpoint_every_n_steps=1, output_dir=str(out)
    )
    dm = PreparedDataModule(str(prepared["seq2seq"]), batch_size=4)
    with pytest.raises(NonFiniteLossError, match="global step 3") as err:
        make_trainer(10).fit(module, dm)
    assert "last.ckpt" in str(err.value)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()


def test_config_errors_before_loading_anything(tmp_path):
    from lora_module import LoraConfigError

    missing = str(tmp_path / "no_model")  # would fail to load: the config check must come first
    with pytest.raises(LoraConfigError, match="r must be"):
        FineTuneModule(missing, lora={"r": 0})
    with pytest.raises(ValueError, match="finetune"):
        FineTuneModule(missing, finetune="wrong")
    with pytest.raises(ValueError, match="learning_rate"):
        FineTuneModule(missing, learning_rate=0)


def test_bf16_accumulation_clipping_and_gradient_checkpointing(prepared, models, tmp_path):
    """Trainer options work together; gradient checkpointing changes memory, not the result."""

    def run(name: str, **kw) -> FineTuneModule:
        L.seed_everything(0)
        module = FineTuneModule(
            str(models["seq2seq"]),
            learning_rate=1e-2,
            output_dir=str(tmp_path / name),
            gradient_checkpointing=kw.pop("gc", False),
        )
        dm = PreparedDataModule(str(prepared["seq2seq"]), batch_size=2)
        make_trainer(3, accumulate_grad_batches=2, gradient_clip_val=0.5, **kw).fit(module, dm)
        return module

    plain, checkpointed = run("plain"), run("gc", gc=True)
    assert plain.global_step == checkpointed.global_step == 3
    for (name, a), b in zip(plain.model.named_parameters(), checkpointed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    bf16 = run("bf16", precision="bf16-mixed")
    metrics = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert (
        bf16.global_step == 3
        and math.isfinite(metrics["train_loss"])
        and metrics["precision"] == "bf16-mixed"
    )


def test_tokenizer_larger_than_model_vocab_is_refused(prepared, tmp_path):
    from conftest import make_tiny_t5

    small = tmp_path / "small_t5"
    make_tiny_t5(vocab_size=300).save_pretrained(small)
    module = FineTuneModule(str(small), output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but .* has 300 embeddings"):
        make_trainer(2).fit(module, PreparedDataModule(str(prepared["seq2seq"]), batch_size=4))
