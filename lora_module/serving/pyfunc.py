"""The MLflow pyfunc models: one task's adapter, or many tasks on one base; rows in, texts out.

    import mlflow
    model = mlflow.pyfunc.load_model("models:/summary-lora@champion")
    model.predict({"text": ["#Person1#: ..."]})                       # -> ["...", ...]
    model.predict(pd.DataFrame({"text": [...]}), params={"max_new_tokens": 64})
    model.predict(pd.DataFrame({"messages": [[{"role": "user", "content": "..."}]]}),
                  params={"temperature": 0.7, "seed": 1, "stop": ["\n"]})
    mlflow.pyfunc.load_model(uri, model_config={"base": "/models/flan-t5-base", "quantize": "nf4"})

    tasks = mlflow.pyfunc.load_model("models:/lora-tasks@champion")     # register-multitask
    tasks.predict(pd.DataFrame({"task": ["summary", "topic"], "text": [...]}))

One task (`LoraAdapterModel`): the artifacts are the PEFT-format adapter folder (`adapter`, whose
sidecar holds the prompt settings it was trained with), the tokenizer the evaluation used
(`tokenizer`, if any) and the base's record (`base`). Each text is the raw input (e.g. a dialogue):
the task's template is applied and prompts are cut as in training. The base is
`model_config["base"]`, else `LORA_BASE_MODEL_PATH`, else the recorded folder where it exists, else
its copy logged to the tracking server, else the recorded Hub id (`registry.bases`); its weights
fingerprint must match unless `model_config["force"]`; `model_config["quantize"] = "nf4"` loads it
in 4 bit; `model_config["max_source_length"]` overrides the recorded limit.

Many tasks (`LoraMultiTaskModel`): the artifact `multitask` names the tasks (not their versions);
each task's champion is resolved when the model loads and followed while it serves
(`serving.multitask`). Settings: model_config keys, else environment variables (what
`lora-pipeline serve-model` sets): `refresh_seconds` / `LORA_REFRESH_SECONDS` (default 60; 0: every
request; negative: never).

Rows (both models): a `text`, or `messages` (a conversation: `predictor.Row`). Params:
`predictor.PREDICT_PARAMS` (`param_specs`; sampling when temperature > 0, `stop`, `seed`). Limits,
for both models: `predictor.ServingLimits` (model_config keys `max_rows`, `max_input_chars`,
`max_new_tokens`, `max_total_tokens`, `max_num_beams`, `deadline_seconds`, else `LORA_MAX_ROWS`, ...):
a request over one gets a 400, and generation stops at the deadline.

Both are models-from-code: the logged files are the short lists `SINGLE_TASK_CODE` /
`MULTI_TASK_CODE` (tests check each list is closed under imports), so they load wherever MLflow
and `pip_requirements()` are installed, without this project. Bad input answers HTTP 400.
"""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array, Object, Property

from lora_module import contracts
from lora_module.registry.bases import BaseRecord, resolve_base
from lora_module.serving.predictor import (
    PREDICT_PARAMS,
    AdapterPredictor,
    PredictInputError,
    ServingLimits,
)

# The files each logged model ships (relative to the folder holding lora_module/). Explicit, so
# what a registered model runs is reviewable; tests/test_serving_code.py checks the closure.
SINGLE_TASK_CODE = (
    "lora_module/__init__.py", "lora_module/adapter_io.py", "lora_module/config.py",
    "lora_module/contracts.py", "lora_module/device.py", "lora_module/dora.py", "lora_module/errors.py",
    "lora_module/files.py",
    "lora_module/home.py", "lora_module/init.py", "lora_module/layers.py", "lora_module/lazy.py",
    "lora_module/mixed_batch.py", "lora_module/model.py", "lora_module/names.py", "lora_module/prompt.py",
    "lora_module/qlora.py", "lora_module/redact.py", "lora_module/selection.py",
    "lora_module/evaluation/__init__.py", "lora_module/evaluation/generation.py",
    "lora_module/registry/__init__.py", "lora_module/registry/bases.py", "lora_module/serving/__init__.py",
    "lora_module/serving/predictor.py", "lora_module/serving/pyfunc.py",
)
MULTI_TASK_CODE = (
    *SINGLE_TASK_CODE, "lora_module/registry/retry.py", "lora_module/registry/store.py",
    "lora_module/registry/tracking.py", "lora_module/serving/multitask.py",
)
SINGLE_TASK_ENTRY = "from lora_module.serving.pyfunc import LoraAdapterModel as Model"
MULTI_TASK_ENTRY = "from lora_module.serving.multitask import LoraMultiTaskModel as Model"
_ENTRY = """\
import mlflow

{import_line}

mlflow.models.set_model(Model())
"""


def entry_code(import_line: str) -> str:
    """The models-from-code file MLflow imports on load (instead of unpickling an object)."""
    return _ENTRY.format(import_line=import_line)


def copy_code(code: Path, files: tuple[str, ...]) -> Path:
    """`files` (one of the *_CODE lists) copied under `code`; returns `code / "lora_module"`."""
    root = Path(__file__).resolve().parents[2]
    for f in files:
        (code / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, code / f)
    return code / "lora_module"


def param_specs() -> list[ParamSpec]:
    """The predict params (`predictor.PREDICT_PARAMS`; None: GenerationConfig's default, lengths from
    the training settings). MLflow drops params a signature lacks: `serving.server` refuses them."""
    kinds = {"temperature": DataType.double, "top_p": DataType.double}
    specs = [ParamSpec(k, kinds.get(k, DataType.long), None) for k in PREDICT_PARAMS if k != "stop"]
    return [*specs, ParamSpec("stop", DataType.string, [], shape=(-1,))]


def row_columns() -> list[ColSpec]:
    """A row's input: `text` (a string) or `messages` (a list of {role, content}); in one request
    every row uses the same one (MLflow's schema check cannot mix a list column with missing cells)."""
    turn = Object([Property("role", DataType.string), Property("content", DataType.string)])
    return [ColSpec(DataType.string, "text", required=False),
            ColSpec(Array(turn), "messages", required=False)]


def model_signature() -> ModelSignature:
    """Input: `row_columns()`; output: one generated string per row; the predict params."""
    return ModelSignature(
        inputs=Schema(row_columns()),
        outputs=Schema([ColSpec(DataType.string)]),
        params=ParamSchema(param_specs()),
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


def frame_rows(frame: pd.DataFrame) -> list[Any]:
    """Each row's `messages` where it has them, else its `text` (None where it has neither)."""
    texts = frame["text"].tolist() if "text" in frame.columns else [None] * len(frame)
    messages = frame["messages"].tolist() if "messages" in frame.columns else [None] * len(frame)
    return [m if _is_listlike(m) else t for t, m in zip(texts, messages, strict=True)]


def texts_from_input(model_input: Any) -> list[Any]:
    """Rows from a DataFrame with a `text` and/or `messages` column (or one column), a list / Series
    of strings, a single string, or a dict {"text": [...]}; anything else is a PredictInputError. A
    row is a text or a conversation (`predictor.Row`; checked when it is predicted)."""
    if isinstance(model_input, pd.DataFrame) and "messages" in model_input.columns:
        values = frame_rows(model_input)
    elif isinstance(model_input, pd.DataFrame):
        if "text" in model_input.columns:
            column = model_input["text"]
        elif model_input.shape[1] == 1:
            column = model_input.iloc[:, 0]
        else:
            raise PredictInputError(f"input DataFrame needs a 'text' or 'messages' column, got columns "
                                    f"{list(model_input.columns)}")
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
        raise PredictInputError(
            f"predict takes texts (DataFrame with 'text', list of str), got {type(model_input).__name__}")
    bad = [i for i, v in enumerate(values) if not isinstance(v, str) and not _is_listlike(v)]
    if bad:
        raise PredictInputError(
            f"every input must be a string; rows {bad[:5]} are not (e.g. {values[bad[0]]!r})")
    return values


def bad_request(error: Exception) -> Exception:
    """An input error as MLflow's INVALID_PARAMETER_VALUE: the scoring server answers 400 with the message."""
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(f"{type(error).__name__}: {error}")


def served_base(context: mlflow.pyfunc.PythonModelContext, config: dict[str, Any]) -> str | None:
    """The base to load: model_config's `base`, else as `bases.resolve_base` says for the logged record."""
    return resolve_base(BaseRecord.read(context.artifacts.get(contracts.BASE_ARTIFACT)), config.get("base"))


class LoraAdapterModel(mlflow.pyfunc.PythonModel):
    """pyfunc flavour of one task's adapter; inputs and model_config: the module docstring."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = dict(context.model_config or {})
        length = config.get("max_source_length")
        self.predictor = AdapterPredictor.from_adapter(
            context.artifacts[contracts.ADAPTER_DIR], None if length is None else int(length),
            base=served_base(context, config), force=bool(config.get("force", False)),
            tokenizer_dir=context.artifacts.get(contracts.TOKENIZER_ARTIFACT),
            quantize=config.get("quantize"),  # device and dtype: inference_base's CUDA-aware defaults
        )
        self.limits = ServingLimits.from_config(config)

    # `pd.DataFrame` as the hint: MLflow then validates against the logged signature (a `text`
    # column) instead of inferring a schema from the hint; lists of strings work as well.
    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> list[str]:
        from lora_module.prompt import PromptError

        try:
            return self.predictor.predict(texts_from_input(model_input), params, self.limits)
        except (PredictInputError, PromptError) as e:  # bad rows or params, over a limit
            raise bad_request(e) from e
