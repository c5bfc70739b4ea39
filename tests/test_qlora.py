"""QLoRA on the CPU (bitsandbytes >= 0.50): NF4 base + LoRA trains, its adapter moves between NF4
and fp32 bases of the same weights, and merging for export dequantizes (and says so).

Run: .venv/bin/pytest tests/test_qlora.py -q
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
import transformers
from conftest import make_tiny_llama, make_tiny_t5
from torch import nn
from transformers import LlamaForCausalLM, T5ForConditionalGeneration

from lora_module import (
    LoraConfig,
    LoraConfigError,
    LoraModel,
    base_fingerprint,
    is_quantized,
    load_base_model,
    quantize_nf4,
)


def t5_batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(4, vocab, (4, 10), generator=g),
            "labels": torch.randint(4, vocab, (4, 5), generator=g)}


def run(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(**batch)
    return out.loss, out.logits


def linear_types(model: nn.Module) -> dict[str, str]:
    return {n.rsplit(".", 1)[-1]: type(m).__name__
            for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_quantize_nf4_replaces_linear_layers_except_head_and_keep_fp32_modules():
    t5 = quantize_nf4(make_tiny_t5(), double_quant=False)
    # T5 keeps `wo` in fp32 (it casts activations to wo.weight.dtype): transformers skips it too
    assert linear_types(t5) == {"q": "Linear4bit", "k": "Linear4bit", "v": "Linear4bit", "o": "Linear4bit",
                                "wi": "Linear4bit", "wo": "Linear", "lm_head": "Linear"}
    q = t5.encoder.block[0].layer[0].SelfAttention.q
    assert isinstance(q.weight, bnb.nn.Params4bit) and q.weight.quant_type == "nf4"
    assert q.weight.compress_statistics is False and not q.weight.requires_grad
    assert is_quantized(t5) and not is_quantized(make_tiny_t5())

    llama = quantize_nf4(make_tiny_llama())
    types = linear_types(llama)
    assert types.pop("lm_head") == "Linear" and set(types.values()) == {"Linear4bit"}
    assert llama.model.layers[0].self_attn.q_proj.weight.compress_statistics is True
    ids = torch.tensor([[3, 40, 41, 42, 43]])
    with torch.no_grad():
        full, nf4 = make_tiny_llama()(input_ids=ids).logits, llama(input_ids=ids).logits
    assert not torch.equal(full, nf4)  # really quantized ...
    assert (full - nf4).abs().max() < 0.1 * full.abs().max()  # ... and still close
    with pytest.raises(LoraConfigError, match="already quantized"):
        quantize_nf4(llama)


def test_load_base_model_picks_class_and_shares_fingerprint_across_precisions(tiny_t5_dir, tiny_llama_dir):
    assert type(load_base_model(tiny_llama_dir)) is LlamaForCausalLM
    fp32 = load_base_model(tiny_t5_dir)
    assert type(fp32) is T5ForConditionalGeneration and not is_quantized(fp32)
    bf16 = load_base_model(tiny_t5_dir, torch_dtype="bfloat16")
    assert bf16.shared.weight.dtype == torch.bfloat16
    nf4 = load_base_model(tiny_t5_dir, quantize="nf4")
    assert is_quantized(nf4)
    assert base_fingerprint(fp32) == base_fingerprint(bf16) == base_fingerprint(nf4)
    with pytest.raises(LoraConfigError, match=r"quantize must be one of \(None, 'nf4'\), got 'int8'"):
        load_base_model(tiny_t5_dir, quantize="int8")
    with pytest.raises(LoraConfigError, match="torch_dtype must be .*'float64'"):
        load_base_model(tiny_t5_dir, torch_dtype="float64")


def test_load_base_model_does_not_trust_remote_code_unless_asked(tiny_llama_dir, monkeypatch):
    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_base_model(tiny_llama_dir)
    assert seen == [False, False]
    load_base_model(tiny_llama_dir, trust_remote_code=True)
    assert seen[2:] == [True, True]


def test_qlora_trains_on_cpu_and_adapter_loads_onto_nf4_and_fp32_bases(tiny_t5_dir, tmp_path):
    base = load_base_model(tiny_t5_dir, quantize="nf4")
    batch = t5_batch(base.config.vocab_size)
    lm = LoraModel(base, LoraConfig(r=8, lora_alpha=16))
    trainable, total = lm.trainable_parameters()
    fp32_total = sum(p.numel() for p in load_base_model(tiny_t5_dir).parameters())
    assert total == fp32_total + trainable  # 4-bit weights count at their logical size
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    lm.train()
    losses = []
    for _ in range(20):
        loss = lm(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    lm.eval()
    trained_loss, trained_logits = run(lm, batch)
    lm.save_pretrained(tmp_path)

    on_nf4 = LoraModel.from_pretrained(load_base_model(tiny_t5_dir, quantize="nf4"), tmp_path)
    loss, logits = run(on_nf4, batch)
    assert torch.allclose(logits, trained_logits, atol=1e-5)

    fp32 = load_base_model(tiny_t5_dir)
    base_loss, _ = run(fp32, batch)
    on_fp32 = LoraModel.from_pretrained(fp32, tmp_path)  # same fingerprint: no force needed
    loss, _ = run(on_fp32, batch)
    assert loss < 0.5 * base_loss and abs(loss - trained_loss) < 0.25 * base_loss


def _qlora_model(seed: int = 0) -> LoraModel:
    lm = LoraModel(quantize_nf4(make_tiny_t5()), LoraConfig(r=4, lora_alpha=8))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return lm


def test_qlora_merge_and_unload_dequantizes_and_says_so(tmp_path):
    lm = _qlora_model()
    batch = t5_batch(512)
    _, expected = run(lm, batch)
    with pytest.warns(UserWarning, match=r"dequantized 28 4-bit layers .*NOT quantized"):
        plain = lm.merge_and_unload()
    assert type(plain) is T5ForConditionalGeneration and not is_quantized(plain)
    assert set(linear_types(plain).values()) == {"Linear"}
    assert plain.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float32
    _, got = run(plain, batch)
    assert torch.allclose(got, expected, atol=1e-4)
    plain.save_pretrained(tmp_path)
    _, reloaded = run(T5ForConditionalGeneration.from_pretrained(tmp_path), batch)
    assert torch.equal(reloaded, got)


def test_qlora_merge_then_unmerge_restores_the_quantized_layers():
    lm = _qlora_model()
    batch = t5_batch(512)
    _, before = run(lm, batch)
    layer = lm.model.encoder.block[0].layer[0].SelfAttention.q
    quantized = layer.base_layer
    with pytest.warns(UserWarning, match="4-bit layers were dequantized"):
        lm.merge_adapter()
    assert type(layer.base_layer) is nn.Linear
    _, merged = run(lm, batch)
    assert torch.allclose(merged, before, atol=1e-4)
    lm.unmerge_adapter()
    assert layer.base_layer is quantized
    _, after = run(lm, batch)
    assert torch.equal(after, before)
