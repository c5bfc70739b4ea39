"""Log an adapter as an MLflow pyfunc model of a run (what a registered version points to).

    from lora_module.registry.logged_model import log_adapter_model
    info = log_adapter_model(run_id, Path("runs/x/adapter"), tokenizer_dir=Path("prepared/tokenizer"))
    mlflow.register_model(info.model_uri, "summary-lora")

The model is `serving.pyfunc.LoraAdapterModel`, logged from code: its artifacts are the adapter
folder (whose sidecar carries the prompt settings), the tokenizer and the base's portable record
(`bases`); its code is the explicit list `serving.pyfunc.SINGLE_TASK_CODE`.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc

from lora_module import contracts
from lora_module.registry.bases import BaseRecord, ensure_base_logged
from lora_module.serving.pyfunc import (
    SINGLE_TASK_CODE,
    SINGLE_TASK_ENTRY,
    copy_code,
    entry_code,
    model_signature,
    pip_requirements,
)


def log_adapter_model(run_id: str, adapter_dir: Path, tokenizer_dir: Path | None = None,
                      experiment_id: str | None = None) -> Any:
    """Log the adapter folder as pyfunc model `adapter` of run `run_id`; returns MLflow's ModelInfo.

    The run is neither started nor ended here (its status is the registration's to set), and the
    logged model is created first with `source_run_id`, so a broken-off upload leaves a PENDING
    model the registration can find.
    """
    from mlflow import MlflowClient
    from mlflow.models import Model

    artifacts = {contracts.ADAPTER_DIR: str(adapter_dir)}
    if tokenizer_dir is not None:
        artifacts[contracts.TOKENIZER_ARTIFACT] = str(tokenizer_dir)
    client = MlflowClient()
    base = adapter_base_record(adapter_dir, client)
    experiment_id = experiment_id or client.get_run(run_id).info.experiment_id
    model = client.create_logged_model(experiment_id, name=contracts.ADAPTER_DIR, source_run_id=run_id)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # No input example on purpose: MLflow would load base + adapter just to validate it.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        if base is not None:
            artifacts[contracts.BASE_ARTIFACT] = str(base.write(Path(tmp) / contracts.BASE_ARTIFACT))
        entry = Path(tmp) / "lora_adapter_model.py"
        entry.write_text(entry_code(SINGLE_TASK_ENTRY))
        # Model.log, not mlflow.pyfunc.log_model: it takes `run_id`, so no fluent run is started
        # (whose exit would mark the run FINISHED before the version exists).
        return Model.log(
            artifact_path=None, name=contracts.ADAPTER_DIR, flavor=mlflow.pyfunc, run_id=run_id,
            model_id=model.model_id, python_model=str(entry), artifacts=artifacts,
            code_paths=[str(copy_code(Path(tmp) / "code", SINGLE_TASK_CODE))],
            signature=model_signature(), pip_requirements=pip_requirements(),
        )


def adapter_base_record(adapter_dir: Path, client: Any = None) -> BaseRecord | None:
    """The adapter's base as a portable record (a local folder logged once; `bases`); None when the
    adapter names no base or no fingerprint."""
    from lora_module.adapter_io import read_adapter_config

    config = read_adapter_config(adapter_dir)
    name, fingerprint = config.get("base_model_name_or_path"), config.get("base_fingerprint")
    if not name or not fingerprint:
        return None
    return ensure_base_logged(str(name), str(fingerprint), client)
