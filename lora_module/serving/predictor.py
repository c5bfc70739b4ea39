"""An adapter on its base with the prompt settings it was trained with: raw texts in, outputs out.

    from lora_module.serving.predictor import AdapterPredictor, load_adapter_with_base
    model, tokenizer = load_adapter_with_base("runs/x/adapter")       # the adapter's recorded base
    predictor = AdapterPredictor.from_adapter("runs/x/adapter")        # ... and its prompt settings
    predictor.predict(["#Person1#: Hi ..."], {"max_new_tokens": 64})

The one predict path: the pyfunc model, `lora-pipeline predict` and `serving.load_predictor` use
it. The prompt template and lengths come from the adapter itself (its sidecar, written at export or
registration: `adapter_io.read_prompt_settings`); an adapter without them is refused rather than
guessed at. Decoding is greedy by default, exactly as in evaluation (`evaluation.generation`).
A base loaded here goes to CUDA where available, in bf16 where the GPU supports it (fp16 on older
GPUs) with TF32 and SDPA on; on CPU it stays as saved (`inference_base`, `lora_module.device`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lora_module import contracts
from lora_module.config import torch_dtype
from lora_module.device import AUTO, enable_cuda_fast_paths, generation_dtype, resolve_device
from lora_module.errors import AdapterLoadError, PipelineError
from lora_module.prompt import PromptSettings

# Decoding settings a caller may pass as predict params (defaults: GenerationConfig's).
GENERATION_PARAMS = ("max_new_tokens", "num_beams", "batch_size")


class PredictInputError(PipelineError, ValueError):
    """Bad predict input or params: unknown or non-integer params, texts that are not strings."""


class MissingPromptError(PipelineError, ValueError):
    """An adapter that does not say which prompt template and lengths it was trained with."""


def generation_config(params: dict[str, Any] | None) -> Any:
    """GenerationConfig (greedy by default, as in evaluation) from predict params."""
    from lora_module.evaluation.generation import GenerationConfig

    params = {k: v for k, v in (params or {}).items() if v is not None}
    unknown = sorted(set(params) - set(GENERATION_PARAMS))
    if unknown:
        raise PredictInputError(f"unknown predict params {unknown}; valid: {sorted(GENERATION_PARAMS)}")
    try:
        return GenerationConfig(**{k: int(v) for k, v in params.items()})
    except (TypeError, ValueError) as e:
        raise PredictInputError(f"predict params {params}: {e}") from e


def prompt_settings(adapter_dir: str | Path) -> PromptSettings:
    """The prompt settings recorded in the adapter's sidecar; MissingPromptError when it has none."""
    from lora_module.adapter_io import read_prompt_settings

    settings = read_prompt_settings(Path(adapter_dir))
    if settings is None:
        raise MissingPromptError(
            f"adapter {adapter_dir} records no prompt settings ({contracts.ADAPTER_SIDECAR_FILE} has no "
            "'prompt'): export it with `lora-pipeline fit`, or register it with `lora-pipeline register "
            "TASK ADAPTER --prepared PREPARED_DIR` to take them from the data it was trained on")
    return settings


def inference_base(base: str | Path, *, quantize: str | None = None, device: str | torch.device = AUTO,
                   dtype: str | None = AUTO) -> tuple[Any, torch.device]:
    """`(base model, device)`: the base loaded for generation in `dtype` ('auto': lora_module.device's
    choice for `device`; an explicit name wins), with SDPA attention and TF32 on CUDA. The caller moves
    the model to the device once its adapters are on (a 4-bit base on CUDA is already there)."""
    from lora_module import load_base_model

    where = resolve_device(device)
    enable_cuda_fast_paths(where)
    dtype = generation_dtype(where, dtype)
    model = load_base_model(str(base), quantize=quantize, torch_dtype=torch_dtype(dtype), device=where)
    return model, where


def load_adapter_with_base(
    adapter_dir: str | Path,
    base: Any = None,
    force: bool = False,
    tokenizer_dir: str | Path | None = None,
    adapter_name: str = "default",
    quantize: str | None = None,
    device: str | torch.device = AUTO,
    dtype: str | None = AUTO,
) -> tuple[Any, Any]:
    """`(LoraModel, tokenizer)`: base (`base` path/model, else the adapter's recorded base) + adapter.

    A base whose weights fingerprint differs from the adapter's is refused
    (FingerprintMismatchError) unless `force`. `quantize="nf4"` loads a path base in 4 bit. A path
    base is loaded by `inference_base` (`device`, `dtype`) and the model moved to that device; a model
    given as `base` is used where and as it is. The tokenizer comes from `tokenizer_dir`, else the
    adapter folder if it holds one, else the base.
    """
    from transformers import AutoTokenizer

    from lora_module import FingerprintMismatchError, LoraModel, read_adapter_config

    adapter_dir = Path(adapter_dir)
    base = base if base is not None else read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if base is None:
        raise AdapterLoadError(
            f"adapter {adapter_dir} records no base_model_name_or_path; pass the base explicitly")
    base_model, where = (inference_base(base, quantize=quantize, device=device, dtype=dtype)
                         if isinstance(base, str | Path) else (base, None))
    try:
        model = LoraModel.from_pretrained(base_model, adapter_dir, adapter_name=adapter_name, force=force)
    except FingerprintMismatchError as e:
        raise FingerprintMismatchError(
            f"refusing to load adapter {adapter_dir} onto base "
            f"{base if isinstance(base, str | Path) else type(base).__name__}: "
            f"{e}. Use the base it was trained on, or force=True (CLI --force) to load it anyway"
        ) from e
    if where is not None:
        model.to(where)
    model.eval()
    if tokenizer_dir is None:
        if any((adapter_dir / f).is_file() for f in contracts.TOKENIZER_FILES):
            tokenizer_dir = adapter_dir
        elif isinstance(base, str | Path):
            tokenizer_dir = base
        else:
            tokenizer_dir = getattr(base_model.config, "_name_or_path", None)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return model, tokenizer


@dataclass
class AdapterPredictor:
    """A loaded adapter with the prompt settings it was trained with: raw texts in, outputs out."""

    model: Any
    tokenizer: Any
    prompt: PromptSettings

    @classmethod
    def from_adapter(cls, adapter_dir: str | Path, max_source_length: int | None = None,
                     **load: Any) -> AdapterPredictor:
        """Load `adapter_dir` on its base (`load`: load_adapter_with_base's keywords) with its recorded
        prompt settings; `max_source_length` overrides the recorded limit (the difference is logged)."""
        prompt = prompt_settings(adapter_dir)
        if max_source_length is not None:
            prompt = replace(prompt, max_source_length=prompt.resolve("max_source_length", max_source_length))
        model, tokenizer = load_adapter_with_base(adapter_dir, **load)
        return cls(model, tokenizer, prompt)

    def predict(self, texts: list[str], params: dict[str, Any] | None = None) -> list[str]:
        """The task's template applied to each text, prompts cut as in training, greedy by default."""
        from lora_module.evaluation.generation import generate

        gen = generation_config(params).with_settings(self.prompt)
        # Over-long inputs lose their end, not the template's instruction (as the data stage cut them).
        prompt = replace(self.prompt, max_source_length=gen.max_source_length)
        return generate(self.model, self.tokenizer, prompt.render(texts, self.tokenizer), gen)
