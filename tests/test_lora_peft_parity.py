"""Parity with PEFT (the reference implementation): same weights -> same logits and gradients,
and adapter files that each library loads from the other.

Run: .venv/bin/pytest tests/test_lora_peft_parity.py -q
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from conftest import make_tiny_llama, make_tiny_t5

from lora_module import LoraConfig, LoraModel

ARCHS = {
    "t5": (make_tiny_t5, "SEQ_2_SEQ_LM"),
    "llama": (make_tiny_llama, "CAUSAL_LM"),
}
CASES = [
    ("t5", {"r": 4, "lora_alpha": 8, "target_modules": ["q", "v"]}),
    ("t5", {"r": 3, "lora_alpha": 5, "target_modules": ["q", "k", "v", "o", "wi", "wo"], "use_rslora": True}),
    ("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    ("llama", {"r": 2, "lora_alpha": 16, "target_modules": r".*\.(k_proj|o_proj|gate_proj|down_proj)"}),
]


def batch(arch: str) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 17, 42, 99, 7, 1], [8, 300, 12, 1, 0, 0]])
    mask = (ids != 0).long()
    if arch == "t5":
        labels = torch.tensor([[20, 21, 22, 1], [30, 31, 1, -100]])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def build_pair(arch: str, kwargs: dict) -> tuple[LoraModel, peft.PeftModel]:
    """Ours and PEFT's on identical bases, with identical random (non-zero) A and B copied into PEFT."""
    make, task = ARCHS[arch]
    ours = LoraModel(make(), LoraConfig(**kwargs))
    theirs = peft.get_peft_model(make(), peft.LoraConfig(task_type=task, **kwargs))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for path, layer in ours.lora_layers():
            for part in ("lora_A", "lora_B"):
                weight = getattr(layer, part)["default"].weight
                weight.copy_(torch.randn(weight.shape, generator=g) * 0.1)
                theirs.get_parameter(f"base_model.model.{path}.{part}.default.weight").copy_(weight)
    ours_names = {n.removeprefix("model.") for n, p in ours.named_parameters() if p.requires_grad}
    theirs_names = {n.removeprefix("base_model.model.")
                    for n, p in theirs.named_parameters() if p.requires_grad}
    assert ours_names == theirs_names and ours_names  # same parameter names, same trainable set
    return ours, theirs


@pytest.mark.parametrize(("arch", "kwargs"), CASES)
def test_logits_and_gradients_match_peft(arch, kwargs):
    ours, theirs = build_pair(arch, kwargs)
    assert ours.trainable_parameters() == theirs.get_nb_trainable_parameters()
    inputs = batch(arch)
    for mode in ("eval", "train"):
        getattr(ours, mode)()
        getattr(theirs, mode)()
        with torch.no_grad():
            a, b = ours(**inputs).logits, theirs(**inputs).logits
        assert torch.allclose(a, b, atol=1e-6, rtol=0), f"{mode}: max diff {(a - b).abs().max()}"

    out_ours, out_theirs = ours(**inputs), theirs(**inputs)
    assert torch.allclose(out_ours.loss, out_theirs.loss, atol=1e-6, rtol=0)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    checked = 0
    for name, p in ours.named_parameters():
        if p.requires_grad:
            q = theirs.get_parameter("base_model." + name)
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
            diff = (p.grad - q.grad).abs().max()
            assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=0), f"{name}: {diff}"
            checked += 1
    assert checked == 2 * len(list(ours.lora_layers()))


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_our_adapter_loads_in_peft_with_our_logits(arch, tmp_path):
    make, _ = ARCHS[arch]
    ours, _ = build_pair(arch, {"r": 4, "lora_alpha": 8})
    ours.save_pretrained(tmp_path)
    inputs = batch(arch)
    with torch.no_grad():
        expected = ours(**inputs).logits
        base = make()(**inputs).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
        got = loaded(**inputs).logits
    # Our metadata sits in lora_pipeline.json, so PEFT finds nothing unexpected in adapter_config.json.
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)], [str(w.message) for w in caught]
    assert (expected - base).abs().max() > 1e-2  # the adapter really changes the output
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_peft_adapter_loads_in_ours_with_peft_logits(arch, tmp_path):
    make, _ = ARCHS[arch]
    _, theirs = build_pair(arch, {"r": 4, "lora_alpha": 8, "use_rslora": True})
    theirs.save_pretrained(tmp_path)
    inputs = batch(arch)
    with torch.no_grad():
        expected = theirs.eval()(**inputs).logits
        base = make()(**inputs).logits
        got = LoraModel.from_pretrained(make(), tmp_path)(**inputs).logits
    assert (expected - base).abs().max() > 1e-2
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
