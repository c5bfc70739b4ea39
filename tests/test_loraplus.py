"""LoRA+ (`model.loraplus_lr_ratio`): the optimizer groups equal PEFT's `create_loraplus_optimizer`, one
training step equals a step of PEFT's optimizer, and the setting is checked, saved and logged.

    .venv/bin/python -m pytest tests/test_loraplus.py -q
"""

from __future__ import annotations

import lightning as L
import peft
import pytest
import torch
import yaml
from peft.optimizers import create_loraplus_optimizer
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from lora_module import LoraConfig
from lora_module import contracts as c
from lora_module.errors import SettingsError
from lora_module.training.cli import ConfigParseError, parse_config
from lora_module.training.hparams import check_hparams
from lora_module.training.module import FineTuneModule
from lora_module.training.optim import loraplus_groups, param_groups

RATIO, LR, WD = 16.0, 1e-3, 0.01
TARGETS = {"t5": ["q", "v", "wo"], "llama": ["q_proj", "v_proj", "down_proj"]}


class Toy(nn.Module):
    """Every branch of PEFT's grouping: A/B matrices, a 1-D magnitude, a LayerNorm, a bias, a plain matrix."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Module()
        self.layer.lora_A = nn.ModuleDict({"default": nn.Linear(8, 2, bias=False)})
        self.layer.lora_B = nn.ModuleDict({"default": nn.Linear(2, 8, bias=False)})
        self.layer.lora_magnitude_vector = nn.ParameterDict({"default": nn.Parameter(torch.ones(8))})
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def signature(groups, names: dict[int, str]) -> list[tuple[float, float, list[str]]]:
    """(lr, weight decay, parameter names) of each non-empty group, in order."""
    return [(g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in groups
            if g["params"]]


def peft_signature(model: nn.Module, strip: str = "") -> list[tuple[float, float, list[str]]]:
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                          loraplus_weight_decay=WD)
    names = {id(p): n.removeprefix(strip) for n, p in model.named_parameters()}
    return signature(optimizer.param_groups, names)


def test_groups_equal_peft_on_every_branch():
    toy = Toy()
    names = {id(p): n for n, p in toy.named_parameters()}
    ours = signature(loraplus_groups(toy, LR, RATIO, WD), names)
    assert ours == peft_signature(toy)
    # Read out: A and the plain matrix at lr; B and the magnitude at lr * 16 with decay; the LayerNorm and
    # the bias at lr * 16 without.
    assert ours == [(LR, WD, ["head.weight", "layer.lora_A.default.weight"]),
                    (LR * RATIO, WD, ["layer.lora_B.default.weight", "layer.lora_magnitude_vector.default"]),
                    (LR * RATIO, 0.0, ["head.bias", "norm.bias", "norm.weight"])]


@pytest.fixture(scope="module")
def built(tiny_t5_dir, tiny_llama_dir) -> dict[str, tuple[str, type]]:
    return {"t5": (str(tiny_t5_dir), AutoModelForSeq2SeqLM),
            "llama": (str(tiny_llama_dir), AutoModelForCausalLM)}


def make_pair(path: str, auto: type, targets: list[str], tmp_path, **hparams
              ) -> tuple[FineTuneModule, nn.Module]:
    """Our module and a PEFT model on the same base with the same adapter weights (B non-zero, so both
    matrices get gradients on the first step)."""
    ours = FineTuneModule(path, lora=LoraConfig(r=4, lora_alpha=8, target_modules=targets), learning_rate=LR,
                          weight_decay=WD, scheduler="constant", output_dir=str(tmp_path / "run"), **hparams)
    torch.manual_seed(1)
    for name, p in ours.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    theirs = peft.get_peft_model(auto.from_pretrained(path), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    state = {"base_model." + n.removeprefix("model."): p.detach() for n, p in ours.named_parameters()
             if p.requires_grad}
    missing = theirs.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys
    return ours, theirs


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_groups_and_lrs_equal_peft_on_a_model(arch, built, tmp_path):
    ours, theirs = make_pair(*built[arch], TARGETS[arch], tmp_path, loraplus_lr_ratio=RATIO)
    names = {id(p): n.removeprefix("model.model.") for n, p in ours.named_parameters()}
    groups = param_groups(ours, learning_rate=LR, weight_decay=WD, loraplus_lr_ratio=RATIO)
    mine = signature(groups, names)
    assert mine == peft_signature(theirs, strip="base_model.model.")
    assert [g[:2] for g in mine] == [(LR, WD), (LR * RATIO, WD)]  # A at lr, B at lr * ratio


def batch_for(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(2, vocab, (4, 12), generator=g),
            "attention_mask": torch.ones(4, 12, dtype=torch.long),
            "labels": torch.randint(2, vocab, (4, 6), generator=g)}


def test_one_step_equals_peft_optimizer_and_is_saved_and_logged(built, tmp_path):
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    ours, theirs = make_pair(*built["t5"], TARGETS["t5"], tmp_path, loraplus_lr_ratio=RATIO)
    batch = batch_for(ours.model.get_input_embeddings().num_embeddings)
    plain = {n: p.detach().clone() for n, p in theirs.named_parameters() if p.requires_grad}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # An artifact location of its own: a new experiment in a sqlite store would otherwise use ./mlruns.
    logger = MLFlowLogger(experiment_name="loraplus", tracking_uri=uri,
                          artifact_location=(tmp_path / "artifacts").as_uri())
    L.seed_everything(0)
    L.Trainer(max_steps=1, accelerator="cpu", logger=logger, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=True, limit_val_batches=0).fit(
        ours, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))

    def peft_step(ratio: float) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            for n, p in theirs.named_parameters():
                if p.requires_grad:
                    p.copy_(plain[n])
        theirs.train()
        optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=ratio,
                                              loraplus_weight_decay=WD, eps=1e-8)
        optimizer.zero_grad()
        theirs(**batch).loss.backward()
        optimizer.step()
        return {n.removeprefix("base_model."): p.detach().clone() for n, p in theirs.named_parameters()
                if p.requires_grad}

    trained = {n.removeprefix("model."): p.detach() for n, p in ours.named_parameters() if p.requires_grad}
    expected, without = peft_step(RATIO), peft_step(1.0)
    assert trained.keys() == expected.keys()
    for name in trained:
        torch.testing.assert_close(trained[name], expected[name], rtol=1e-5, atol=1e-7)
    # The check can fail: plain AdamW (ratio 1) moves every B by 16x less.
    b = next(n for n in trained if "lora_B" in n)
    step, step_plain = (trained[b] - plain["base_model." + b]), (without[b] - plain["base_model." + b])
    torch.testing.assert_close(step, RATIO * step_plain, rtol=1e-3, atol=1e-8)
    saved = yaml.safe_load((tmp_path / "run" / c.CONFIG_FILE).read_text())
    assert saved["model"]["loraplus_lr_ratio"] == RATIO
    params = MlflowClient(tracking_uri=uri).get_run(logger.run_id).data.params
    assert params["loraplus_lr_ratio"] == str(RATIO)


def test_plain_groups_are_unchanged_without_a_ratio(built, tmp_path):
    ours, _ = make_pair(*built["t5"], TARGETS["t5"], tmp_path)
    groups = param_groups(ours, learning_rate=LR, weight_decay=WD)
    assert [("lr" in g, g["weight_decay"]) for g in groups] == [(False, WD)]
    assert sum(p.numel() for g in groups for p in g["params"]) == ours.parameter_counts()[0]


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), True, "16"])
def test_bad_ratio_is_one_line_naming_the_key(value):
    expected = r"^model\.loraplus_lr_ratio must be a number > 0 \(or null: off\), got "
    with pytest.raises(SettingsError, match=expected):
        check_hparams(loraplus_lr_ratio=value)


def test_full_finetuning_refuses_loraplus(tmp_path):
    with pytest.raises(SettingsError, match=r"model\.loraplus_lr_ratio applies to LoRA's A/B matrices"):
        FineTuneModule("no/such/model", finetune="full", loraplus_lr_ratio=4.0)
    with pytest.raises(ConfigParseError, match=r"finetune 'full' has none") as err:
        parse_config(["--config", "deploy/configs/demo_summary_full.yaml", "--model.loraplus_lr_ratio", "4",
                      "--model.model_name_or_path", "b", "--data.prepared_dir", "d"], quiet=True)
    assert "\n" not in str(err.value)
    config = parse_config(["--config", "deploy/configs/demo_summary_lora.yaml", "--model.loraplus_lr_ratio",
                           "16", "--model.model_name_or_path", "b", "--data.prepared_dir", "d"], quiet=True)
    assert config.model.loraplus_lr_ratio == 16.0


@pytest.mark.parametrize("name, dora, ratio", [("lora", False, None), ("dora", True, None),
                                               ("loraplus", False, 16.0)])
def test_demo_variant_configs_differ_from_lora_in_their_switch_only(name, dora, ratio):
    def parsed(config: str):
        return parse_config(["--config", f"deploy/configs/demo_summary_{config}.yaml",
                             "--model.model_name_or_path", "b", "--data.prepared_dir", "d"], quiet=True)

    config, lora = parsed(name), parsed("lora")
    assert (config.model.lora.use_dora, config.model.loraplus_lr_ratio) == (dora, ratio)
    config.model.lora.use_dora, config.model.loraplus_lr_ratio = False, None
    config.model.output_dir = lora.model.output_dir
    assert (config.model, config.trainer, config.data) == (lora.model, lora.trainer, lora.data)
