"""On a CUDA GPU: the LoRA core in bf16 vs PEFT, merge, QLoRA (NF4), Lightning training and the pipeline.

    .venv/bin/pytest tests/test_gpu.py -q -m gpu      # skipped, saying why, on a machine without CUDA
    bash benchmarks/gpu_check.sh                      # these tests, then the GPU benchmark (<= 8 minutes)

The rest of the suite runs on the CPU; these tests check what only a GPU exercises: CUDA kernels for
the base model and our LoRA layers in bf16 (against PEFT on the same weights), merging on the device,
greedy generation, bitsandbytes' CUDA NF4 kernels under a LoRA adapter, LoRA and QLoRA training steps
through FineTuneModule + Trainer(accelerator="gpu") in bf16, and `lora-pipeline run` on a tiny task.
On the CPU they are collected (so they import and parse) and skipped.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import lightning as L
import peft
import pytest
import torch
from conftest import make_tiny_llama, make_tiny_t5, tiny_llama_config, tiny_t5_config
from test_flows import TRAIN, write_spec
from test_training import prepare_tiny
from torch import nn
from transformers import AutoTokenizer, LlamaForCausalLM, T5ForConditionalGeneration

from lora_module import LoraConfig, LoraModel, quantize_nf4
from lora_module.contracts import ADAPTER_CONFIG_FILE, ADAPTER_DIR, METRICS_FILE
from lora_module.layers import is_linear4bit
from lora_module.training.datamodule import PreparedDataModule
from lora_module.training.module import FineTuneModule

NO_CUDA = "needs a CUDA GPU: torch.cuda.is_available() is False (no GPU, or a CPU build of torch)"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]

DEVICE = "cuda"
ARCHS = {"t5": (make_tiny_t5, "SEQ_2_SEQ_LM", ["q", "v", "wi"]),
         "llama": (make_tiny_llama, "CAUSAL_LM", ["q_proj", "v_proj", "down_proj"])}
# bf16 keeps 8 significant bits; PEFT and we add the same fp32 LoRA output to the same bf16 base output,
# so what differs is at most a few bf16 roundings of the logits (torch's own bf16 default is rtol 1.6e-2).
BF16_TOL = {"rtol": 1.6e-2, "atol": 1e-2}


def _batch(arch: str) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 17, 42, 99, 7, 1], [8, 300, 12, 1, 0, 0]])
    mask = (ids != 0).long()
    labels = (torch.tensor([[20, 21, 22, 1], [30, 31, 1, -100]]) if arch == "t5"
              else ids.masked_fill(mask == 0, -100))
    return {k: v.to(DEVICE) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def _randomize(model: LoraModel, seed: int = 0) -> None:
    """Non-zero A and B (B starts at zeros), so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _bf16_pair(arch: str) -> tuple[LoraModel, peft.PeftModel, nn.Module]:
    """Ours and PEFT's over identical bf16 bases on the GPU, with the same fp32 A and B; and the bare base."""
    make, task, targets = ARCHS[arch]
    config = {"r": 4, "lora_alpha": 8, "target_modules": targets}
    ours = LoraModel(make().to(DEVICE, torch.bfloat16), LoraConfig(**config))
    theirs = peft.get_peft_model(make().to(DEVICE, torch.bfloat16), peft.LoraConfig(task_type=task, **config))
    _randomize(ours)
    with torch.no_grad():
        for path, layer in ours.lora_layers():
            for part in ("lora_A", "lora_B"):
                weight = getattr(layer, part)["default"].weight
                assert weight.dtype == torch.float32 and weight.device.type == DEVICE, (path, weight.dtype)
                theirs.get_parameter(f"base_model.model.{path}.{part}.default.weight").copy_(weight)
    return ours, theirs, make().to(DEVICE, torch.bfloat16)


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_bf16_forward_and_backward_match_peft_on_cuda(arch):
    ours, theirs, base = _bf16_pair(arch)
    inputs = _batch(arch)
    with torch.no_grad():
        ours_logits, theirs_logits = ours.eval()(**inputs).logits, theirs.eval()(**inputs).logits
        base_logits = base.eval()(**inputs).logits
    assert ours_logits.dtype == torch.bfloat16 and ours_logits.device.type == DEVICE
    torch.testing.assert_close(ours_logits, theirs_logits, **BF16_TOL)
    # ... and the adapter's effect is far above that tolerance, so the comparison means something
    assert (ours_logits.float() - base_logits.float()).abs().max() > 10 * BF16_TOL["atol"]

    ours.train()
    theirs.train()
    loss_ours, loss_theirs = ours(**inputs).loss, theirs(**inputs).loss
    torch.testing.assert_close(loss_ours, loss_theirs, **BF16_TOL)
    loss_ours.backward()
    loss_theirs.backward()
    checked = 0
    for name, p in ours.named_parameters():
        if p.requires_grad:
            q = theirs.get_parameter("base_model." + name)
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.count_nonzero(p.grad) > 0
            # relative to the gradient's size: bf16 activations round each element differently
            assert (p.grad - q.grad).norm() <= 2e-2 * q.grad.norm(), name
            checked += 1
    assert checked == 2 * len(list(ours.lora_layers()))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, {"rtol": 1e-4, "atol": 1e-4}),
                                            (torch.bfloat16, BF16_TOL)])
def test_merge_and_unmerge_on_cuda(dtype, tol):
    lm = LoraModel(make_tiny_llama().to(DEVICE, dtype), LoraConfig(r=4, lora_alpha=8,
                                                                    target_modules=["q_proj", "v_proj"]))
    _randomize(lm)
    inputs = _batch("llama")
    weights = {path: layer.base_layer.weight.detach().clone() for path, layer in lm.lora_layers()}
    with torch.no_grad():
        expected = lm.eval()(**inputs).logits
        lm.merge_adapter()
        merged = lm(**inputs).logits
        lm.merge_adapter()  # idempotent: a second merge adds nothing
        again = lm(**inputs).logits
    assert torch.equal(merged, again)
    torch.testing.assert_close(merged, expected, **tol)
    moved = [path for path, layer in lm.lora_layers()
             if not torch.equal(layer.base_layer.weight, weights[path])]
    assert moved == list(weights)  # the adapter really went into every targeted weight

    lm.unmerge_adapter()
    for path, layer in lm.lora_layers():
        weight = layer.base_layer.weight
        assert weight.device.type == DEVICE and weight.dtype == dtype
        # fp32: W + d - d rounds twice at 2^-24; bf16: at most two roundings of 2^-8 of |W + d|
        torch.testing.assert_close(weight, weights[path], **tol)
    with torch.no_grad():
        torch.testing.assert_close(lm(**inputs).logits, expected, **tol)


def _nf4_llama() -> LlamaForCausalLM:
    """The tiny Llama at hidden size 64: every projection is a multiple of the NF4 block size."""
    config = tiny_llama_config(512)
    config.hidden_size, config.head_dim = 64, 16
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_qlora_nf4_forward_and_backward_on_cuda(compute_dtype):
    base = quantize_nf4(_nf4_llama().to(DEVICE), compute_dtype=compute_dtype)
    quantized = [m for m in base.modules() if is_linear4bit(m)]
    assert len(quantized) == 14 and all(m.weight.device.type == DEVICE for m in quantized)  # 7 per layer
    lm = LoraModel(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    _randomize(lm)
    inputs = _batch("llama")
    with torch.no_grad():
        logits = lm.eval()(**inputs).logits
    # Reference: the same model with every 4-bit layer dequantized into a plain fp32 nn.Linear.
    with pytest.warns(UserWarning, match="dequantized"):
        plain = copy.deepcopy(lm).merge_and_unload(torch.float32)
    assert not any(is_linear4bit(m) for m in plain.modules())
    with torch.no_grad():
        reference = plain.float()(**inputs).logits
    tol = {"rtol": 1e-4, "atol": 1e-4} if compute_dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(logits.float(), reference, **tol)

    lm.train()
    lm(**inputs).loss.backward()
    grads = {n: p.grad for n, p in lm.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.count_nonzero(g) > 0 for g in grads.values())
    assert all(m.weight.grad is None for m in quantized)  # the 4-bit base stays frozen


# ---- generation: ours (unmerged and merged) against PEFT, greedy, bf16 ------------------------------------
def _teacher_forced(model: nn.Module, arch: str, prompt: dict, seq: torch.Tensor) -> torch.Tensor:
    """Logits at every generated position of `seq` (generate's output), fed back as teacher-forced input."""
    with torch.no_grad():
        if arch == "t5":
            return model(**prompt, decoder_input_ids=seq[:, :-1]).logits.float()
        n = prompt["input_ids"].shape[1]
        return model(input_ids=seq[:, :-1]).logits[:, n - 1:].float()


def _near_argmax(logits: torch.Tensor, chosen: torch.Tensor) -> None:
    """Every chosen token is the argmax of `logits` up to bf16 rounding (greedy ties may break either way)."""
    picked = logits.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    top = logits.max(-1).values
    assert (top - picked <= BF16_TOL["atol"] + BF16_TOL["rtol"] * top.abs()).all(), (top - picked).max()


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_greedy_generation_matches_peft_on_cuda(arch):
    ours, theirs, _ = _bf16_pair(arch)
    ours.eval()
    theirs.eval()
    # one unpadded row: a decoder-only model generates after its last prompt token
    prompt = {k: v[:1] for k, v in _batch(arch).items() if k != "labels"}
    kw = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        peft_seq = theirs.generate(**prompt, **kw)
        ours_seq = ours.generate(**prompt, **kw)
    new = (lambda seq: seq[:, 1:]) if arch == "t5" else (lambda seq: seq[:, prompt["input_ids"].shape[1]:])
    assert new(ours_seq).shape == new(peft_seq).shape == (1, 8) and ours_seq.device.type == DEVICE
    # each model's tokens are greedy choices under the other's logits
    _near_argmax(_teacher_forced(ours, arch, prompt, peft_seq), new(peft_seq))
    _near_argmax(_teacher_forced(theirs, arch, prompt, ours_seq), new(ours_seq))
    ours.merge_adapter()
    with torch.no_grad():
        merged_seq = ours.generate(**prompt, **kw)
    _near_argmax(_teacher_forced(theirs, arch, prompt, merged_seq), new(merged_seq))


# ---- LoRA and QLoRA through the real Lightning path, bf16 on the GPU -------------------------------------
TINY = {"t5": ("seq2seq_tokenizer_dir", "seq2seq", ["q", "v"]),
        "llama": ("causal_tokenizer_dir", "causal", ["q_proj", "v_proj"])}
OPTIMIZER_CLASSES = {"adamw": "AdamW", "paged_adamw_8bit": "PagedAdamW8bit"}


def _width64_base(arch: str, tokenizer_dir: Path, out: Path) -> Path:
    """The tiny model at width 64, saved with its tokenizer: every projection is NF4-quantizable."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if arch == "t5":
        config = tiny_t5_config(len(tok))
        config.d_model, config.d_kv, config.d_ff = 64, 16, 64
        model = T5ForConditionalGeneration(config)
    else:
        config = tiny_llama_config(len(tok))
        config.hidden_size, config.head_dim = 64, 16
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize(("finetune", "optimizer"), [("lora", "adamw"), ("qlora", "paged_adamw_8bit")])
@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_lightning_training_steps_on_cuda(arch, finetune, optimizer, request, tmp_path):
    tokenizer_fixture, model_type, targets = TINY[arch]
    tokenizer_dir = request.getfixturevalue(tokenizer_fixture)
    prepared = prepare_tiny(tokenizer_dir, model_type, tmp_path / "prepared")
    L.seed_everything(0)
    module = FineTuneModule(str(_width64_base(arch, tokenizer_dir, tmp_path / "base")), finetune=finetune,
                            lora=LoraConfig(r=4, lora_alpha=8, target_modules=targets), learning_rate=1e-2,
                            torch_dtype="bfloat16", optimizer=optimizer, output_dir=str(tmp_path / "run"))
    base_before = {n: p.detach().clone() for n, p in module.model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=PreparedDataModule(str(prepared), batch_size=4))
    assert type(trainer.optimizers[0]).__name__ == OPTIMIZER_CLASSES[optimizer]

    params = dict(module.model.named_parameters())
    assert all(p.device.type == DEVICE for p in params.values())
    assert all(lora_before[n].dtype == torch.float32 for n in lora_before)  # adapters train in fp32
    assert all(not torch.equal(lora_before[n].to(DEVICE), params[n]) for n in lora_before)
    assert all(torch.equal(base_before[n].to(DEVICE), params[n]) for n in base_before)  # frozen base
    quantized = [m for m in module.model.modules() if is_linear4bit(m)]
    if finetune == "qlora":
        assert quantized and all(m.weight.device.type == DEVICE for m in quantized)
    else:
        assert not quantized
        assert {p.dtype for n, p in params.items() if n in base_before} == {torch.bfloat16}
    metrics = json.loads((tmp_path / "run" / METRICS_FILE).read_text())
    assert metrics["steps"] == 3 and metrics["finetune"] == finetune and metrics["tokens_per_sec"] > 0
    assert (tmp_path / "run" / ADAPTER_DIR / ADAPTER_CONFIG_FILE).is_file()


# ---- the whole tiny pipeline on CUDA -----------------------------------------------------------------
def test_pipeline_run_on_cuda(harness, tmp_path, tiny_t5_dir, capsys):
    """`lora-pipeline run` on a tiny task: prepare, fit on the GPU in bf16, evaluate, register."""
    from lora_pipeline.flows.cli import main

    gpu = ["--trainer.accelerator", "gpu", "--model.torch_dtype", "bfloat16"]  # fails without a GPU
    spec = write_spec(tmp_path, "tiny_summary", "summary", tiny_t5_dir, full=False,
                      train_overrides=TRAIN + gpu)
    assert main(["run", "--task", str(spec), "--home", str(tmp_path / "home"), "--no-full"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[re.search(r"^\{$", out, re.M).start():])  # the summary printed last
    assert summary["failed"] == {} and summary["results"]["tiny_summary"]["version"] == "1"
