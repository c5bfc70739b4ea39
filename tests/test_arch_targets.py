"""Target presets per architecture (`target_modules: attention | all-linear`, lora_module.selection) checked
against PEFT's own expansion and default mapping, and the rank sweep flow on the tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import yaml
from conftest import make_tiny_llama, make_tiny_t5
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import GPT2Config, GPT2LMHeadModel

from lora_module import LoraConfig, LoraModel
from lora_module.contracts import ADAPTER_CONFIG_FILE
from lora_module.errors import LoraConfigError
from lora_module.selection import TARGET_PRESETS, preset_targets, resolve_targets

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "deploy" / "configs"
ARCHS = {"t5": make_tiny_t5, "llama": make_tiny_llama}
ATTENTION = {"t5": ["k", "o", "q", "v"], "llama": ["k_proj", "o_proj", "q_proj", "v_proj"]}


def _tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, bos_token_id=0,
                                      eos_token_id=0))


def _peft_all_linear(model: torch.nn.Module) -> set[str]:
    config = peft.LoraConfig(target_modules="all-linear")
    return _maybe_include_all_linear_layers(config, model).target_modules


def _paths(model: torch.nn.Module, targets: str) -> set[str]:
    return set(resolve_targets(model, LoraConfig(target_modules=targets))[1])


def _inputs(arch: str) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[3, 17, 42, 5, 99, 7]])
    return {"input_ids": ids, "decoder_input_ids": ids[:, :3]} if arch == "t5" else {"input_ids": ids}


@pytest.mark.parametrize("arch", ARCHS)
def test_all_linear_selects_what_peft_selects(arch):
    model = ARCHS[arch]()
    theirs = _peft_all_linear(model)
    assert _paths(model, "all-linear") == set(theirs)
    assert "lm_head" not in _paths(model, "all-linear")


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_preset_is_the_attention_projections_and_holds_peft_defaults(arch):
    model = ARCHS[arch]()
    assert preset_targets(model, "attention") == ATTENTION[arch]
    assert preset_targets(model, "ATTENTION") == ATTENTION[arch]  # case as PEFT's "all-linear"
    # PEFT's per-model defaults (what target_modules: null gives) are a subset of the preset.
    peft_defaults = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model.config.model_type]
    assert set(peft_defaults) < set(ATTENTION[arch])
    paths = _paths(model, "attention")
    assert paths and all(p.rsplit(".", 1)[-1] in ATTENTION[arch] for p in paths)
    if arch == "t5":  # self- and cross-attention alike
        assert any("EncDecAttention" in p for p in paths) and any("SelfAttention" in p for p in paths)


@pytest.mark.parametrize("arch", ARCHS)
def test_preset_adapter_is_written_as_names_and_loads_in_peft_alike(arch, tmp_path):
    lm = LoraModel(ARCHS[arch](), LoraConfig(target_modules="attention", r=2))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(lm.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    lm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())
    assert sorted(saved["target_modules"]) == ATTENTION[arch]
    theirs = peft.PeftModel.from_pretrained(ARCHS[arch](), tmp_path).eval()
    with torch.no_grad():
        ours_out, theirs_out = lm.eval()(**_inputs(arch)).logits, theirs(**_inputs(arch)).logits
    base_out = ARCHS[arch]()(**_inputs(arch)).logits.detach()
    assert not torch.allclose(ours_out, base_out, atol=1e-4)  # the adapter does something
    assert torch.allclose(ours_out, theirs_out, atol=1e-5), (ours_out - theirs_out).abs().max()


def test_conv1d_counts_as_linear_but_is_refused_in_one_line():
    model = _tiny_gpt2()
    theirs = _peft_all_linear(model)
    assert {p.rsplit(".", 1)[-1] for p in theirs} == set(preset_targets(model, "all-linear"))
    with pytest.raises(LoraConfigError, match=r"a Conv1D; only nn\.Linear") as err:
        LoraModel(model, LoraConfig(target_modules="all-linear"))
    assert "\n" not in str(err.value)


def test_no_attention_block_is_a_one_line_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(LoraConfigError, match=r"no linear layer inside an attention block.*\['0', '2'\]"):
        LoraModel(model, LoraConfig(target_modules="attention"))
    with pytest.raises(LoraConfigError, match=r"target preset must be one of \['attention', 'all-linear'\]"):
        preset_targets(model, "mlp")


def test_sweep_cli_offers_the_presets():
    from lora_pipeline.flows.sweep import TARGET_SETS
    from lora_pipeline.flows.sweep_cli import TARGETS

    assert TARGETS == TARGET_SETS == TARGET_PRESETS


@pytest.mark.slow
def test_rank_sweep_runs_on_a_llama(harness, tmp_path, chat_llama_dir):
    """4 trainings of 2 steps in subprocesses (Lightning's import dominates: ~60 s on 2 busy cores)."""
    from lora_pipeline.flows.sweep import rank_sweep

    spec = {"name": "llama_sweep", "data_config": str(CONFIGS / "data_demo_summary.yaml"),
            "lora_config": str(CONFIGS / "demo_summary_lora.yaml"), "base_model": str(chat_llama_dir),
            "generation": {"batch_size": 8, "max_new_tokens": 4},
            "data_overrides": {"demo_train_size": 24, "demo_validation_size": 4, "demo_test_size": 6,
                               "max_source_length": 96, "model_type": "causal"},
            "train_overrides": ["--trainer.max_steps", "2", "--data.batch_size", "4",
                                "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1"],
            "metric": "rouge1"}
    spec_path = tmp_path / "llama_sweep.yaml"
    spec_path.write_text(yaml.safe_dump(spec))

    out = rank_sweep(task=str(spec_path), ranks=[2], home=str(tmp_path / "home"), max_concurrency=2,
                     register_best=False)

    assert out["failed"] == {}
    by_name = {p["name"]: p for p in out["points"]}
    assert set(by_name) == {"attention-r2", "all-linear-r2"}
    for name, expected in (("attention-r2", ATTENTION["llama"]),
                           ("all-linear-r2", [*ATTENTION["llama"], "down_proj", "gate_proj", "up_proj"])):
        saved = json.loads((Path(by_name[name]["run_dir"]) / "adapter" / ADAPTER_CONFIG_FILE).read_text())
        assert sorted(saved["target_modules"]) == sorted(expected)
        assert saved["task_type"] == "CAUSAL_LM"
    # hidden 32, k/v width 16 (2 KV heads of 8), r=2: q and o 2*(32+32), k and v 2*(32+16), in 2 layers.
    assert by_name["attention-r2"]["trainable"] == 2 * (128 + 96 + 96 + 128)
    assert by_name["attention-r2"]["trainable"] < by_name["all-linear-r2"]["trainable"]
