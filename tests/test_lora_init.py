"""init_lora_weights against PEFT: the same initial A, B (and modified base weights) on the same seed;
a PiSSA/OLoRA adapter saved by our core equals PEFT's converted adapter
(`save_pretrained(path_initial_model_for_weight_conversion=...)`) and fits the unmodified base; an
unconverted PEFT PiSSA/OLoRA adapter, which today's plain loading took silently (logits off by 0.3-0.5),
is refused with the command that converts it.

Run: .venv/bin/pytest tests/test_lora_init.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from conftest import make_tiny_llama, make_tiny_t5
from safetensors.torch import load_file

from lora_module import AdapterLoadError, LoraConfig, LoraConfigError, LoraModel, base_fingerprint
from lora_module.contracts import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

ARCHS = {"t5": (make_tiny_t5, "SEQ_2_SEQ_LM", ["q", "v", "wo"]),
         "llama": (make_tiny_llama, "CAUSAL_LM", ["q_proj", "v_proj", "down_proj"])}


def _inputs(arch: str) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 17, 42, 99, 7, 1], [8, 300, 12, 1, 0, 0]])
    extra = {"decoder_input_ids": torch.tensor([[0, 20, 21], [0, 30, 31]])} if arch == "t5" else {}
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), **extra}


def _logits(model: torch.nn.Module, arch: str) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**_inputs(arch)).logits


def _pair(arch: str, init: object, **extra: object) -> tuple[LoraModel, peft.PeftModel]:
    """Ours and PEFT's adapter made with `init` from the same seed, on identical bases."""
    make, task, targets = ARCHS[arch]
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": targets, "init_lora_weights": init, **extra}
    base_ours, base_theirs = make(), make()
    torch.manual_seed(123)
    ours = LoraModel(base_ours, LoraConfig(**kwargs))
    torch.manual_seed(123)
    theirs = peft.get_peft_model(base_theirs, peft.LoraConfig(task_type=task, **kwargs))
    return ours, theirs


def _train(ours: LoraModel, theirs: peft.PeftModel) -> None:
    """Stand-in for training: the same random step on A and B of both."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
                theirs.get_parameter(f"base_model.{name}").copy_(p)


@pytest.mark.parametrize("init", [True, False, "gaussian", "orthogonal", "pissa", "pissa_niter_2", "olora"])
@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_init_equals_peft_on_the_same_seed(arch, init):
    ours, theirs = _pair(arch, init)
    ours_state = {n: p for n, p in ours.named_parameters()}
    for name, p in theirs.named_parameters():
        mine = ours_state[name.removeprefix("base_model.")]
        assert torch.equal(mine, p), f"{init}: {name} differs by {(mine - p).abs().max()}"
    assert torch.equal(_logits(ours, arch), _logits(theirs, arch))


def _peft_trained_and_converted(arch: str, init: str, tmp: Path) -> tuple[LoraModel, peft.PeftModel, Path]:
    """PEFT's documented PiSSA/OLoRA workflow: save the initial adapter, train, save converted."""
    ours, theirs = _pair(arch, init)
    theirs.peft_config["default"].init_lora_weights = True
    theirs.save_pretrained(tmp / "init")
    theirs.peft_config["default"].init_lora_weights = init
    _train(ours, theirs)
    theirs.save_pretrained(tmp / "converted", path_initial_model_for_weight_conversion=str(tmp / "init"))
    return ours, theirs, tmp / "converted"


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_saved_adapter_is_peft_conversion_and_fits_the_unmodified_base(arch, init, tmp_path):
    ours, theirs, converted = _peft_trained_and_converted(arch, init, tmp_path)
    trained = _logits(theirs, arch)
    _close = torch.testing.assert_close
    _close(_logits(ours, arch), trained, atol=1e-6, rtol=0)
    ours.save_pretrained(tmp_path / "ours")
    mine, peft_file = (load_file(str(d / ADAPTER_WEIGHTS_FILE)) for d in (tmp_path / "ours", converted))
    assert mine.keys() == peft_file.keys()
    for key, value in peft_file.items():
        assert torch.equal(mine[key], value), key
    saved, expected = (json.loads((d / ADAPTER_CONFIG_FILE).read_text())
                       for d in (tmp_path / "ours", converted))
    for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora"):
        assert saved[key] == expected[key], key
    assert sorted(saved["target_modules"]) == sorted(expected["target_modules"])
    assert saved["r"] == 8 and saved["lora_alpha"] == 16 and saved["init_lora_weights"] is True

    make = ARCHS[arch][0]
    reference = _logits(peft.PeftModel.from_pretrained(make(), converted), arch)
    # W - s B0 A0 + s B A and W + s (B A - B0 A0) round differently: equal to 1e-5 of the logits' scale.
    _close(reference, trained, atol=1e-5 * trained.abs().max().item(), rtol=0)
    for folder in (tmp_path / "ours", converted):  # ours passes the fingerprint check: the base is unmodified
        _close(_logits(LoraModel.from_pretrained(make(), folder), arch), reference, atol=1e-5, rtol=0)
    assert ours.base_fingerprint() == base_fingerprint(make())


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unconverted_peft_adapter_is_refused(init, tmp_path):
    """The silent error of issue #23: PEFT's unconverted adapter only fits PEFT's modified base."""
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=init)
    theirs = peft.get_peft_model(make_tiny_llama(), config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    theirs.save_pretrained(tmp_path)
    with pytest.raises(AdapterLoadError) as err:
        LoraModel.from_pretrained(make_tiny_llama(), tmp_path)
    message = str(err.value)
    assert "\n" not in message and f"init_lora_weights={init!r}" in message
    assert "save_pretrained(OUT, path_initial_model_for_weight_conversion=INIT_DIR)" in message


def _plain_adapter(tmp: Path, **config: object) -> Path:
    """A PEFT-saved plain adapter whose config then says `config` (as PEFT writes those keys)."""
    model = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(tmp)
    file = tmp / ADAPTER_CONFIG_FILE
    file.write_text(json.dumps({**json.loads(file.read_text()), **config}))
    return tmp


@pytest.mark.parametrize("init", ["loftq", "corda", "lora_ga", "pissa_niter_4", "OLoRA"])
def test_other_base_changing_inits_are_refused(init, tmp_path):
    with pytest.raises(AdapterLoadError, match=f"init_lora_weights={init!r}"):
        LoraModel.from_pretrained(make_tiny_llama(), _plain_adapter(tmp_path, init_lora_weights=init))


@pytest.mark.parametrize("config", [
    {"init_lora_weights": "eva", "eva_config": {"rho": 2.0}},
    {"init_lora_weights": True, "corda_config": {"cache_file": None}},  # what PEFT's conversion leaves
    {"init_lora_weights": "gaussian"}, {"init_lora_weights": False}, {"init_lora_weights": "mica"},
])
def test_inits_that_leave_the_base_alone_load_as_in_peft(config, tmp_path):
    folder = _plain_adapter(tmp_path, **config)
    ours = LoraModel.from_pretrained(make_tiny_llama(), folder)
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), folder)
    torch.testing.assert_close(_logits(ours, "llama"), _logits(theirs, "llama"), atol=1e-5, rtol=0)


def test_base_changing_adapter_stays_alone_and_delete_restores_the_base(tmp_path):
    original = {n: p.clone() for n, p in make_tiny_llama().named_parameters()}
    lm = LoraModel(make_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    with pytest.raises(LoraConfigError, match="uses init_lora_weights='pissa', which changes the base"):
        lm.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(LoraConfigError, match="changes the base weights"):
        lm.load_adapter(_plain_adapter(tmp_path), "other")
    plain = LoraModel(make_tiny_llama(), LoraConfig(r=4, target_modules=["v_proj"]))
    with pytest.raises(LoraConfigError, match="changes the base weights"):
        plain.add_adapter("pissa", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    lm.delete_adapter("default")
    for name, p in lm.model.named_parameters():
        torch.testing.assert_close(p, original[name], atol=1e-6, rtol=0)


def test_init_refusals_name_the_value():
    with pytest.raises(LoraConfigError, match="init_lora_weights='corda' is not supported"):
        LoraConfig(init_lora_weights="corda")
    with pytest.raises(LoraConfigError, match="init_lora_weights='eva' needs PEFT's data-driven"):
        LoraModel(make_tiny_llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights="eva"))
    with pytest.raises(LoraConfigError, match="cannot be combined with use_dora"):
        LoraConfig(init_lora_weights="pissa", use_dora=True)
    with pytest.raises(LoraConfigError, match="needs an even r"):
        LoraModel(make_tiny_llama(), LoraConfig(r=3, target_modules=["q_proj"],
                                                init_lora_weights="orthogonal"))
