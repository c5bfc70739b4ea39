"""QLoRA on CPUs where bitsandbytes repacks 4-bit weights for its AVX512-BF16 kernel (issue #13).

bitsandbytes decides per layer, when the layer is built: `Linear4bit.support_avx512bf16_for_cpu =
bitsandbytes.nn.modules.has_avx512bf16()`, and then repacks the weight in place on the first forward in
eval mode without grad. The `cpu_packing` fixture forces that answer to False and to True, so both paths
run here whatever the CPU; quantize_nf4 must make the answer irrelevant (see lora_module/qlora.py).

Run: .venv/bin/python -m pytest tests/test_qlora_packed.py -q
"""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import _convert_weight_packed_for_cpu
from test_qlora import _qlora_model, run, t5_batch
from torch import nn

from lora_module import LoraModel, load_base_model, quantize_nf4
from lora_module.adapter_io import compute_fingerprint
from lora_module.config import LoraConfig
from lora_module.layers import dequantize_weight, is_linear4bit

HAS_AVX512BF16 = "bitsandbytes.nn.modules.has_avx512bf16"


@pytest.fixture(params=[False, True], ids=["cpu-unpacked", "cpu-packed"])
def cpu_packing(request, monkeypatch) -> bool:
    """Layers built from now on take bnb's packed CPU path (True) or not (False), on any CPU."""
    monkeypatch.setattr(HAS_AVX512BF16, lambda: request.param)
    return request.param


def packed_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if is_linear4bit(m) and getattr(m.weight.quant_state, "packing_format_for_cpu", False)]


# The packed path needs in % 64 == 0 and out % 32 == 0: (256, 128) passes, (32, 32) (below the block
# size, like the tiny T5) and (96, 64) (not a multiple of it) make it raise.
@pytest.mark.parametrize("in_features,out_features", [(256, 128), (32, 32), (96, 64)])
# fp32 compute multiplies the very weights of the reference in fp32: only the summation order differs,
# about K * 2^-24 relative (measured 6e-8), so 1e-5. The packed path computes in bf16 (8 significant bits,
# 2^-8 per rounding; measured 3.9e-3 relative at (256, 128)) and would fail it. bf16 compute rounds x, W
# and the output to bf16 (2^-8 each), so 2^-6 leaves room for about four such roundings.
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


def test_tiny_t5_eval_merge_and_fingerprint_are_those_of_the_unpacked_path(cpu_packing, monkeypatch):
    # tiny T5 (d_model 32 < block size 64): every 4-bit layer is one the packed path cannot take
    with monkeypatch.context() as m:
        m.setattr(HAS_AVX512BF16, lambda: False)
        unpacked = _qlora_model()
    lm = _qlora_model()  # same seed, built under the forced answer
    fingerprint = compute_fingerprint(lm.model)
    assert fingerprint == compute_fingerprint(unpacked.model)
    batch = t5_batch(512)
    _, expected = run(unpacked, batch)

    _, logits = run(lm, batch)  # eval + no_grad: where bnb would repack and then compute in bf16
    assert packed_layers(lm) == []
    assert torch.equal(logits, expected)
    assert compute_fingerprint(lm.model) == fingerprint  # the forward left the stored weights alone

    with pytest.warns(UserWarning, match="4-bit layers were dequantized"):
        lm.merge_adapter()
    _, merged = run(lm, batch)
    # merged = fp32 (W + s*BA) x vs fp32 W x + s*B(A x): same math, other rounding order
    assert torch.allclose(merged, expected, atol=1e-4)
    lm.unmerge_adapter()
    _, unmerged = run(lm, batch)
    assert torch.equal(unmerged, expected)

    with pytest.warns(UserWarning, match="dequantized 28 4-bit layers"):
        plain = lm.merge_and_unload()
    with pytest.warns(UserWarning, match="dequantized 28 4-bit layers"):
        plain_unpacked = unpacked.merge_and_unload()
    _, got = run(plain, batch)
    assert torch.equal(got, run(plain_unpacked, batch)[1])
    assert torch.allclose(got, expected, atol=1e-4)


def test_qlora_trains_evaluates_generates_and_reloads(cpu_packing, tiny_t5_dir, tmp_path):
    base = load_base_model(tiny_t5_dir, quantize="nf4")
    fingerprint = compute_fingerprint(base)
    batch = t5_batch(base.config.vocab_size)
    lm = LoraModel(base, LoraConfig(r=8, lora_alpha=16))
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    lm.train()
    losses = []
    for _ in range(5):
        loss = lm(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    lm.eval()  # what Lightning's validation loop does
    loss, logits = run(lm, batch)
    assert loss < losses[0]
    with torch.no_grad():
        generated = lm.generate(input_ids=batch["input_ids"], max_new_tokens=4, do_sample=False)
    assert generated.shape[0] == batch["input_ids"].shape[0]
    assert packed_layers(lm) == []
    assert compute_fingerprint(lm.model) == fingerprint  # the 4-bit weights are still those quantized
    lm.save_pretrained(tmp_path)
    reloaded = LoraModel.from_pretrained(load_base_model(tiny_t5_dir, quantize="nf4"), tmp_path)
    assert torch.equal(run(reloaded, batch)[1], logits)


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_weight_reads_a_layer_bitsandbytes_already_packed(double_quant):
    """A Linear4bit built elsewhere (not by quantize_nf4) may have been repacked; merges and the
    fingerprint dequantize it. Packed exactly as Linear4bit.forward does, which needs no AVX512-BF16."""
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
