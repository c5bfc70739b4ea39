"""`modules_to_save` through the Lightning module: the full copies train, are counted and are exported.

Run: .venv/bin/pytest tests/test_modules_to_save_training.py -q

The Lightning module refuses to train anything but adapter tensors (a base parameter left trainable is a
bug); PEFT's `modules_to_save` copies are the one exception, trained in full beside the adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file

from lora_module import LoraConfig, LoraModel
from lora_module.contracts import ADAPTER_WEIGHTS_FILE


def test_lightning_trains_and_exports_modules_to_save_copies(causal_tokenizer_dir, tiny_llama_dir, tmp_path):
    from test_training import make_trainer, prepare_tiny
    from transformers import LlamaForCausalLM

    from lora_module.training.datamodule import PreparedDataModule
    from lora_module.training.module import FineTuneModule

    L.seed_everything(0)
    out = tmp_path / "run"
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    module = FineTuneModule(str(tiny_llama_dir), finetune="lora", lora=config, learning_rate=1e-2,
                            output_dir=str(out))
    copies = {n: p.detach().clone() for n, p in module.model.named_parameters() if ".modules_to_save." in n}
    assert copies and all(module.model.get_parameter(n).requires_grad for n in copies)
    prepared = prepare_tiny(causal_tokenizer_dir, "causal", tmp_path / "data")
    dm = PreparedDataModule(str(prepared), batch_size=4)
    make_trainer(2).fit(module, dm)

    assert all(not torch.equal(module.model.get_parameter(n), before) for n, before in copies.items())
    lm_head = LlamaForCausalLM.from_pretrained(tiny_llama_dir).lm_head.weight
    assert json.loads((out / "metrics.json").read_text())["trainable_params"] > lm_head.numel()
    exported = load_file(Path(out) / "adapter" / ADAPTER_WEIGHTS_FILE)
    trained = next(p for n, p in module.model.named_parameters() if ".modules_to_save." in n)
    assert torch.equal(exported["base_model.model.lm_head.weight"], trained.detach())
    # The export loads on an untouched base and carries the trained head.
    reloaded = LoraModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama_dir), out / "adapter")
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, module.model.eval()(input_ids=ids).logits,
                              atol=1e-5)
