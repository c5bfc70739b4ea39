"""The MLflow pyfunc model of a registered adapter: base + adapter loaded in `load_context`,
texts in, generated texts out.

    import mlflow
    model = mlflow.pyfunc.load_model("models:/dialogsum-lora@champion")
    model.predict({"text": ["Summarize: ..."]})             # -> ["...", ...]
    model.predict(pd.DataFrame({"text": [...]}), params={"max_new_tokens": 64})
    # another base location (same weights), a 4-bit base, or a forced load onto another base:
    mlflow.pyfunc.load_model(uri, model_config={"base": "/models/flan-t5-base", "quantize": "nf4"})

The model's artifacts are the PEFT-format adapter folder (`adapter`) and, when the evaluation
used one, the prepared data's tokenizer (`tokenizer`). The base model is read from the adapter's
`base_model_name_or_path` (a Hub id or a folder) unless `model_config["base"]` is given, and its
weights fingerprint must match the adapter's unless `model_config["force"]` is true; it is loaded
unquantized (as in evaluation) unless `model_config["quantize"]` is "nf4". Inputs are the model
prompts (the prepared data's `prompt` column), a `text` column; MLflow's schema check refuses a
bare list. Decoding is greedy by default, exactly as in evaluation (`lora_module.evaluation.generation`).
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

# Decoding settings a caller may pass as predict params (with these defaults).
GENERATION_PARAMS: dict[str, int] = {"max_new_tokens": 128, "num_beams": 1, "batch_size": 8}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json")


def model_signature() -> ModelSignature:
    """Input: a string column `text`; output: one generated string per row; decoding params."""
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "text")]),
        outputs=Schema([ColSpec(DataType.string)]),
        params=ParamSchema([ParamSpec(k, DataType.long, v) for k, v in GENERATION_PARAMS.items()]),
    )


def pip_requirements() -> list[str]:
    """Pinned runtime requirements (given explicitly: MLflow's inference would load the model)."""
    reqs = []
    for dist in ("mlflow", "torch", "transformers", "safetensors", "tokenizers", "pandas", "sentencepiece"):
        try:
            version = importlib.metadata.version(dist).split("+")[0]  # drop local tags like +cpu
        except importlib.metadata.PackageNotFoundError:
            continue
        reqs.append(f"{dist}=={version}")
    return reqs


def _is_listlike(value: Any) -> bool:
    return isinstance(value, list | tuple) or type(value).__name__ == "ndarray"


def texts_from_input(model_input: Any) -> list[str]:
    """A DataFrame with a `text` column (or one column), a list / Series of strings, a single
    string, or a dict {"text": [...]} -> list of strings; anything else is a clear error."""
    if isinstance(model_input, pd.DataFrame):
        if "text" in model_input.columns:
            column = model_input["text"]
        elif model_input.shape[1] == 1:
            column = model_input.iloc[:, 0]
        else:
            raise ValueError(
                f"input DataFrame needs a 'text' column, got columns {list(model_input.columns)}")
        # MLflow turns {"text": [a, b]} into a one-row frame whose cell is the list: flatten it.
        values = [v for cell in column.tolist() for v in (list(cell) if _is_listlike(cell) else [cell])]
    elif isinstance(model_input, dict) and "text" in model_input:
        values = model_input["text"]
        values = [values] if isinstance(values, str) else list(values)
    elif isinstance(model_input, str):
        values = [model_input]
    elif isinstance(model_input, list | tuple | pd.Series):
        values = list(model_input)
    else:
        raise TypeError(
            f"predict takes texts (DataFrame with 'text', list of str), got {type(model_input).__name__}")
    bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if bad:
        raise TypeError(f"every input must be a string; rows {bad[:5]} are not (e.g. {values[bad[0]]!r})")
    return values


def load_adapter_with_base(
    adapter_dir: str | Path,
    base: Any = None,
    force: bool = False,
    tokenizer_dir: str | Path | None = None,
    adapter_name: str = "default",
    quantize: str | None = None,
) -> tuple[Any, Any]:
    """`(LoraModel, tokenizer)`: base (`base` path/model, else the adapter's recorded base) + adapter.

    A base whose weights fingerprint differs from the adapter's is refused
    (FingerprintMismatchError) unless `force`. `quantize="nf4"` loads a path base in 4 bit. The
    tokenizer comes from `tokenizer_dir`, else the adapter folder if it holds one, else the base.
    """
    from transformers import AutoTokenizer

    from lora_module import FingerprintMismatchError, LoraModel, load_base_model, read_adapter_config

    adapter_dir = Path(adapter_dir)
    base = base if base is not None else read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if base is None:
        raise ValueError(
            f"adapter {adapter_dir} records no base_model_name_or_path; pass the base explicitly")
    base_model = load_base_model(str(base), quantize=quantize) if isinstance(base, str | Path) else base
    try:
        model = LoraModel.from_pretrained(base_model, adapter_dir, adapter_name=adapter_name, force=force)
    except FingerprintMismatchError as e:
        raise FingerprintMismatchError(
            f"refusing to load adapter {adapter_dir} onto base "
            f"{base if isinstance(base, str | Path) else type(base).__name__}: "
            f"{e}. Use the base it was trained on, or force=True (CLI --force) to load it anyway"
        ) from e
    model.eval()
    if tokenizer_dir is None:
        has_own = any((adapter_dir / f).is_file() for f in _TOKENIZER_FILES)
        if has_own:
            tokenizer_dir = adapter_dir
        elif isinstance(base, str | Path):
            tokenizer_dir = base
        else:
            tokenizer_dir = getattr(base_model.config, "_name_or_path", None)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return model, tokenizer


def generation_config(params: dict[str, Any] | None) -> Any:
    """GenerationConfig (greedy by default, as in evaluation) from predict params."""
    from lora_module.evaluation.generation import GenerationConfig

    unknown = sorted(set(params or {}) - set(GENERATION_PARAMS))
    if unknown:
        raise ValueError(f"unknown predict params {unknown}; valid: {sorted(GENERATION_PARAMS)}")
    values = {**GENERATION_PARAMS, **{k: int(v) for k, v in (params or {}).items() if v is not None}}
    return GenerationConfig(**values)


def pyfunc_code_files() -> list[Path]:
    """The lora_module files this pyfunc needs: the import closure of this module, found in the
    source text (`lora_module.<name>` and `from lora_module import <names>`)."""
    pkg = Path(__file__).resolve().parent
    todo, seen = [Path(__file__).stem, "__init__"], set()
    while todo:
        mod = todo.pop()
        if mod in seen or not (pkg / f"{mod}.py").is_file():
            continue
        seen.add(mod)
        text = (pkg / f"{mod}.py").read_text()
        todo += re.findall(r"lora_module\.(\w+)", text)
        for names in re.findall(r"from lora_module import \(?([\w\s,]+)\)?", text):
            todo += [n.strip() for n in names.split(",")]
    return sorted(pkg / f"{m}.py" for m in seen)


# Models-from-code entry point: MLflow imports it on load instead of unpickling an object.
_MODEL_CODE = """\
import mlflow

from lora_module.registry.pyfunc import LoraAdapterModel

mlflow.models.set_model(LoraAdapterModel())
"""


def log_adapter_model(run_id: str, adapter_dir: Path, tokenizer_dir: Path | None = None) -> Any:
    """Log the adapter folder as pyfunc model `adapter` of run `run_id`; returns MLflow's ModelInfo.

    The lora_module files it imports travel with it (`code_paths`), so it loads wherever MLflow
    and `pip_requirements()` are installed, without this project.
    """
    artifacts = {"adapter": str(adapter_dir)}
    if tokenizer_dir is not None:
        artifacts["tokenizer"] = str(tokenizer_dir)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), mlflow.start_run(run_id=run_id):
        # No input example on purpose: MLflow would load base + adapter just to validate it.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        code = Path(tmp) / "lora_module"
        code.mkdir()
        for f in pyfunc_code_files():
            shutil.copy2(f, code / f.name)
        entry = Path(tmp) / "lora_adapter_model.py"
        entry.write_text(_MODEL_CODE)
        return mlflow.pyfunc.log_model(
            name="adapter", python_model=str(entry), artifacts=artifacts, code_paths=[str(code)],
            signature=model_signature(), pip_requirements=pip_requirements(),
        )


class LoraAdapterModel(mlflow.pyfunc.PythonModel):
    """pyfunc flavour of a LoRA adapter; see the module docstring for inputs and model_config."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = dict(context.model_config or {})
        tokenizer_dir = context.artifacts.get("tokenizer")
        self.model, self.tokenizer = load_adapter_with_base(
            context.artifacts["adapter"], base=config.get("base"), force=bool(config.get("force", False)),
            tokenizer_dir=tokenizer_dir, quantize=config.get("quantize"),
        )
        import torch

        if torch.cuda.is_available():
            self.model.to("cuda")

    # `pd.DataFrame` as the hint: MLflow then validates against the logged signature (a `text`
    # column) instead of inferring a schema from the hint; lists of strings work as well.
    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> list[str]:
        from lora_module.evaluation.generation import generate

        texts = texts_from_input(model_input)
        return generate(self.model, self.tokenizer, texts, generation_config(params))
