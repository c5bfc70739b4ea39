"""Where the registry is: point MLflow at a tracking store, and the experiment and model of a task.

    from lora_module.registry.tracking import configure_tracking, ensure_task_experiment, model_name_for
    uri = configure_tracking(home.tracking_uri)     # also MLflow's registry; returns the URI
    ensure_task_experiment(home, "summary")         # experiment `lora-summary`, created up front
    model_name_for("summary")                       # 'summary-lora'

Registration, the registry commands, the flows and serving set MLflow up through this module; it
imports neither registration nor the promotion gate.
"""

from __future__ import annotations

import os
import threading

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from lora_module.home import PipelineHome, artifact_location_for, ensure_store_folder, experiment_name_for
from lora_module.redact import no_links_with_credentials

__all__ = ["configure_tracking", "ensure_experiment", "ensure_task_experiment", "experiment_name_for",
           "model_name_for"]

_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
_URI_ENV_LOCK = threading.Lock()
_ALREADY_EXISTS = ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")


def configure_tracking(uri: str | None = None) -> str:
    """Point MLflow's tracking and registry at `uri` (default: `PipelineHome.from_env()`'s); returns it."""
    uri = ensure_store_folder(uri or PipelineHome.from_env().tracking_uri)
    # Our RetryPolicy does the retrying; MLflow's own transport retries (7 by default, about four
    # minutes per call) would hide an outage inside one attempt. Explicit settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    no_links_with_credentials(uri)
    # mlflow.set_*_uri also export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI for subprocesses; put
    # them back, or a later PipelineHome.from_env() in this process would take whichever store was
    # configured last for the user's choice (the training subprocess gets its store as an argument).
    with _URI_ENV_LOCK:
        saved = {key: os.environ.get(key) for key in _URI_ENV}
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return uri


def model_name_for(task: str) -> str:
    """Registered model name of a task: `<task>-lora`."""
    return f"{task}-lora"


def ensure_experiment(
    client: MlflowClient, uri: str, name: str, artifact_location: str | None = None
) -> str:
    """The id of experiment `name`, created if missing; artifact root `artifact_location_for` unless given."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        location = artifact_location or artifact_location_for(uri, name)
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as e:
        if e.error_code not in _ALREADY_EXISTS:
            raise
        return client.get_experiment_by_name(name).experiment_id  # a concurrent registration won


def ensure_task_experiment(home: PipelineHome, task: str) -> str:
    """Create the MLflow store and the experiment of `task` up front (training, registration); its id.

    For callers that then start runs concurrently: two processes opening a fresh SQLite store at
    once both run its schema migrations (one fails), and two runs creating one experiment collide.
    """
    uri = configure_tracking(home.tracking_uri)
    name = home.experiment(task)
    return ensure_experiment(MlflowClient(tracking_uri=uri), uri, name, home.artifact_location(name))
