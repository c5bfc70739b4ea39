"""PEFT's selection keys in our core: target_modules="all-linear", modules_to_save, layers_to_transform /
layers_pattern, exclude_modules, rank_pattern / alpha_pattern. For each case on tiny T5 and Llama
models: the same config selects the same modules with the same shapes as PEFT (same trainable
count), PEFT's saved files load in ours with PEFT's logits, and ours load in PEFT with ours.

Run: .venv/bin/pytest tests/test_selection_keys.py -q
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from conftest import make_tiny_llama, make_tiny_t5
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from lora_module import AdapterLoadError, LoraConfig, LoraConfigError, LoraModel
from lora_module.contracts import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from lora_module.mixed_batch import BASE_ROW

ARCHS = {"t5": (make_tiny_t5, "SEQ_2_SEQ_LM"), "llama": (make_tiny_llama, "CAUSAL_LM")}
CASES = {
    "t5-all-linear": ("t5", {"target_modules": "all-linear"}),
    "t5-modules-to-save": ("t5", {"target_modules": ["q", "v"],
                                  "modules_to_save": ["lm_head", "final_layer_norm"]}),
    "t5-layers": ("t5", {"target_modules": ["q", "v", "wo"], "layers_to_transform": [1],
                         "layers_pattern": "block"}),
    "t5-patterns": ("t5", {"target_modules": ["q", "k", "v", "o"],
                           "rank_pattern": {"k": 2, r"decoder\.block\.1\..*q": 6},
                           "alpha_pattern": {"v": 3, "EncDecAttention.o": 40}}),
    "t5-exclude": ("t5", {"target_modules": ["q", "v"], "exclude_modules": ["EncDecAttention.q"]}),
    "llama-everything": ("llama", {"target_modules": "all-linear", "modules_to_save": ["lm_head", "norm"],
                                   "rank_pattern": {"q_proj": 2},
                                   "alpha_pattern": {"layers.1.mlp.down_proj": 3}}),
    "llama-layer-int": ("llama", {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": 0}),
    "llama-exclude-regex": ("llama", {"target_modules": "all-linear", "exclude_modules": r".*mlp\..*"}),
}


def _inputs(arch: str) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 17, 42, 99, 7, 1], [8, 300, 12, 1, 0, 0]])
    mask = (ids != 0).long()
    if arch == "t5":
        decoder_ids = torch.tensor([[0, 20, 21], [0, 30, 31]])
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids}
    return {"input_ids": ids, "attention_mask": mask}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random values in every trainable tensor (zero B and copies equal to the base would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _logits(model: torch.nn.Module, arch: str) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**_inputs(arch)).logits


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.allclose(a, b, atol=1e-5, rtol=0), f"max logit diff {(a - b).abs().max()}"


@pytest.mark.parametrize("case", CASES)
def test_same_selection_as_peft(case):
    arch, kwargs = CASES[case]
    make, task = ARCHS[arch]
    ours = LoraModel(make(), LoraConfig(**kwargs))
    theirs = peft.get_peft_model(make(), peft.LoraConfig(task_type=task, **kwargs))
    shapes = {k: tuple(v.shape) for k, v in ours.adapter_state_dict().items()}
    theirs_shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(theirs).items()}
    assert shapes == theirs_shapes
    assert ours.trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours_trainable = {n.removeprefix("model.") for n, p in ours.named_parameters() if p.requires_grad}
    theirs_trainable = {n.removeprefix("base_model.model.")
                        for n, p in theirs.named_parameters() if p.requires_grad}
    assert ours_trainable == theirs_trainable


@pytest.mark.parametrize("case", CASES)
def test_peft_files_load_in_ours(case, tmp_path):
    arch, kwargs = CASES[case]
    make, task = ARCHS[arch]
    theirs = peft.get_peft_model(make(), peft.LoraConfig(task_type=task, **kwargs))
    _perturb(theirs, seed=1)
    theirs.save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(make(), tmp_path)
    _close(_logits(ours, arch), _logits(theirs, arch))
    reloaded = ours.adapter_state_dict()
    for key, value in load_file(str(tmp_path / ADAPTER_WEIGHTS_FILE)).items():
        assert torch.equal(reloaded[key], value), key


@pytest.mark.parametrize("case", CASES)
def test_our_files_load_in_peft(case, tmp_path):
    arch, kwargs = CASES[case]
    make, _ = ARCHS[arch]
    ours = LoraModel(make(), LoraConfig(**kwargs))
    _perturb(ours, seed=2)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(make(), tmp_path)
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]  # PEFT only warns about them
    _close(_logits(theirs, arch), _logits(ours, arch))
    saved = json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())
    assert saved["modules_to_save"] == kwargs.get("modules_to_save")
    assert saved["rank_pattern"] == kwargs.get("rank_pattern", {})


def test_all_linear_is_every_linear_but_the_output_layer():
    lm = LoraModel(make_tiny_llama(), LoraConfig(target_modules="all-linear"))
    adapted = {path.rsplit(".", 1)[-1] for path, _ in lm.lora_layers()}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert lm.adapters["default"].target_modules == sorted(adapted)  # written as names PEFT re-expands alike


def test_modules_to_save_copies_are_used_merged_and_dropped():
    base_logits = _logits(make_tiny_llama(), "llama")
    lm = LoraModel(make_tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    head = lm.model.lm_head
    assert head.modules_to_save["default"].weight.requires_grad
    assert not head.original_module.weight.requires_grad
    with torch.no_grad():
        head.modules_to_save["default"].weight.mul_(2.0)
    _close(_logits(lm, "llama"), base_logits * 2)  # B = 0: only the copy changes the output
    with lm.disable_adapter():
        _close(_logits(lm, "llama"), base_logits)
    lm.delete_adapter("default")
    assert isinstance(lm.model.lm_head, torch.nn.Linear)
    _close(_logits(lm, "llama"), base_logits)
    lm = LoraModel(make_tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    _perturb(lm, seed=3)
    expected = _logits(lm, "llama")
    merged = lm.merge_and_unload()
    assert isinstance(merged.lm_head, torch.nn.Linear)
    _close(_logits(merged, "llama"), expected)


def test_modules_to_save_refusals(tmp_path):
    with pytest.raises(LoraConfigError, match=r"modules_to_save \['no_such_head'\] matched no module"):
        LoraModel(make_tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["no_such_head"]))
    lm = LoraModel(make_tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(LoraConfigError, match="modules_to_save, which mixed-adapter batches do not support"):
        lm(**_inputs("llama"), adapter_names=["default", BASE_ROW])
    lm.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / ADAPTER_WEIGHTS_FILE))
    del weights["base_model.model.lm_head.weight"]
    save_file(weights, str(tmp_path / ADAPTER_WEIGHTS_FILE))
    with pytest.raises(AdapterLoadError, match=r"'lm_head' does not fit this model: missing \['weight'\]"):
        LoraModel.from_pretrained(make_tiny_llama(), tmp_path)


def test_selection_refusals_name_the_key():
    with pytest.raises(LoraConfigError, match="cannot be used with target_modules='all-linear'"):
        LoraConfig(target_modules="all-linear", layers_to_transform=[0])
    with pytest.raises(LoraConfigError, match="layers_pattern='layers' needs layers_to_transform"):
        LoraConfig(target_modules=["q_proj"], layers_pattern="layers")
    with pytest.raises(LoraConfigError, match=r"rank_pattern\['q'\] must map"):
        LoraConfig(rank_pattern={"q": 0})
    with pytest.raises(LoraConfigError, match="matched no linear layer"):
        LoraModel(make_tiny_llama(), LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))
