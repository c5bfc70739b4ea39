"""The MLflow pyfunc model of a registered adapter: base + adapter loaded in `load_context`,
texts in, generated texts out.

    import mlflow
    model = mlflow.pyfunc.load_model("models:/dialogsum-lora@champion")
    model.predict({"text": ["Summarize: ..."]})             # -> ["...", ...]
    model.predict(pd.DataFrame({"text": [...]}), params={"max_new_tokens": 64})
    # another base location (same weights), a 4-bit base, or a forced load onto another base:
    mlflow.pyfunc.load_model(uri, model_config={"base": "/models/flan-t5-base", "quantize": "nf4"})

The model's artifacts are the PEFT-format adapter folder (`adapter`) and, when the evaluation
used one, the prepared data's tokenizer (`tokenizer`), and the base's record (`base`). The base is
`model_config["base"]`, else `LORA_BASE_MODEL_PATH`, else the adapter's recorded folder where it
exists, else the copy logged once to the tracking server, else the recorded Hub id
(`lora_module.registry.bases`), and its weights fingerprint must match the adapter's unless
`model_config["force"]` is true; it is loaded unquantized (as in evaluation) unless
`model_config["quantize"]` is "nf4". Inputs are a `text` column; MLflow's schema check refuses a
bare list. When the registration knew the prepared data
the adapter was trained on, its prompt template and `max_source_length` travel with the model
(artifact `prompt`, `lora_module.prompt.PromptSettings`): each text is then the raw input (e.g. a
dialogue) and the task's template is applied, exactly as the training rows were built; without
it, texts are complete prompts. `model_config["max_source_length"]` overrides the recorded limit
(the difference is logged). Decoding is greedy by default, exactly as in evaluation
(`lora_module.evaluation.generation`).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

from lora_module.prompt import PromptSettings
from lora_module.registry.bases import BaseRecord, ensure_base_logged, resolve_base

# Decoding settings a caller may pass as predict params (defaults: GenerationConfig's).
GENERATION_PARAMS = ("max_new_tokens", "num_beams", "batch_size")
PROMPT_FILE = "prompt.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json")


def model_signature() -> ModelSignature:
    """Input: a string column `text`; output: one generated string per row; decoding params (None:
    GenerationConfig's default, lengths from the training settings)."""
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "text")]),
        outputs=Schema([ColSpec(DataType.string)]),
        params=ParamSchema([ParamSpec(k, DataType.long, None) for k in GENERATION_PARAMS]),
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
    return GenerationConfig(**{k: int(v) for k, v in (params or {}).items() if v is not None})


def read_prompt_settings(folder: str | Path | None) -> PromptSettings:
    """The prompt settings logged with a model (`folder/prompt.json`); none recorded: texts are prompts."""
    file = Path(folder) / PROMPT_FILE if folder is not None else None
    if file is None or not file.is_file():
        return PromptSettings()
    return PromptSettings.from_dict(json.loads(file.read_text()))


@dataclass
class AdapterPredictor:
    """A loaded adapter with the prompt settings it was trained with: raw texts in, outputs out.

    The one predict path: the pyfunc model, `registry.cli predict` and `load_registered` use it.
    """

    model: Any
    tokenizer: Any
    prompt: PromptSettings

    def predict(self, texts: list[str], params: dict[str, Any] | None = None) -> list[str]:
        """The task's template applied to each text, prompts cut as in training, greedy by default."""
        from lora_module.evaluation.generation import generate

        gen = generation_config(params).with_settings(self.prompt)
        # Over-long inputs lose their end, not the template's instruction (as the data stage cut them).
        prompt = replace(self.prompt, max_source_length=gen.max_source_length)
        return generate(self.model, self.tokenizer, prompt.render(texts, self.tokenizer), gen)


def pyfunc_code_files(modules: tuple[str, ...] = (__name__,)) -> list[Path]:
    """The lora_module files a pyfunc needs (paths relative to the folder holding `lora_module/`):
    the import closure of `modules`, found in the source text (`lora_module.<dotted name>` and
    `from lora_module[.<package>] import <names>`), with the `__init__.py` of every package on the way."""
    root = Path(__file__).resolve().parents[2]
    todo, seen = [*modules, "lora_module"], set()
    while todo:
        name = todo.pop()
        file = _module_file(root, name)
        if name in seen or file is None:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages
        text = file.read_text()
        todo += re.findall(r"\b(lora_module(?:\.\w+)+)", text)
        for package, names in re.findall(r"from (lora_module(?:\.\w+)*) import \(?([\w\s,]+)\)?", text):
            todo += [f"{package}.{n.strip()}" for n in names.split(",") if n.strip()]
    return sorted(_module_file(root, n).relative_to(root) for n in seen)


def _module_file(root: Path, name: str) -> Path | None:
    """The source file of module or package `name` under `root`, or None (a class, a function)."""
    base = root.joinpath(*name.split("."))
    for file in (base / "__init__.py", base.with_suffix(".py")):
        if file.is_file():
            return file
    return None


# Models-from-code entry point: MLflow imports it on load instead of unpickling an object.
_MODEL_CODE = """\
import mlflow

from lora_module.registry.pyfunc import LoraAdapterModel

mlflow.models.set_model(LoraAdapterModel())
"""


def log_adapter_model(run_id: str, adapter_dir: Path, tokenizer_dir: Path | None = None,
                      prompt: PromptSettings | None = None, experiment_id: str | None = None) -> Any:
    """Log the adapter folder as pyfunc model `adapter` of run `run_id`; returns MLflow's ModelInfo.

    `prompt`: the template and lengths the adapter was trained with (artifact `prompt`). The
    lora_module files it imports travel with it (`code_paths`), so it loads wherever MLflow and
    `pip_requirements()` are installed, without this project. The run is neither started nor
    ended here (its status is the registration's to set), and the logged model is created first
    with `source_run_id`, so a broken-off upload leaves a PENDING model the registration can find.
    """
    from mlflow import MlflowClient
    from mlflow.models import Model

    artifacts = {"adapter": str(adapter_dir)}
    if tokenizer_dir is not None:
        artifacts["tokenizer"] = str(tokenizer_dir)
    client = MlflowClient()
    base = adapter_base_record(adapter_dir, client)
    experiment_id = experiment_id or client.get_run(run_id).info.experiment_id
    model = client.create_logged_model(experiment_id, name="adapter", source_run_id=run_id)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # No input example on purpose: MLflow would load base + adapter just to validate it.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        if prompt is not None:
            (Path(tmp) / "prompt").mkdir()
            (Path(tmp) / "prompt" / PROMPT_FILE).write_text(json.dumps(prompt.to_dict(), indent=2))
            artifacts["prompt"] = str(Path(tmp) / "prompt")
        if base is not None:
            artifacts["base"] = str(base.write(Path(tmp) / "base"))
        code = copy_code_files(Path(tmp) / "code")
        entry = Path(tmp) / "lora_adapter_model.py"
        entry.write_text(_MODEL_CODE)
        # Model.log, not mlflow.pyfunc.log_model: it takes `run_id`, so no fluent run is started
        # (whose exit would mark the run FINISHED before the version exists).
        return Model.log(
            artifact_path=None, name="adapter", flavor=mlflow.pyfunc, run_id=run_id, model_id=model.model_id,
            python_model=str(entry), artifacts=artifacts, code_paths=[str(code / "lora_module")],
            signature=model_signature(), pip_requirements=pip_requirements(),
        )


def copy_code_files(code: Path, modules: tuple[str, ...] = (__name__,)) -> Path:
    """`pyfunc_code_files(modules)` copied under `code`; returns `code`."""
    root = Path(__file__).resolve().parents[2]
    for f in pyfunc_code_files(modules):
        (code / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, code / f)
    return code


def adapter_base_record(adapter_dir: Path, client: Any = None) -> BaseRecord | None:
    """The adapter's base as a portable record (a local folder logged once; `bases`); None when the
    adapter names no base or no fingerprint."""
    from lora_module.adapter_io import read_adapter_config

    config = read_adapter_config(adapter_dir)
    name, fingerprint = config.get("base_model_name_or_path"), config.get("base_fingerprint")
    if not name or not fingerprint:
        return None
    return ensure_base_logged(str(name), str(fingerprint), client)


def bad_request(error: Exception) -> Exception:
    """An input error as MLflow's INVALID_PARAMETER_VALUE: the scoring server answers 400 with the message."""
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(f"{type(error).__name__}: {error}")


class LoraAdapterModel(mlflow.pyfunc.PythonModel):
    """pyfunc flavour of a LoRA adapter; see the module docstring for inputs and model_config."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = dict(context.model_config or {})
        tokenizer_dir = context.artifacts.get("tokenizer")
        base = resolve_base(BaseRecord.read(context.artifacts.get("base")), config.get("base"))
        self.model, self.tokenizer = load_adapter_with_base(
            context.artifacts["adapter"], base=base, force=bool(config.get("force", False)),
            tokenizer_dir=tokenizer_dir, quantize=config.get("quantize"),
        )
        prompt = read_prompt_settings(context.artifacts.get("prompt"))
        if config.get("max_source_length") is not None:
            length = prompt.resolve("max_source_length", int(config["max_source_length"]))
            prompt = replace(prompt, max_source_length=length)
        self.predictor = AdapterPredictor(self.model, self.tokenizer, prompt)
        import torch

        if torch.cuda.is_available():
            self.model.to("cuda")

    # `pd.DataFrame` as the hint: MLflow then validates against the logged signature (a `text`
    # column) instead of inferring a schema from the hint; lists of strings work as well.
    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> list[str]:
        try:
            texts = texts_from_input(model_input)
            generation_config(params)  # unknown or bad params: the caller's error
        except (TypeError, ValueError) as e:
            raise bad_request(e) from e
        return self.predictor.predict(texts, params)
