"""Adapter files: PEFT format on disk, base fingerprint, and atomic loading that refuses bad input.

Every failed load is checked to leave the model exactly as it was (state_dict, modules,
requires_grad flags, adapters).

Run: .venv/bin/pytest tests/test_adapter_io.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_t5, tiny_t5_config
from safetensors.torch import load_file, save_file
from transformers import T5ForConditionalGeneration

from lora_module import (
    AdapterLoadError,
    FingerprintMismatchError,
    LoraConfig,
    LoraModel,
    base_fingerprint,
    read_adapter_config,
)
from lora_module.adapter_io import compute_fingerprint, read_prompt_settings, write_prompt_settings
from lora_module.prompt import PromptSettings

IDS = torch.tensor([[5, 17, 42, 99, 7, 1]])
LABELS = torch.tensor([[20, 21, 22, 1]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, labels=LABELS).logits


def trained_adapter(path: Path, seed: int = 0, **kwargs) -> LoraModel:
    """Save a non-zero adapter for the seed-0 tiny T5 at `path`; returns the model it came from."""
    lm = LoraModel(make_tiny_t5(), LoraConfig(**{"r": 4, "lora_alpha": 8, **kwargs}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    lm.save_pretrained(path, metadata={"task": "demo", "run": 7})
    return lm


def snapshot(model) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "adapters": list(getattr(model, "adapters", {})),
        "active": getattr(model, "active_adapter", None),
    }


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["grad"] == before["grad"]
    assert after["adapters"] == before["adapters"] and after["active"] == before["active"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())


# ---- format --------------------------------------------------------------------------------------
def test_saved_files_follow_peft_format(tmp_path):
    lm = trained_adapter(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "lora_pipeline.json"]
    peft_config = json.loads((tmp_path / "adapter_config.json").read_text())
    sidecar = json.loads((tmp_path / "lora_pipeline.json").read_text())
    # PEFT's file holds PEFT's keys only; ours sit in the sidecar and are merged when read.
    assert not {"base_fingerprint", "lora_pipeline"} & peft_config.keys()
    config = read_adapter_config(tmp_path)
    assert config == {**peft_config, **sidecar} and config["lora_pipeline"]["format_version"] == 1
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias",
                                   "use_rslora", "target_modules")} == {
        "peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "bias": "none", "use_rslora": False, "target_modules": ["q", "v"]}
    assert config["base_fingerprint"] == lm.base_fingerprint() == base_fingerprint(make_tiny_t5())
    assert config["lora_pipeline"] == {"format_version": 1, "adapter_name": "default",
                                       "task": "demo", "run": 7}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 2 * 12
    key = "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight"
    assert tensors[key].shape == (4, 32)
    assert tensors[key.replace("lora_A", "lora_B")].shape == (32, 4)
    q = lm.model.encoder.block[0].layer[0].SelfAttention.q
    assert torch.equal(tensors[key], q.lora_A["default"].weight)
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in tensors)


def test_base_model_name_defaults_to_the_loaded_path(tmp_path, tiny_t5_dir):
    lm = LoraModel(T5ForConditionalGeneration.from_pretrained(tiny_t5_dir), LoraConfig(r=2))
    lm.save_pretrained(tmp_path / "a")
    assert read_adapter_config(tmp_path / "a")["base_model_name_or_path"] == str(tiny_t5_dir)
    lm.save_pretrained(tmp_path / "b", base_model_name_or_path="google/flan-t5-base")
    assert read_adapter_config(tmp_path / "b")["base_model_name_or_path"] == "google/flan-t5-base"


def test_fingerprint_is_stable_across_dtypes_and_wrapping_but_sees_weight_changes():
    fp = base_fingerprint(make_tiny_t5())
    assert len(fp) == 64 and fp == base_fingerprint(make_tiny_t5())
    assert base_fingerprint(make_tiny_t5().to(torch.bfloat16)) == fp
    wrapped = LoraModel(make_tiny_t5(), LoraConfig(r=2))
    assert base_fingerprint(wrapped) == fp
    assert compute_fingerprint(wrapped.model) == fp  # hashed afresh: LoRA tensors and base_layer ignored
    assert base_fingerprint(make_tiny_t5(seed=1)) != fp
    changed = make_tiny_t5()
    with torch.no_grad():
        changed.encoder.block[0].layer[0].SelfAttention.q.weight[0, 0] += 0.5  # first value is always sampled
    assert base_fingerprint(changed) != fp


def test_legacy_bin_loads_via_weights_only(tmp_path):
    lm = trained_adapter(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    assert torch.allclose(logits(LoraModel.from_pretrained(make_tiny_t5(), tmp_path)), logits(lm), atol=1e-6)


class _Payload:
    """Pickles as a call to _side_effect: full unpickling would run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (_side_effect, (str(self.marker),))


def _side_effect(marker: str) -> None:
    Path(marker).write_text("unpickled!")


def test_bin_with_arbitrary_objects_is_refused_without_running_it(tmp_path):
    trained_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    marker = tmp_path / "marker"
    torch.save({"x": _Payload(marker)}, tmp_path / "adapter_model.bin")
    model = make_tiny_t5()
    before = snapshot(model)
    with pytest.raises(AdapterLoadError, match=r"refused to load .*adapter_model\.bin.*weights_only=True"):
        LoraModel.from_pretrained(model, tmp_path)
    assert not marker.exists()
    assert_unchanged(model, before)


# ---- atomic loading: every failure leaves the model as it was --------------------------------------
def _no_weights(d: Path) -> None:
    (d / "adapter_model.safetensors").unlink()


def _no_config(d: Path) -> None:
    (d / "adapter_config.json").unlink()


def _truncated(d: Path) -> None:
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _bad_json(d: Path) -> None:
    (d / "adapter_config.json").write_text("{not json")


def _wrong_rank_in_config(d: Path) -> None:
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))


def _unprefixed_keys(d: Path) -> None:
    f = d / "adapter_model.safetensors"
    save_file({k.removeprefix("base_model.model."): v for k, v in load_file(f).items()}, f)


def _missing_lora_b(d: Path) -> None:
    f = d / "adapter_model.safetensors"
    tensors = load_file(f)
    del tensors["base_model.model.decoder.block.1.layer.1.EncDecAttention.v.lora_B.weight"]
    save_file(tensors, f)


def _dora_config(d: Path) -> None:
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))


BAD_ADAPTERS = {
    "missing weights": (_no_weights, AdapterLoadError, ["missing its weights", "adapter_model.safetensors"]),
    "missing config": (_no_config, AdapterLoadError,
                       ["missing adapter_config.json", "found: ['adapter_model"]),
    "truncated safetensors": (_truncated, AdapterLoadError,
                              ["adapter_model.safetensors", "truncated or corrupt"]),
    "invalid json": (_bad_json, AdapterLoadError, ["adapter_config.json", "not valid JSON"]),
    "rank disagrees": (_wrong_rank_in_config, AdapterLoadError,
                       ["shape mismatch for module 'decoder.block.0.layer.0.SelfAttention.q'",
                        "lora_A is (4, 32) in the file but this model needs (8, 32)"]),
    "keys without prefix": (_unprefixed_keys, AdapterLoadError, ["lacks the 'base_model.model.' prefix"]),
    "half a pair": (_missing_lora_b, AdapterLoadError,
                    ["module 'decoder.block.1.layer.1.EncDecAttention.v' has no lora_B tensor"]),
    "dora without magnitude": (
        _dora_config, AdapterLoadError,
        ["use_dora is True in the config but the file lacks its lora_magnitude_vector"]),
}


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_bad_adapter_folder_is_refused_and_model_unchanged(case, tmp_path):
    corrupt, error, fragments = BAD_ADAPTERS[case]
    trained_adapter(tmp_path / "bad")
    corrupt(tmp_path / "bad")
    # onto an existing LoraModel (which has its own adapter) ...
    lm = LoraModel(make_tiny_t5(), LoraConfig(r=2, target_modules=["q", "k"]))
    before = snapshot(lm)
    with pytest.raises(error) as err:
        lm.load_adapter(tmp_path / "bad", adapter_name="other")
    for fragment in fragments:
        assert fragment in str(err.value)
    assert_unchanged(lm, before)
    # ... and onto a plain model through from_pretrained
    model = make_tiny_t5()
    before = snapshot(model)
    with pytest.raises(error):
        LoraModel.from_pretrained(model, tmp_path / "bad")
    assert_unchanged(model, before)


def test_adapter_for_another_architecture_names_the_missing_modules(tmp_path):
    llama = LoraModel(make_tiny_llama(), LoraConfig(r=4))
    llama.save_pretrained(tmp_path)
    model = make_tiny_t5()
    before = snapshot(model)
    missing = r"module 'model\.layers\.0\.self_attn\.q_proj' does not exist"
    with pytest.raises(AdapterLoadError, match=missing):
        LoraModel.from_pretrained(model, tmp_path)
    assert_unchanged(model, before)


def test_shape_mismatch_names_module_and_both_shapes(tmp_path):
    trained_adapter(tmp_path)  # d_model 32
    config = tiny_t5_config(512)
    config.d_model = 48
    torch.manual_seed(0)
    wider = T5ForConditionalGeneration(config)
    before = snapshot(wider)
    with pytest.raises(AdapterLoadError) as err:
        LoraModel.from_pretrained(wider, tmp_path)
    message = str(err.value)
    assert "shape mismatch for module 'decoder.block.0.layer.0.SelfAttention.q'" in message
    assert "lora_A is (4, 32) in the file but this model needs (4, 48)" in message
    assert "another architecture" in message
    assert_unchanged(wider, before)


def test_fingerprint_mismatch_names_both_hashes_unless_forced(tmp_path):
    source = trained_adapter(tmp_path)
    other = make_tiny_t5(seed=1)
    before = snapshot(other)
    with pytest.raises(FingerprintMismatchError) as err:
        LoraModel.from_pretrained(other, tmp_path)
    assert source.base_fingerprint() in str(err.value)
    assert base_fingerprint(other) in str(err.value)
    assert "force=True" in str(err.value)
    assert_unchanged(other, before)
    forced = LoraModel.from_pretrained(other, tmp_path, force=True)
    assert forced.active_adapter == "default"
    assert not torch.allclose(logits(forced), logits(make_tiny_t5(seed=1)), atol=1e-3)


def test_name_clash_is_refused(tmp_path):
    trained_adapter(tmp_path)
    lm = LoraModel(make_tiny_t5(), LoraConfig(r=2))
    before = snapshot(lm)
    with pytest.raises(AdapterLoadError, match="adapter 'default' already exists"):
        lm.load_adapter(tmp_path)
    assert_unchanged(lm, before)


def test_load_adapter_is_trainable_only_when_asked(tmp_path):
    source = trained_adapter(tmp_path)
    frozen = LoraModel.from_pretrained(make_tiny_t5(), tmp_path)
    assert frozen.trainable_parameters()[0] == 0
    trainable = LoraModel.from_pretrained(make_tiny_t5(), tmp_path, is_trainable=True)
    assert trainable.trainable_parameters() == source.trainable_parameters()
    assert torch.equal(logits(trainable), logits(source))


def test_our_keys_are_read_from_the_sidecar_only(tmp_path):
    """adapter_config.json is PEFT's: a base_fingerprint / lora_pipeline written into it is not ours
    to read (there is no pre-sidecar layout to honour); the sidecar's keys win and stay the only ones."""
    trained_adapter(tmp_path)
    merged = read_adapter_config(tmp_path)
    peft = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {**peft, "base_fingerprint": "0" * 64, "lora_pipeline": {"task": "stale"}}))
    assert read_adapter_config(tmp_path) == merged
    assert LoraModel.from_pretrained(make_tiny_t5(), tmp_path).active_adapter == "default"  # not stale
    with pytest.raises(FingerprintMismatchError):  # the sidecar's fingerprint is checked
        LoraModel.from_pretrained(make_tiny_t5(seed=1), tmp_path)
    (tmp_path / "lora_pipeline.json").unlink()
    assert read_adapter_config(tmp_path) == peft  # no fingerprint recorded: none is read from PEFT's file


def test_prompt_settings_travel_in_the_sidecar(tmp_path):
    """The adapter says how it was prompted: written after saving, read back equal, kept beside the
    fingerprint and metadata (which read_adapter_config still merges), absent on a plain save."""
    trained_adapter(tmp_path)
    assert read_prompt_settings(tmp_path) is None
    before = read_adapter_config(tmp_path)
    settings = PromptSettings(template="Summarize:\n{dialogue}\nSummary: ", max_source_length=96,
                              max_target_length=24, model_type="seq2seq")
    assert write_prompt_settings(tmp_path, settings) == tmp_path / "lora_pipeline.json"
    assert read_prompt_settings(tmp_path) == settings
    assert json.loads((tmp_path / "lora_pipeline.json").read_text())["prompt"] == settings.to_dict()
    assert read_adapter_config(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "lora_pipeline.json"]  # no temp file left
    sidecar = json.loads((tmp_path / "lora_pipeline.json").read_text())
    (tmp_path / "lora_pipeline.json").write_text(json.dumps({**sidecar, "prompt": {"templ": "x"}}))
    with pytest.raises(AdapterLoadError, match=r"lora_pipeline.json: 'prompt' is not valid .*templ"):
        read_prompt_settings(tmp_path)
    with pytest.raises(AdapterLoadError, match="not a saved adapter folder"):
        write_prompt_settings(tmp_path / "nothing", settings)
