"""CUDA defaults on a CPU machine: the decision logic (with CUDA availability mocked), the streamed
checkpoint fingerprint of the GPU QLoRA path against compute_fingerprint, and that CPU paths are unchanged."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb  # imported before any test mocks CUDA: bnb picks its backend on import
import pytest
import torch
from conftest import tiny_llama_config, tiny_t5_config
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    LlamaForCausalLM,
    T5ForConditionalGeneration,
)

from lora_module import device as dev
from lora_module import qlora
from lora_module.adapter_io import FINGERPRINT_ATTR, QUANTIZATION_ATTR, compute_fingerprint
from lora_module.errors import SettingsError
from lora_module.evaluation.generation import GenerationConfig
from lora_module.training.optim import OPTIMIZERS, build_optimizer


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA reported available (for decision logic only: nothing may touch a GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return monkeypatch


def _save(model: torch.nn.Module, folder: Path, dtype: torch.dtype | None = None) -> Path:
    (model.to(dtype) if dtype is not None else model).save_pretrained(folder)
    return folder


def _tied_t5() -> T5ForConditionalGeneration:
    torch.manual_seed(1)
    return T5ForConditionalGeneration(replace_config(tiny_t5_config(128), tie_word_embeddings=True)).eval()


def _tied_llama() -> LlamaForCausalLM:
    torch.manual_seed(2)
    return LlamaForCausalLM(replace_config(tiny_llama_config(128), tie_word_embeddings=True)).eval()


def replace_config(config, **changes):
    for key, value in changes.items():
        setattr(config, key, value)
    return config


# ---- lora_module.device ---------------------------------------------------------------------------
def test_cpu_defaults_leave_numerics_alone():
    assert dev.default_dtype("cpu") is torch.float32
    assert dev.generation_dtype("cpu", "auto") is None and dev.generation_dtype("cpu", None) is None
    assert dev.generation_dtype("cpu", "bfloat16") == "bfloat16"  # an explicit dtype wins
    precision = torch.get_float32_matmul_precision()
    assert dev.enable_cuda_fast_paths("cpu") is False
    assert torch.get_float32_matmul_precision() == precision
    assert dev.attention_kwargs("cpu", AutoModelForCausalLM, tiny_llama_config(64)) == {}


def test_cuda_defaults_bf16_where_supported(fake_cuda):
    assert dev.resolve_device("auto").type == "cuda"
    assert dev.default_dtype("cuda") is torch.bfloat16
    assert dev.generation_dtype("auto", "auto") == "bfloat16"
    assert dev.generation_dtype("cuda:0", "float32") == "float32"
    fake_cuda.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert dev.default_dtype("cuda") is torch.float16
    with pytest.raises(SettingsError, match="dtype must be 'auto' or one of"):
        dev.generation_dtype("cuda", "float64")


def test_cuda_fast_paths_switch_tf32_on(fake_cuda):
    before = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    try:
        assert dev.enable_cuda_fast_paths("cuda") is True
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cuda.matmul.allow_tf32 = before[1]


def test_sdpa_only_on_cuda_and_where_supported(fake_cuda):
    assert dev.attention_kwargs("cuda", AutoModelForCausalLM, tiny_llama_config(64)) == {
        "attn_implementation": "sdpa"}
    t5 = dev.attention_kwargs("cuda", AutoModelForSeq2SeqLM, tiny_t5_config(64))
    assert t5 == ({"attn_implementation": "sdpa"} if T5ForConditionalGeneration._supports_sdpa else {})


# ---- generation dtype -----------------------------------------------------------------------------
def test_generation_dtype_auto_by_device(fake_cuda):
    assert GenerationConfig().dtype == "auto"
    assert GenerationConfig(device="cpu").resolved_dtype() is None
    assert GenerationConfig(device="cuda").resolved_dtype() == "bfloat16"
    assert GenerationConfig(device="cuda", dtype="float32").resolved_dtype() == "float32"
    assert GenerationConfig(device="cuda", dtype=None).resolved_dtype() == "bfloat16"
    with pytest.raises(SettingsError, match="GenerationConfig.dtype"):
        GenerationConfig(dtype="int8")


# ---- streamed checkpoint fingerprint --------------------------------------------------------------
@pytest.mark.parametrize("build,auto", [(_tied_t5, AutoModelForSeq2SeqLM),
                                        (_tied_llama, AutoModelForCausalLM)], ids=["t5-tied", "llama-tied"])
@pytest.mark.parametrize("saved,load", [(None, None), (None, torch.float16), (torch.bfloat16, None),
                                        (None, torch.bfloat16)],
                         ids=["fp32", "fp32->fp16", "bf16", "fp32->bf16"])
def test_checkpoint_fingerprint_equals_loaded_model(tmp_path, build, auto, saved, load):
    folder = _save(build(), tmp_path, saved)
    config = AutoConfig.from_pretrained(folder)
    loaded = auto.from_pretrained(folder, **({"dtype": load} if load is not None else {}))
    assert qlora.checkpoint_fingerprint(folder, auto, config, load) == compute_fingerprint(loaded)


def test_checkpoint_fingerprint_untied_fixtures(tiny_t5_dir, tiny_llama_dir):
    for folder, auto in ((tiny_t5_dir, AutoModelForSeq2SeqLM), (tiny_llama_dir, AutoModelForCausalLM)):
        config = AutoConfig.from_pretrained(folder)
        full = auto.from_pretrained(folder)
        assert qlora.checkpoint_fingerprint(folder, auto, config) == compute_fingerprint(full)


def test_checkpoint_fingerprint_refuses_what_it_cannot_read_exactly(tmp_path):
    folder = _save(_tied_llama(), tmp_path / "m")
    config = AutoConfig.from_pretrained(folder)
    assert qlora.checkpoint_fingerprint("google/flan-t5-base", AutoModelForSeq2SeqLM, config) is None
    bigger = replace_config(AutoConfig.from_pretrained(folder), intermediate_size=128)
    assert qlora.checkpoint_fingerprint(folder, AutoModelForCausalLM, bigger) is None


# ---- QLoRA loading --------------------------------------------------------------------------------
def test_nf4_on_cuda_uses_bitsandbytes_config(fake_cuda, tmp_path):
    folder = _save(_tied_llama(), tmp_path / "m")
    expected = compute_fingerprint(AutoModelForCausalLM.from_pretrained(folder))
    seen = {}

    def fake_from_pretrained(path, **kwargs):
        seen.update(kwargs)
        return LlamaForCausalLM(kwargs["config"])

    fake_cuda.setattr(AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    model = qlora.load_base_model(folder, quantize="nf4")
    q = seen["quantization_config"]
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert q.bnb_4bit_compute_dtype is torch.bfloat16 and "lm_head" in q.llm_int8_skip_modules
    assert seen["device_map"] == {"": 0} and seen["attn_implementation"] == "sdpa" and "dtype" not in seen
    assert getattr(model, FINGERPRINT_ATTR) == expected
    assert getattr(model, QUANTIZATION_ATTR)["compute_dtype"] == "bfloat16"


def test_nf4_on_cpu_path_unchanged(tiny_llama_dir):
    model = qlora.load_base_model(tiny_llama_dir, quantize="nf4")
    full = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert getattr(model, FINGERPRINT_ATTR) == compute_fingerprint(full)
    assert getattr(model, QUANTIZATION_ATTR)["compute_dtype"] == "float32"


# ---- optimizer ------------------------------------------------------------------------------------
def test_paged_adamw_refused_on_cpu():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    assert OPTIMIZERS == ("adamw", "paged_adamw_8bit")
    cpu = torch.device("cpu")
    assert isinstance(build_optimizer("adamw", [{"params": [p]}], lr=1e-3, eps=1e-8, device=cpu),
                      torch.optim.AdamW)
    with pytest.raises(SettingsError, match="model.optimizer 'paged_adamw_8bit' needs a CUDA GPU"):
        build_optimizer("paged_adamw_8bit", [{"params": [p]}], lr=1e-3, eps=1e-8, device=torch.device("cpu"))
    with pytest.raises(SettingsError, match="model.optimizer must be one of"):
        build_optimizer("sgd", [{"params": [p]}], lr=1e-3, eps=1e-8, device=torch.device("cpu"))


def test_paged_adamw_keeps_loraplus_groups(monkeypatch):
    made = {}

    class FakePaged:
        def __init__(self, groups, **kwargs):
            made.update(groups=groups, **kwargs)

    monkeypatch.setattr(bnb.optim, "PagedAdamW8bit", FakePaged)
    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2, 2))
    groups = [{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1.6e-2}]
    build_optimizer("paged_adamw_8bit", groups, lr=1e-3, eps=1e-8, device=torch.device("cuda", 0))
    assert made["groups"] is groups and made["lr"] == 1e-3 and made["eps"] == 1e-8


def test_module_records_optimizer_and_refuses_paged_on_cpu(tiny_t5_dir):
    from lora_module.training.module import FineTuneModule

    module = FineTuneModule(str(tiny_t5_dir), optimizer="paged_adamw_8bit", loraplus_lr_ratio=16.0)
    assert module.hparams["optimizer"] == "paged_adamw_8bit"  # an hparam: in config.yaml and the MLflow run
    with pytest.raises(SettingsError, match="set model.optimizer to 'adamw'"):
        module.configure_optimizers()
