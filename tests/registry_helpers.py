"""Builders shared by the registry tests (not a test module): adapters with random weights over the
tiny T5 from conftest, and real `build_report` reports with chosen ROUGE scores.

Scores are controlled through the predictions: of `N` examples, the first `k` predictions equal
their reference (ROUGE 1.0) and the rest share no word with it (0.0), so every ROUGE mean is k/N.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lora_module import LoraConfig, LoraModel, load_base_model
from lora_module.adapter_io import write_prompt_settings
from lora_module.evaluation.evaluate import evaluate_predictions
from lora_module.evaluation.report import build_report
from lora_module.files import sha256_file
from lora_module.prompt import PromptSettings

N_EXAMPLES = 8
REFERENCES = [f"alice meets bob at the cafe number {i}" for i in range(N_EXAMPLES)]
PROMPTS = [f"summary dialogue person said agreed {i} will call back later" for i in range(N_EXAMPLES)]
MISS = "zzz qqq"
AS_GIVEN = PromptSettings()  # no template: texts are complete prompts


def weights_sha(adapter_dir: Path) -> str:
    return sha256_file(adapter_dir / "adapter_model.safetensors")


def make_adapter(base_dir: Path, out: Path, seed: int, data_fingerprint: str = "data-A",
                 prompt: PromptSettings | None = AS_GIVEN) -> tuple[Path, LoraModel]:
    """A LoRA adapter (r=4 on q, v) whose B is random (nonzero effect), saved in PEFT format with
    `prompt` in its sidecar (default: texts are complete prompts, as these tests send them; None:
    no prompt settings, as a PEFT-made adapter)."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"])
    model = LoraModel(load_base_model(str(base_dir)), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.eval()
    path = model.save_pretrained(out, base_model_name_or_path=str(base_dir),
                                 metadata={"finetune": "lora", "data_fingerprint": data_fingerprint})
    if prompt is not None:
        write_prompt_settings(path, prompt)
    return Path(path), model


def make_report(out: Path, adapter_dir: Path, lora_hits: int, base_hits: int,
                data_fingerprint: str = "data-A", task: str = "demo") -> Path:
    """report.json (+ md, png, csv) via the real evaluation code: base and lora scored k/N each."""
    def preds(k: int) -> list[str]:
        return REFERENCES[:k] + [MISS] * (N_EXAMPLES - k)

    data = {"fingerprint": data_fingerprint, "name": "demo"}
    evals = [
        evaluate_predictions("base", preds(base_hits), REFERENCES, out, prompts=PROMPTS, kind="base",
                             data=data, n_resamples=20),
        evaluate_predictions("lora", preds(lora_hits), REFERENCES, out, prompts=PROMPTS, kind="lora",
                             data=data, fingerprints={"adapter_sha256": weights_sha(adapter_dir)},
                             n_resamples=20),
    ]
    return build_report(task, evals, out, n_resamples=20)


def make_candidate(root: Path, base_dir: Path, seed: int, lora_hits: int, base_hits: int = 1,
                   data_fingerprint: str = "data-A", prompt: PromptSettings | None = AS_GIVEN
                   ) -> tuple[Path, Path, LoraModel]:
    """Adapter + report in `root/adapter`, `root/eval`: what training + evaluation leave on disk."""
    adapter, model = make_adapter(base_dir, root / "adapter", seed, data_fingerprint, prompt)
    report = make_report(root / "eval", adapter, lora_hits, base_hits, data_fingerprint)
    return adapter, report, model


def generate_texts(model, tokenizer, texts: list[str], max_new_tokens: int = 12) -> list[str]:
    from lora_module.evaluation.generation import GenerationConfig, generate

    return generate(model, tokenizer, texts, GenerationConfig(max_new_tokens=max_new_tokens))
