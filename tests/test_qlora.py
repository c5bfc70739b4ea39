"""QLoRA on the CPU (bitsandbytes >= 0.50): NF4 base + LoRA trains, its adapter moves between NF4
and fp32 bases of the same weights, and merging for export dequantizes (and says so).

bitsandbytes repacks 4-bit weights for a bf16 kernel on CPUs with AVX512-BF16 (issue #13). It decides
per layer, when the layer is built (`Linear4bit.support_avx512bf16_for_cpu =
bitsandbytes.nn.modules.has_avx512bf16()`); the `cpu_packing` fixture forces that answer to False and to
True, so both paths run here whatever the CPU.

Run: .venv/bin/pytest tests/test_qlora.py -q
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import transformers
from bitsandbytes.functional import _convert_weight_packed_for_cpu
from conftest import tiny_llama_config, tiny_t5_config
from torch import nn
from transformers import AutoTokenizer, LlamaForCausalLM, T5ForConditionalGeneration

from lora_module import (
    LoraConfig,
    LoraConfigError,
    LoraModel,
    base_fingerprint,
    is_quantized,
    load_base_model,
    quantize_nf4,
)
from lora_module.adapter_io import compute_fingerprint
from lora_module.layers import dequantize_weight, is_linear4bit

HAS_AVX512BF16 = "bitsandbytes.nn.modules.has_avx512bf16"


@pytest.fixture(params=[False, True], ids=["cpu-unpacked", "cpu-packed"])
def cpu_packing(request, monkeypatch) -> bool:
    """4-bit layers built from now on take bnb's packed CPU path (True) or not (False), on any CPU."""
    monkeypatch.setattr(HAS_AVX512BF16, lambda: request.param)
    return request.param


def make_qlora_t5(vocab_size: int = 512, seed: int = 0) -> T5ForConditionalGeneration:
    """The tiny T5 at d_model 64, one NF4 block: q, k, v and wi are quantized; o (in_features = 4 heads
    x d_kv 8 = 32) stays full precision, so one model holds both kinds of layer."""
    config = tiny_t5_config(vocab_size)
    config.d_model = 64
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config).eval()


def make_qlora_llama(seed: int = 0) -> LlamaForCausalLM:
    """The tiny Llama at hidden size 64: every projection is a multiple of the NF4 block size."""
    config = tiny_llama_config(512)
    config.hidden_size, config.head_dim = 64, 16
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def qlora_t5_dir(tmp_path_factory, seq2seq_tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("qlora_t5")
    tok = AutoTokenizer.from_pretrained(seq2seq_tokenizer_dir)
    make_qlora_t5(len(tok)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


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


def packed_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if is_linear4bit(m) and getattr(m.weight.quant_state, "packing_format_for_cpu", False)]


def test_quantize_nf4_replaces_linear_layers_except_head_keep_fp32_and_unaligned_ones(caplog):
    with caplog.at_level(logging.WARNING, logger="lora_module.qlora"):
        t5 = quantize_nf4(make_qlora_t5(), double_quant=False)
    # T5 keeps `wo` in fp32 (it casts activations to wo.weight.dtype): transformers skips it too;
    # `o` has in_features 32, not a multiple of the block size 64: kept, and the warning says which
    assert linear_types(t5) == {"q": "Linear4bit", "k": "Linear4bit", "v": "Linear4bit", "o": "Linear",
                                "wi": "Linear4bit", "wo": "Linear", "lm_head": "Linear"}
    assert "kept 6 linear layers in full precision" in caplog.text
    assert "encoder.block.0.layer.0.SelfAttention.o (in_features=32)" in caplog.text
    q = t5.encoder.block[0].layer[0].SelfAttention.q
    assert isinstance(q.weight, bnb.nn.Params4bit) and q.weight.quant_type == "nf4"
    assert q.weight.compress_statistics is False and not q.weight.requires_grad
    assert is_quantized(t5) and not is_quantized(make_qlora_t5())

    llama = quantize_nf4(make_qlora_llama())
    types = linear_types(llama)
    assert types.pop("lm_head") == "Linear" and set(types.values()) == {"Linear4bit"}
    assert llama.model.layers[0].self_attn.q_proj.weight.compress_statistics is True
    ids = torch.tensor([[3, 40, 41, 42, 43]])
    with torch.no_grad():
        full, nf4 = make_qlora_llama()(input_ids=ids).logits, llama(input_ids=ids).logits
    assert not torch.equal(full, nf4)  # really quantized ...
    # ... and still close: NF4 moves a normal weight matrix by ~9% (Frobenius), these logits by 10%
    # (measured); at hidden size 32, where bnb's CPU kernel misread the unaligned blocks, by 20%.
    assert (full - nf4).norm() < 0.15 * full.norm()
    with pytest.raises(LoraConfigError, match="already quantized"):
        quantize_nf4(llama)


def test_every_nf4_layer_holds_the_nf4_rounding_of_its_weights():
    """Each weight is the nearest NF4 level times its block's absmax, blocks of 64 running over the
    flattened [out, in] matrix; at in_features 32 bnb's CPU kernel read one absmax per row instead."""
    t5 = make_qlora_t5()
    originals = {n: m.weight.detach().clone() for n, m in t5.named_modules() if isinstance(m, nn.Linear)}
    quantize_nf4(t5, double_quant=False)  # double quantization would round the absmax too
    code = bnb.functional.get_4bit_type("nf4", device="cpu")
    layers = {n: m for n, m in t5.named_modules() if is_linear4bit(m)}
    for name, layer in layers.items():
        weight = originals[name]
        blocks = weight.reshape(-1, 64)
        absmax = blocks.abs().amax(dim=1, keepdim=True)
        levels = code[((blocks / absmax).unsqueeze(-1) - code).abs().argmin(dim=-1)]
        nearest = (levels * absmax).reshape(weight.shape)
        # as close to the original as its nearest level (a value halfway between two may go either way)
        slack = 1e-6 * weight.abs().max()
        assert ((dequantize_weight(layer) - weight).abs() <= (nearest - weight).abs() + slack).all(), name
    assert len(layers) == 22


def test_load_base_model_picks_class_and_shares_fingerprint_across_precisions(qlora_t5_dir, tiny_llama_dir):
    assert type(load_base_model(tiny_llama_dir)) is LlamaForCausalLM
    fp32 = load_base_model(qlora_t5_dir)
    assert type(fp32) is T5ForConditionalGeneration and not is_quantized(fp32)
    bf16 = load_base_model(qlora_t5_dir, torch_dtype="bfloat16")
    assert bf16.shared.weight.dtype == torch.bfloat16
    nf4 = load_base_model(qlora_t5_dir, quantize="nf4")
    assert is_quantized(nf4)
    assert base_fingerprint(fp32) == base_fingerprint(bf16) == base_fingerprint(nf4)
    with pytest.raises(LoraConfigError, match=r"quantize must be one of \(None, 'nf4'\), got 'int8'"):
        load_base_model(qlora_t5_dir, quantize="int8")
    with pytest.raises(LoraConfigError, match="torch_dtype must be .*'float64'"):
        load_base_model(qlora_t5_dir, torch_dtype="float64")


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


def test_qlora_trains_evaluates_and_loads_onto_nf4_and_fp32_bases(cpu_packing, qlora_t5_dir, tmp_path):
    base = load_base_model(qlora_t5_dir, quantize="nf4")
    fingerprint = compute_fingerprint(base)
    batch = t5_batch(base.config.vocab_size)
    lm = LoraModel(base, LoraConfig(r=8, lora_alpha=16))
    trainable, total = lm.trainable_parameters()
    fp32_total = sum(p.numel() for p in load_base_model(qlora_t5_dir).parameters())
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
    lm.eval()  # as Lightning's validation loop: eval without grad is where bnb would repack
    trained_loss, trained_logits = run(lm, batch)
    with torch.no_grad():
        generated = lm.generate(input_ids=batch["input_ids"], max_new_tokens=4, do_sample=False)
    assert generated.shape[0] == batch["input_ids"].shape[0]
    assert packed_layers(lm) == []
    assert compute_fingerprint(lm.model) == fingerprint  # the 4-bit weights are still those quantized
    lm.save_pretrained(tmp_path)

    on_nf4 = LoraModel.from_pretrained(load_base_model(qlora_t5_dir, quantize="nf4"), tmp_path)
    loss, logits = run(on_nf4, batch)
    assert torch.allclose(logits, trained_logits, atol=1e-5)

    fp32 = load_base_model(qlora_t5_dir)
    base_loss, _ = run(fp32, batch)
    on_fp32 = LoraModel.from_pretrained(fp32, tmp_path)  # same fingerprint: no force needed
    loss, _ = run(on_fp32, batch)
    assert loss < 0.5 * base_loss and abs(loss - trained_loss) < 0.25 * base_loss


def _qlora_model(seed: int = 0) -> LoraModel:
    lm = LoraModel(quantize_nf4(make_qlora_t5()), LoraConfig(r=4, lora_alpha=8))
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
    with pytest.warns(UserWarning, match=r"dequantized 22 4-bit layers .*NOT quantized"):
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


# ---- bitsandbytes' AVX512-BF16 CPU path, forced on or off whatever the CPU --------------------------


# (64, 48): out_features not a multiple of 32, which the packed path asserts on.
@pytest.mark.parametrize("in_features,out_features", [(256, 128), (64, 48)])
# fp32 compute multiplies the very weights of the reference in fp32: only the summation order differs,
# about K * 2^-24 relative (measured 6e-8), so 1e-5. The packed path computes in bf16 (8 significant bits,
# 2^-8 per rounding; measured 3.9e-3 relative at (256, 128)) and would fail it. bf16 compute rounds x, W
# and the output to bf16 (2^-8 each; measured 2.8e-3), so 2^-6 leaves room for about four roundings.
@pytest.mark.parametrize("compute_dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2**-6)])
def test_nf4_forward_matches_the_dequantized_fp32_reference(cpu_packing, in_features, out_features,
                                                            compute_dtype, rtol):
    torch.manual_seed(0)
    model = quantize_nf4(nn.Sequential(nn.Linear(in_features, out_features)), compute_dtype=compute_dtype)
    layer = model[0]
    x = torch.randn(8, in_features)
    reference = x @ dequantize_weight(layer).T + layer.bias.detach().float()
    with torch.no_grad():
        out = model.eval()(x)
    assert packed_layers(model) == []
    assert (out.float() - reference).abs().max() <= rtol * reference.abs().max()


def test_eval_merge_and_fingerprint_are_those_of_the_unpacked_path(cpu_packing, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(HAS_AVX512BF16, lambda: False)
        unpacked = _qlora_model()
    lm = _qlora_model()  # the same model, built under the forced answer
    fingerprint = compute_fingerprint(lm.model)
    assert fingerprint == compute_fingerprint(unpacked.model)
    batch = t5_batch(512)
    _, expected = run(unpacked, batch)

    _, logits = run(lm, batch)  # eval + no_grad: where bnb would repack, then compute in bf16
    assert packed_layers(lm) == []
    assert torch.equal(logits, expected)
    assert compute_fingerprint(lm.model) == fingerprint  # the forward left the stored weights alone

    with pytest.warns(UserWarning, match="4-bit layers were dequantized"):
        lm.merge_adapter()
    _, merged = run(lm, batch)
    # fp32 (W + s*BA) x against fp32 W x + s*B(A x): the same math, rounded in another order
    assert torch.allclose(merged, expected, atol=1e-4)
    lm.unmerge_adapter()
    assert torch.equal(run(lm, batch)[1], expected)

    with pytest.warns(UserWarning, match="dequantized 22 4-bit layers"):
        plain = lm.merge_and_unload()
    with pytest.warns(UserWarning, match="dequantized 22 4-bit layers"):
        plain_unpacked = unpacked.merge_and_unload()
    assert torch.equal(run(plain, batch)[1], run(plain_unpacked, batch)[1])


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_weight_reads_a_layer_bitsandbytes_already_packed(double_quant):
    """A Linear4bit built elsewhere (not by quantize_nf4) may have been repacked; merges and the
    fingerprint dequantize it. Packed here as Linear4bit.forward does, which needs no AVX512-BF16."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 128)
    layer = bnb.nn.Linear4bit(256, 128, compress_statistics=double_quant, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False,
                                     compress_statistics=double_quant, quant_type="nf4", module=layer)
    layer.bias = linear.bias
    layer = layer.to("cpu")
    before = dequantize_weight(layer)
    # Packing keeps the 4-bit codes and rounds each block's absmax to bf16: expect exactly that.
    state = copy.deepcopy(layer.weight.quant_state)
    if state.nested:
        state.absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        state.nested = False
    state.absmax = state.absmax.bfloat16().float()
    expected = bnb.functional.dequantize_4bit(layer.weight.data, state).float()

    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state)
    stored = layer.weight.data.clone()
    assert torch.equal(dequantize_weight(layer), expected)
    # bf16 keeps 8 significant bits: each weight moves by at most 2^-8 of itself (+ fp32 product rounding)
    torch.testing.assert_close(expected, before, rtol=2**-8 + 2**-20, atol=0)
    assert packed_layers(layer) == [layer] and torch.equal(layer.weight.data, stored)  # left as it was
