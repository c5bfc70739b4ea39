"""Name and tag a training run's MLflow run so a reviewer can tell runs apart and trace them.

Called by `FineTuneModule.on_fit_start` for each MLflow logger (rank 0 only):

    run name  summary-lora-r8-20261130T231502Z-3fa2c1   (task, method, rank, UTC start, run id; unless
              one was given)
    tags      task, finetune, lora.r, data_fingerprint, base_fingerprint, git_commit (in a git checkout),
              tracking_uri (the store the run lives in, credentials masked; the registry compares it
              with its own):
              `contracts.training_run_tags`

At the end of a fit with early stopping, `tag_early_stopping` adds where the exported weights came from
(`contracts.early_stopping_tags`: early_stopping.best_step, .best_epoch, .best_value, .stopped_early, ...).

The task is the logger's `task` (PipelineMLFlowLogger), else the experiment name's `lora-<task>`,
else the prepared data's name. The registry later adds `registered_version` and a note linking
the version (lora_module.registry.register).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from mlflow.entities import RunTag
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

from lora_module import contracts
from lora_module.home import experiment_name_for
from lora_module.lineage import git_commit
from lora_module.redact import redact_uri

_TASK_PREFIX = experiment_name_for("")


def task_of(logger: MLFlowLogger, manifest: dict[str, Any]) -> str | None:
    """The task a training run belongs to (see the module docstring), or None."""
    task = getattr(logger, "task", None)
    if task:
        return task
    experiment = getattr(logger, "_experiment_name", "") or ""
    if experiment.startswith(_TASK_PREFIX) and len(experiment) > len(_TASK_PREFIX):
        return experiment[len(_TASK_PREFIX):]
    return manifest.get("name")


def tag_training_run(logger: MLFlowLogger, finetune: str, r: int | None, manifest: dict[str, Any],
                     base_fingerprint: str | None) -> None:
    """Set the lineage tags (and our run name, when the logger was given none) on the logger's run."""
    task = task_of(logger, manifest)
    tags = contracts.training_run_tags(task, finetune, r, manifest.get("fingerprint"), base_fingerprint,
                                       git_commit(), redact_uri(getattr(logger, "_tracking_uri", None)))
    if getattr(logger, "_run_name", None) is None:  # MLflow generated one: seeded, so not unique
        tags[MLFLOW_RUN_NAME] = contracts.run_name(task, finetune, r, run_id=logger.run_id)
    logger.experiment.log_batch(logger.run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def tag_early_stopping(logger: MLFlowLogger, record: dict[str, Any]) -> None:
    """Tag the logger's run with the early-stopping record of its export (training.early_stopping)."""
    tags = contracts.early_stopping_tags(record)
    logger.experiment.log_batch(logger.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
