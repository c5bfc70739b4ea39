"""DoRA (`use_dora`) against PEFT 0.21, the reference: same weights -> same logits and gradients, adapter
files each library loads from the other, merge / unmerge / merge_and_unload, QLoRA over a 4-bit base,
mixed-adapter batches, and two training steps through the Lightning module.

Every pair starts from identical bases, with random non-zero A and B and magnitudes moved off their
initial row norms (a fresh DoRA adapter computes the base exactly, which would hide errors).

Run: .venv/bin/pytest tests/test_dora.py -q
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning as L
import peft
import pytest
import torch
from conftest import make_tiny_llama, make_tiny_t5, tiny_llama_config
from safetensors.torch import load_file
from test_lora_peft_parity import batch as lm_batch
from test_mixed_batch import assert_rows_match_alone
from torch import nn
from transformers import LlamaForCausalLM

from lora_module import LoraConfig, LoraConfigError, LoraModel, quantize_nf4
from lora_module.contracts import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from lora_module.errors import AdapterLoadError, one_line
from lora_module.layers import is_linear4bit
from lora_module.mixed_batch import BASE_ROW


class BiasMlp(nn.Module):
    """Two linear layers with biases (T5 and Llama have none): DoRA takes the bias out of the base output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def make_qlora_llama() -> LlamaForCausalLM:
    """The tiny Llama at hidden size 64 (a multiple of the NF4 block), its adapted layers quantized by us
    (only those: bitsandbytes' CPU kernels are slow, and the others add nothing to the test)."""
    config = tiny_llama_config(512)
    config.hidden_size, config.head_dim = 64, 16
    torch.manual_seed(0)
    unadapted = ("k_proj", "o_proj", "gate_proj", "up_proj")
    return quantize_nf4(LlamaForCausalLM(config).eval(), skip_modules=unadapted)


ARCHS = {
    "t5": (make_tiny_t5, "SEQ_2_SEQ_LM", {"target_modules": ["q", "v", "wo"]}),
    "llama": (make_tiny_llama, "CAUSAL_LM", {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
    # dropout > 0: in train mode DoRA recomputes W x from the dropped-out input (PEFT's semantics)
    "mlp-bias-dropout": (BiasMlp, None, {"target_modules": ["up", "down"], "lora_dropout": 0.3}),
    "llama-nf4": (make_qlora_llama, "CAUSAL_LM", {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
}


def peft_model(arch: str, kwargs: dict, base: nn.Module | None = None) -> peft.PeftModel:
    make, task, _ = ARCHS[arch]
    base = base if base is not None else make()
    if arch.endswith("nf4"):
        base.is_loaded_in_4bit = True  # what transformers sets: PEFT then wraps with its bnb Linear4bit
    return peft.get_peft_model(base, peft.LoraConfig(task_type=task, **kwargs))


def dora_kwargs(arch: str) -> dict:
    return {"r": 4, "lora_alpha": 8, "use_dora": True, **ARCHS[arch][2]}


def randomize(ours: LoraModel, theirs: peft.PeftModel | None = None, seed: int = 0) -> None:
    """Random A, B and magnitudes (x 1 +- 10%) in ours, copied into PEFT's under the same names."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if not p.requires_grad:
                continue
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            if theirs is not None:
                theirs.get_parameter("base_model." + name).copy_(p)


def build_pair(arch: str) -> tuple[LoraModel, peft.PeftModel]:
    kwargs = dora_kwargs(arch)
    ours = LoraModel(ARCHS[arch][0](), LoraConfig(**kwargs))
    theirs = peft_model(arch, kwargs)
    if arch.endswith("nf4"):  # PEFT's own QLoRA layer, over the very 4-bit layers we quantized
        wrappers = {type(m).__module__ for m in theirs.modules() if hasattr(m, "lora_A")}
        assert wrappers == {"peft.tuners.lora.bnb"}
    # Before randomizing: PEFT's initial magnitudes (row norms of W) are ours.
    for name, p in theirs.named_parameters():
        if "lora_magnitude_vector" in name:
            assert torch.equal(p, ours.get_parameter(name.removeprefix("base_model."))), name
    randomize(ours, theirs)
    return ours, theirs


def batch(arch: str) -> dict[str, torch.Tensor]:
    if arch.startswith("mlp"):
        return {"x": torch.randn(5, 16, generator=torch.Generator().manual_seed(1))}
    return lm_batch(arch)  # the PEFT parity tests' batch: T5 with labels, causal with masked labels


def run(model: nn.Module, arch: str, seed: int = 0) -> torch.Tensor:
    """The model's output tensor (logits, or the MLP's output); the seed fixes dropout masks."""
    torch.manual_seed(seed)
    inputs = batch(arch)
    if arch.startswith("mlp"):
        return model(**inputs)
    return model(**inputs).logits


def loss(model: nn.Module, arch: str) -> torch.Tensor:
    """The LM loss (the MLP: its mean squared output), dropout masks seeded as in `run`."""
    torch.manual_seed(0)
    return model(**batch(arch)).square().mean() if arch.startswith("mlp") else model(**batch(arch)).loss


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal within `rel` of the reference's scale (fp32 rounding of differently ordered sums)."""
    diff, scale = float((got - want).abs().max()), float(want.abs().max())
    assert diff <= rel * scale, f"max diff {diff:.3g} > {rel:g} x scale {scale:.3g}"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_and_gradients_match_peft(arch):
    ours, theirs = build_pair(arch)
    ours_names = {n.removeprefix("model.") for n, p in ours.named_parameters() if p.requires_grad}
    theirs_names = {n.removeprefix("base_model.model.")
                    for n, p in theirs.named_parameters() if p.requires_grad}
    assert ours_names == theirs_names and any("lora_magnitude_vector" in n for n in ours_names)
    assert ours.trainable_parameters() == theirs.get_nb_trainable_parameters()
    for mode in ("eval", "train"):
        getattr(ours, mode)()
        getattr(theirs, mode)()
        with torch.no_grad():
            assert_close(run(ours, arch), run(theirs, arch))
    loss(ours, arch).backward()  # train mode: dropout active where the config has it
    loss(theirs, arch).backward()
    for name, p in ours.named_parameters():
        if p.requires_grad:
            q = theirs.get_parameter("base_model." + name)
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
            assert_close(p.grad, q.grad)


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_adapter_files_load_both_ways(arch, tmp_path):
    ours, theirs = build_pair(arch)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        expected = run(theirs, arch)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = LoraModel.from_pretrained(ARCHS[arch][0](), tmp_path / "peft")
    with torch.no_grad():
        assert_close(run(loaded, arch), expected)

    ours.save_pretrained(tmp_path / "ours")
    ours_file = load_file(tmp_path / "ours" / ADAPTER_WEIGHTS_FILE)
    peft_file = load_file(tmp_path / "peft" / ADAPTER_WEIGHTS_FILE)
    assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in peft_file.items()}
    assert any(k.endswith(".lora_magnitude_vector") for k in ours_file)
    assert json.loads((tmp_path / "ours" / ADAPTER_CONFIG_FILE).read_text())["use_dora"] is True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reloaded = peft.PeftModel.from_pretrained(ARCHS[arch][0](), tmp_path / "ours").eval()
    # PEFT only warns about unexpected or missing keys (and about unknown config keys): none allowed
    assert not [str(w.message) for w in caught if "key" in str(w.message).lower()]
    with torch.no_grad():
        assert_close(run(reloaded, arch), run(ours, arch))


@pytest.mark.parametrize("arch", ["t5", "llama", "mlp-bias-dropout"])
@torch.no_grad()
def test_merge_unmerge_and_merge_and_unload_match_peft(arch):
    ours, theirs = build_pair(arch)
    ours.eval()
    theirs.eval()
    unmerged = run(ours, arch)
    path, layer = next(ours.lora_layers())
    base = layer.base_layer.weight.clone()
    ours.merge_adapter()
    theirs.merge_adapter()
    theirs_weight = theirs.get_parameter(f"base_model.model.{path}.base_layer.weight")
    assert_close(layer.base_layer.weight, theirs_weight, rel=1e-6)  # PEFT's merge formula
    assert_close(run(ours, arch), unmerged)
    ours.unmerge_adapter()
    assert_close(layer.base_layer.weight, base, rel=1e-6)
    assert_close(run(ours, arch), unmerged, rel=1e-6)
    plain = ours.merge_and_unload()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    assert_close(run(plain, arch), unmerged)
    assert_close(run(theirs.merge_and_unload(), arch), unmerged)


@torch.no_grad()
def test_qlora_merge_dequantizes_and_unmerge_restores_the_4bit_layer():
    ours = LoraModel(make_qlora_llama(), LoraConfig(**dora_kwargs("llama-nf4"))).eval()
    randomize(ours)
    before = run(ours, "llama-nf4")
    _, layer = next(ours.lora_layers())
    quantized = layer.base_layer
    assert is_linear4bit(quantized)
    with pytest.warns(UserWarning, match="4-bit layers were dequantized"):
        ours.merge_adapter()
    assert type(layer.base_layer) is nn.Linear
    assert_close(run(ours, "llama-nf4"), before)
    ours.unmerge_adapter()
    assert layer.base_layer is quantized
    assert torch.equal(run(ours, "llama-nf4"), before)


@pytest.mark.parametrize("arch", ["t5", "llama"])
@torch.inference_mode()
def test_mixed_batch_with_dora_matches_peft_per_adapter_and_rows_alone(arch):
    """A DoRA and a plain adapter in one batch. PEFT 0.21 refuses DoRA in `adapter_names`, so each row is
    checked against PEFT running the whole batch with that row's adapter set, and against the row alone."""
    make, task, extra = ARCHS[arch]
    configs = {"dora": dora_kwargs(arch), "plain": {"r": 2, "lora_alpha": 6, **extra}}
    ours = LoraModel(make(), None)
    theirs = None
    for name, kwargs in configs.items():
        ours.add_adapter(name, LoraConfig(**kwargs))
        if theirs is None:
            theirs = peft.get_peft_model(make(), peft.LoraConfig(task_type=task, **kwargs), adapter_name=name)
        else:
            theirs.add_adapter(name, peft.LoraConfig(task_type=task, **kwargs))
    for seed, name in enumerate(configs):
        ours.set_adapter(name)  # only the active adapter is trainable: randomize() covers that one
        randomize(ours, seed=seed)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_" in name:
                theirs.get_parameter("base_model." + name).copy_(p)
    ours.eval()
    theirs.eval()
    names = ["dora", "plain", BASE_ROW, "dora", "plain", "dora"]
    g = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(4, 500, (len(names), 7), generator=g)}
    if arch == "t5":
        inputs["decoder_input_ids"] = torch.randint(4, 500, (len(names), 4), generator=g)
    mixed = ours(**inputs, adapter_names=names).logits
    with theirs.disable_adapter():
        references = {BASE_ROW: theirs(**inputs).logits}
    for name in configs:
        theirs.set_adapter(name)
        references[name] = theirs(**inputs).logits
    for row, name in enumerate(names):
        assert_close(mixed[row], references[name][row])
    assert_rows_match_alone(ours, mixed, inputs, names)
    # Last: after refusing, PEFT leaves forward hooks behind on this model.
    with pytest.raises(ValueError, match="DoRA"):
        theirs(**inputs, adapter_names=names)


def test_dora_settings_and_files_that_do_not_match_are_refused_in_one_line(tmp_path):
    with pytest.raises(LoraConfigError, match="use_dora must be true or false"):
        LoraConfig(use_dora="yes")
    ours = LoraModel(make_tiny_llama(), LoraConfig(**dora_kwargs("llama")))
    ours.save_pretrained(tmp_path / "dora")
    config_file = tmp_path / "dora" / ADAPTER_CONFIG_FILE
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "use_dora": False}))
    with pytest.raises(AdapterLoadError, match="use_dora is False in the config but the file has") as err:
        LoraModel.from_pretrained(make_tiny_llama(), tmp_path / "dora")
    assert "\n" not in one_line(str(err.value))

    plain = LoraModel(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    plain.save_pretrained(tmp_path / "plain")
    config_file = tmp_path / "plain" / ADAPTER_CONFIG_FILE
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "use_dora": True}))
    with pytest.raises(AdapterLoadError, match="use_dora is True in the config but the file lacks"):
        LoraModel.from_pretrained(make_tiny_llama(), tmp_path / "plain")


def test_lightning_training_trains_counts_and_exports_the_magnitude(causal_tokenizer_dir, tiny_llama_dir,
                                                                    tmp_path):
    from test_training import make_trainer, prepare_tiny

    from lora_module.training.datamodule import PreparedDataModule
    from lora_module.training.module import FineTuneModule

    L.seed_everything(0)
    out = tmp_path / "run"
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    module = FineTuneModule(str(tiny_llama_dir), finetune="lora", lora=config, learning_rate=1e-2,
                            output_dir=str(out))
    magnitudes = {n: p.detach().clone() for n, p in module.model.named_parameters()
                  if "lora_magnitude_vector" in n}
    assert magnitudes and all(module.model.get_parameter(n).requires_grad for n in magnitudes)
    prepared = prepare_tiny(causal_tokenizer_dir, "causal", tmp_path / "data")
    dm = PreparedDataModule(str(prepared), batch_size=4)
    make_trainer(2).fit(module, dm)

    assert all(not torch.equal(module.model.get_parameter(n), before) for n, before in magnitudes.items())
    metrics = json.loads((out / "metrics.json").read_text())
    expected = peft_model("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                    "use_dora": True}, base=LlamaForCausalLM.from_pretrained(tiny_llama_dir))
    assert metrics["trainable_params"] == expected.get_nb_trainable_parameters()[0]
    exported = load_file(Path(out) / "adapter" / ADAPTER_WEIGHTS_FILE)
    for name, p in module.model.named_parameters():
        if "lora_magnitude_vector" in name:
            key = "base_model." + name.removesuffix(".default.weight")
            assert torch.equal(exported[key], p.detach())
