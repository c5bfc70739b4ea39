"""A chat task end to end on the tiny chat Llama: prepare -> fit (LoRA, a few steps) -> evaluate.

    .venv/bin/pytest tests/test_chat_training.py -q

The existing training and evaluation stages take chat data unchanged: the prepared rows carry
assistant-only labels, the exported adapter's sidecar records prompt_format chat (so evaluation,
`predict` and serving render prompts with the chat template), and evaluation tokenizes those
prompts without special tokens (one BOS) and scores only the generated continuation.
"""

from __future__ import annotations

import json

import lightning as L
import torch
from chat_helpers import chat_rows, prepare_chat

from lora_module import LoraConfig
from lora_module.adapter_io import read_prompt_settings
from lora_module.evaluation.evaluate import evaluate_model
from lora_module.evaluation.generation import GenerationConfig, ModelSpec
from lora_module.training.datamodule import PreparedDataModule
from lora_module.training.module import FineTuneModule

TARGETS = ["q_proj", "v_proj", "lm_head"]


def test_chat_prepare_fit_evaluate(tmp_path, chat_llama_dir):
    prepared = prepare_chat(tmp_path, chat_rows(16, "thanks {i}"), chat_llama_dir, "chat_e2e", test_size=3)
    L.seed_everything(0)
    out = tmp_path / "run"
    module = FineTuneModule(str(chat_llama_dir), lora=LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
                            learning_rate=1e-2, output_dir=str(out))
    dm = PreparedDataModule(str(prepared.path), batch_size=4)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, dm)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and torch.isfinite(torch.tensor(metrics["train_loss"]))

    settings = read_prompt_settings(out / "adapter")
    assert settings is not None and (settings.format, settings.system_prompt) == ("chat", "be brief")

    report_path = evaluate_model(ModelSpec("lora", "lora", str(out / "adapter")), prepared.path,
                                 tmp_path / "eval", GenerationConfig(batch_size=3, device="cpu"))
    report = json.loads(report_path.read_text())
    assert report["generation"]["add_special_tokens"] is False  # the chat template wrote the one BOS
    examples = report["examples"]
    assert report["n"] == len(examples["prediction"]) == 3
    for prompt, refs in zip(examples["prompt"], examples["references"], strict=True):
        assert prompt.startswith("<s><|system|>\nbe brief</s>\n") and prompt.count("<s>") == 1
        assert prompt.endswith("<|assistant|>\n") and refs[0].startswith("thanks ")
    assert all("<|assistant|>" not in p for p in examples["prediction"])  # only the continuation
