"""LoRA core: config validation, injection, counts, named adapters, merge/unmerge.

Run: .venv/bin/pytest tests/test_lora_core.py -q
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_t5
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

from lora_module import LoraConfig, LoraConfigError, LoraLinear, LoraModel, get_lora_model

IDS = torch.tensor([[5, 17, 42, 99, 7, 1], [8, 300, 12, 1, 0, 0]])
MASK = (IDS != 0).long()
LABELS = torch.tensor([[20, 21, 22, 1], [30, 31, 1, -100]])


def t5_logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK, labels=LABELS).logits


def randomize(lm: LoraModel, name: str, seed: int) -> None:
    """Give adapter `name` non-zero A and B so that a no-op adapter cannot pass a comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lm.lora_layers():
            if name in layer.lora_A:
                for part in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                    part.copy_(torch.randn(part.shape, generator=g) * 0.2)


def wrapped_paths(lm: LoraModel) -> list[str]:
    return [path for path, _ in lm.lora_layers()]


# ---- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"r": 0}, ["LoraConfig.r", ">= 1", "0"]),
        ({"r": 2.5}, ["LoraConfig.r", "integer"]),
        ({"lora_alpha": -1}, ["LoraConfig.lora_alpha", "> 0", "-1"]),
        ({"lora_dropout": 1.0}, ["LoraConfig.lora_dropout", "0 <= p < 1", "1.0"]),
        ({"lora_dropout": -0.1}, ["LoraConfig.lora_dropout", "0 <= p < 1"]),
        ({"bias": "all"}, ["LoraConfig.bias", "'none'", "'all'"]),
        ({"target_modules": []}, ["target_modules", "non-empty list"]),
        ({"target_modules": "(unclosed"}, ["target_modules", "regex", "(unclosed"]),
        ({"target_modules": 3}, ["target_modules", "3"]),
    ],
)
def test_config_rejects_bad_values_naming_field_and_valid_range(kwargs, fragments):
    with pytest.raises(LoraConfigError) as err:
        LoraConfig(**kwargs)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_config_scaling_plain_and_rslora():
    assert LoraConfig(r=16, lora_alpha=8).scaling == 0.5
    assert LoraConfig(r=16, lora_alpha=8, use_rslora=True).scaling == 2.0


def test_config_from_dict_rejects_unknown_and_unsupported_keys():
    with pytest.raises(LoraConfigError, match=r"unknown LoraConfig key\(s\) \['rank'\]; valid keys: \['r'"):
        LoraConfig.from_dict({"rank": 8})
    with pytest.raises(LoraConfigError, match="lora_bias=True"):
        LoraConfig.from_dict({"r": 8, "lora_bias": True})
    with pytest.raises(LoraConfigError, match="peft_type must be 'LORA'"):
        LoraConfig.from_dict({"peft_type": "IA3"})
    peft_style = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "use_dora": False,
                  "rank_pattern": {}, "target_modules": ["v", "q"], "peft_version": "0.21.2"}
    assert LoraConfig.from_dict(peft_style) == LoraConfig(r=4, lora_alpha=8, target_modules=["v", "q"])
    with pytest.raises(LoraConfigError, match="unknown"):
        LoraConfig.from_dict({"r": 4, "future_peft_option": None})
    assert LoraConfig.from_dict({"r": 4, "future_peft_option": None}, strict=False).r == 4


def test_import_is_cheap():
    code = "import sys, lora_module; lora_module.LoraConfig(); assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- injection -----------------------------------------------------------------------------------
def test_default_targets_per_architecture_and_base_frozen():
    t5 = LoraModel(make_tiny_t5(), LoraConfig(r=4))
    paths = wrapped_paths(t5)
    # 2 encoder blocks x (q, v) + 2 decoder blocks x (self q, v + cross q, v)
    assert len(paths) == 12 and all(p.rsplit(".", 1)[-1] in {"q", "v"} for p in paths)
    llama = LoraModel(make_tiny_llama(), LoraConfig(r=4))
    assert sorted({p.rsplit(".", 1)[-1] for p in wrapped_paths(llama)}) == ["q_proj", "v_proj"]
    assert len(wrapped_paths(llama)) == 4
    for lm in (t5, llama):
        for name, p in lm.named_parameters():
            assert p.requires_grad == ("lora_" in name), name
        trainable, total = lm.trainable_parameters()
        assert trainable == sum(p.numel() for n, p in lm.named_parameters() if "lora_" in n)
        assert total == sum(p.numel() for p in lm.parameters())


def test_regex_targets_fullmatch_module_path():
    regex = r"encoder\.block\.\d+\.layer\.0\.SelfAttention\.(q|v)"
    lm = LoraModel(make_tiny_t5(), LoraConfig(r=2, target_modules=regex))
    expected = [f"encoder.block.{i}.layer.0.SelfAttention.{m}" for i in (0, 1) for m in ("q", "v")]
    assert wrapped_paths(lm) == expected
    # fullmatch: a regex matching only part of the path selects nothing
    with pytest.raises(LoraConfigError, match="matched no linear layer"):
        LoraModel(make_tiny_t5(), LoraConfig(r=2, target_modules=r"SelfAttention\.q"))


def test_target_matching_nothing_lists_existing_linear_layers_and_leaves_model_alone():
    model = make_tiny_t5()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(LoraConfigError) as err:
        LoraModel(model, LoraConfig(r=4, target_modules=["query", "value"]))
    message = str(err.value)
    assert "['query', 'value']" in message
    assert "linear layers in this model: ['k', 'lm_head', 'o', 'q', 'v', 'wi', 'wo']" in message
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(isinstance(m, LoraLinear) for m in model.modules())


def test_target_naming_a_non_linear_module_is_refused():
    with pytest.raises(LoraConfigError, match="'shared', a Embedding; only nn.Linear"):
        LoraModel(make_tiny_t5(), LoraConfig(r=4, target_modules=["q", "shared"]))


def test_unknown_architecture_without_targets_asks_for_them():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(LoraConfigError, match=r"no default target_modules for model_type None.*\['proj'\]"):
        LoraModel(Tiny(), LoraConfig())


# ---- counts --------------------------------------------------------------------------------------
def test_flan_t5_base_shaped_count_without_allocating_weights():
    config = T5Config(d_model=768, num_layers=12, num_decoder_layers=12, num_heads=12, d_kv=64, d_ff=2048,
                      vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
        # transformers 5 ties lm_head at init; FLAN-T5-base's checkpoint has its own lm_head
        model.lm_head.weight = nn.Parameter(torch.empty_like(model.shared.weight))
    lm = LoraModel(model, LoraConfig(r=32, lora_alpha=32))  # default targets q, v
    assert all(p.device.type == "meta" for p in lm.parameters())
    trainable, total = lm.trainable_parameters()
    assert trainable == 3_538_944
    assert total - trainable == 247_577_856  # FLAN-T5-base
    assert "trainable%: 1.4093" in lm.print_trainable_parameters()


def test_single_512x64_projection_r8_has_4608_trainable():
    class Proj(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(64, 512, bias=False)  # weight 512 x 64

    lm = LoraModel(Proj(), LoraConfig(r=8, target_modules=["proj"]))
    assert lm.trainable_parameters() == (4_608, 32_768 + 4_608)
    layer = lm.model.proj
    assert layer.lora_A["default"].weight.shape == (8, 64)
    assert layer.lora_B["default"].weight.shape == (512, 8)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # B starts at zero: output = base output
    assert torch.count_nonzero(layer.lora_A["default"].weight) > 0


# ---- forward semantics ------------------------------------------------------------------------------
def test_fresh_adapter_is_identity_and_dropout_only_in_train_mode():
    base = make_tiny_t5()
    expected = t5_logits(base)
    lm = get_lora_model(make_tiny_t5(), LoraConfig(r=4, lora_dropout=0.5))
    assert torch.allclose(t5_logits(lm), expected, atol=1e-6)
    randomize(lm, "default", 0)
    lm.eval()
    assert torch.equal(t5_logits(lm), t5_logits(lm))
    lm.train()
    assert not torch.equal(t5_logits(lm), t5_logits(lm))


def test_layer_formula_and_dtype_round_trip():
    base = nn.Linear(6, 5).to(torch.bfloat16)
    layer = LoraLinear(base)
    layer.add_adapter("a", LoraConfig(r=2, lora_alpha=3))
    layer.active_adapter = "a"
    nn.init.normal_(layer.lora_B["a"].weight)
    assert layer.lora_A["a"].weight.dtype == torch.float32  # adapter kept in fp32 like PEFT
    x = torch.randn(3, 6, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    expected = base(x) + (x.float() @ a.T @ b.T * 1.5)
    assert torch.equal(out, expected.to(torch.bfloat16))


# ---- named adapters ------------------------------------------------------------------------------
def test_two_adapters_switch_like_loading_each_alone_and_disable_gives_base(tmp_path):
    base_out = t5_logits(make_tiny_t5())
    lm = LoraModel(make_tiny_t5(), LoraConfig(r=4, lora_alpha=8), adapter_name="a")
    randomize(lm, "a", 1)
    lm.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["q", "k", "v", "o"]))
    randomize(lm, "b", 2)
    assert lm.active_adapter == "a" and list(lm.adapters) == ["a", "b"]
    lm.save_pretrained(tmp_path / "a", adapter_name="a")
    lm.save_pretrained(tmp_path / "b", adapter_name="b")
    alone = {n: t5_logits(LoraModel.from_pretrained(make_tiny_t5(), tmp_path / n)) for n in ("a", "b")}
    assert not torch.allclose(alone["a"], alone["b"], atol=1e-3)
    base_storage = {n: p.data_ptr() for n, p in lm.named_parameters() if "lora_" not in n}

    for name in ("a", "b", "a"):
        lm.set_adapter(name)
        assert torch.allclose(t5_logits(lm), alone[name], atol=1e-6)
        trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
        assert trainable and all(f".{name}." in n for n in trainable)
    with lm.disable_adapter():
        assert torch.allclose(t5_logits(lm), base_out, atol=1e-6)
    assert torch.allclose(t5_logits(lm), alone["a"], atol=1e-6)
    assert {n: p.data_ptr() for n, p in lm.named_parameters() if "lora_" not in n} == base_storage

    lm.delete_adapter("b")
    assert list(lm.adapters) == ["a"]
    assert not isinstance(lm.model.encoder.block[0].layer[0].SelfAttention.k, LoraLinear)  # only b was there
    with pytest.raises(LoraConfigError, match=r"unknown adapter 'b'; adapters on this model: \['a'\]"):
        lm.set_adapter("b")
    lm.delete_adapter("a")
    assert lm.active_adapter is None and not list(lm.lora_layers())
    assert torch.allclose(t5_logits(lm), base_out, atol=1e-6)


def test_adapter_names_are_validated():
    lm = LoraModel(make_tiny_t5(), LoraConfig(r=2))
    with pytest.raises(LoraConfigError, match="already exists"):
        lm.add_adapter("default", LoraConfig(r=2))
    with pytest.raises(LoraConfigError, match="invalid adapter name 'a.b'"):
        lm.add_adapter("a.b", LoraConfig(r=2))


# ---- merge -----------------------------------------------------------------------------------------
def _base_weights(lm: LoraModel) -> dict[str, torch.Tensor]:
    return {path: layer.base_layer.weight.detach().clone() for path, layer in lm.lora_layers()}


def test_merge_equals_unmerged_double_merge_noop_unmerge_restores():
    lm = LoraModel(make_tiny_t5(), LoraConfig(r=4, lora_alpha=8))
    randomize(lm, "default", 3)
    unmerged_out, original = t5_logits(lm), _base_weights(lm)
    base_out = t5_logits(make_tiny_t5())

    lm.merge_adapter()
    merged_out, merged = t5_logits(lm), _base_weights(lm)
    # merged vs unmerged differ only by fp32 rounding (logits are ~10 in size)
    assert torch.allclose(merged_out, unmerged_out, atol=1e-4)
    assert all(not torch.allclose(merged[k], original[k]) for k in original)  # weights really changed
    lm.merge_adapter()
    assert all(torch.equal(w, merged[k]) for k, w in _base_weights(lm).items())
    assert torch.equal(t5_logits(lm), merged_out)
    with lm.disable_adapter():
        assert torch.allclose(t5_logits(lm), base_out, atol=1e-4)
    assert lm.merged_adapter == "default"

    lm.unmerge_adapter()
    assert all(torch.allclose(w, original[k], atol=1e-6) for k, w in _base_weights(lm).items())
    assert torch.allclose(t5_logits(lm), unmerged_out, atol=1e-4)


def test_merge_math_is_fp32_then_cast_back():
    layer = LoraLinear(nn.Linear(8, 8, bias=False).to(torch.bfloat16))
    layer.add_adapter("a", LoraConfig(r=2, lora_alpha=2))
    nn.init.normal_(layer.lora_B["a"].weight)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge("a")
    delta = layer.lora_B["a"].weight @ layer.lora_A["a"].weight
    merged = (w0.float() + delta).to(torch.bfloat16)
    assert torch.equal(layer.base_layer.weight, merged)
    layer.merge("a")  # merging twice changes nothing, also at the layer level
    assert torch.equal(layer.base_layer.weight, merged)
    # ... and at the model level, on a bf16 base
    lm = LoraModel(make_tiny_t5().to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8))
    randomize(lm, "default", 5)
    lm.merge_adapter()
    once = _base_weights(lm)
    lm.merge_adapter()
    assert all(torch.equal(w, once[k]) for k, w in _base_weights(lm).items())


def test_merge_and_unload_returns_plain_model_that_round_trips(tmp_path):
    lm = LoraModel(make_tiny_t5(), LoraConfig(r=4, lora_alpha=8))
    randomize(lm, "default", 4)
    expected = t5_logits(lm)
    plain = lm.merge_and_unload()
    assert type(plain) is T5ForConditionalGeneration
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())
    assert not any("lora_" in k or "base_layer" in k for k in plain.state_dict())
    assert all(p.requires_grad for p in plain.parameters())  # as a freshly loaded model
    assert torch.allclose(t5_logits(plain), expected, atol=1e-4)
    plain.save_pretrained(tmp_path)
    reloaded = T5ForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(t5_logits(reloaded), t5_logits(plain))
