"""PEFT parity of an adapter trained by our chat path (#22 item 6): the reference library, given the
adapter folder our training exported, computes the same logits and the same greedy generations on
prompts rendered with the tokenizer's chat template.

    .venv/bin/pytest tests/test_chat_peft_parity.py -q

Training is the pipeline's own (prepare with prompt_format chat, FineTuneModule, a few steps, dropout
0) on the tiny chat Llama of conftest; prompts come from the adapter's sidecar settings
(`PromptSettings.render_conversations`) and are tokenized without special tokens, as evaluation and
serving tokenize them. The trained adapter must also move the outputs away from the bare base's, or
"equal" would prove nothing (an adapter PEFT silently ignores would pass).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import peft
import pytest
import torch
from chat_helpers import chat_rows, prepare_chat
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_module import LoraConfig
from lora_module.adapter_io import read_prompt_settings
from lora_module.contracts import ADAPTER_DIR
from lora_module.serving.predictor import load_adapter_with_base
from lora_module.training.datamodule import PreparedDataModule
from lora_module.training.module import FineTuneModule

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
CONVERSATIONS = [
    [{"role": "user", "content": "book a table for 3 people"}],
    [{"role": "user", "content": "book a table for 7 people"},
     {"role": "assistant", "content": "agreed see you soon"},
     {"role": "user", "content": "the price is 7 dollars"}],
    [{"role": "system", "content": "answer in two words"},
     {"role": "user", "content": "my laptop screen is broken"}],
]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, chat_llama_dir) -> Path:
    """A LoRA adapter trained for 4 steps on chat data by the pipeline's training path (dropout 0); a
    learning rate that moves the outputs without collapsing them into one repeated token."""
    root = tmp_path_factory.mktemp("chat-parity")
    prepared = prepare_chat(root, chat_rows(24), chat_llama_dir, "chat_parity", test_size=2)
    L.seed_everything(0)
    out = root / "run"
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)
    module = FineTuneModule(str(chat_llama_dir), lora=lora, learning_rate=3e-3, output_dir=str(out))
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, PreparedDataModule(str(prepared.path), batch_size=4))
    return out / ADAPTER_DIR


def encode(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Left-padded ids of rendered prompts, without special tokens (the template wrote the BOS)."""
    tokenizer.padding_side = "left"
    return tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")


def greedy(model, batch: dict[str, torch.Tensor], pad_id: int) -> torch.Tensor:
    out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad_id)
    return out[:, batch["input_ids"].shape[1]:]


def test_peft_loads_our_chat_adapter_with_equal_logits_and_generations(trained_adapter, chat_llama_dir):
    settings = read_prompt_settings(trained_adapter)
    assert settings is not None and settings.format == "chat"
    tokenizer = AutoTokenizer.from_pretrained(chat_llama_dir)
    prompts = settings.render_conversations(CONVERSATIONS, tokenizer)
    assert all(p.startswith(tokenizer.bos_token) and p.count(tokenizer.bos_token) == 1 for p in prompts)
    assert prompts[0].startswith("<s><|system|>\nbe brief</s>\n") and prompts[2].count("<|system|>") == 1
    assert all(p.endswith("<|assistant|>\n") for p in prompts)
    batch = encode(tokenizer, prompts)
    assert (batch["input_ids"] == tokenizer.bos_token_id).sum() == len(prompts)  # one BOS per prompt

    ours, _ = load_adapter_with_base(trained_adapter, device="cpu", dtype="float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(chat_llama_dir), str(trained_adapter)).eval()
    # Keys PEFT does not recognise load with only a warning, and its adapter then does nothing.
    assert not [w for w in caught if "keys" in str(w.message).lower()], [str(w.message) for w in caught]
    base = AutoModelForCausalLM.from_pretrained(chat_llama_dir).eval()
    ours.eval()
    with torch.no_grad():
        a, b, plain = (m(**batch).logits for m in (ours, theirs, base))
    mask = batch["attention_mask"].bool()
    a, b, plain = a[mask], b[mask], plain[mask]  # real tokens only: padded positions are not compared
    scale = a.abs().max()
    assert (a - b).abs().max() <= 1e-5 * scale, f"max diff {(a - b).abs().max()} at scale {scale}"
    assert (a - plain).abs().max() > 1e-2 * scale, "the trained adapter barely changes the logits"

    pad = tokenizer.pad_token_id
    with torch.no_grad():
        ours_ids, theirs_ids, base_ids = (greedy(m, batch, pad) for m in (ours, theirs, base))
    assert torch.equal(ours_ids, theirs_ids), (ours_ids, theirs_ids)
    assert len(set(ours_ids.flatten().tolist())) > NEW_TOKENS, "degenerate output: equality would be cheap"
    assert not torch.equal(ours_ids, base_ids), "the trained adapter generates what the base does"
