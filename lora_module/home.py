"""Where the pipeline keeps its outputs and its MLflow store, shared by training, evaluation and the registry.

    LORA_PIPELINE_HOME=/data/lp python -m flows.demo     # everything under /data/lp
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 ...         # a tracking server instead of the SQLite file
"""

from __future__ import annotations

import os
from pathlib import Path


def pipeline_home() -> Path:
    """`$LORA_PIPELINE_HOME`, else `.lora_pipeline` under the working directory."""
    return Path(os.environ.get("LORA_PIPELINE_HOME") or ".lora_pipeline").resolve()


def tracking_uri() -> str:
    """`$MLFLOW_TRACKING_URI` if set, else the embedded SQLite store `sqlite:///<home>/mlflow.db`.

    Never MLflow's own default, the `./mlruns` file store, which MLflow 3 refuses for the registry.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = pipeline_home()
    home.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its folder
    return f"sqlite:///{home / 'mlflow.db'}"
