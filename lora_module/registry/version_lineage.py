"""What a registered version shows a reviewer, and the two-way link between it and its training run.

Used by `register_adapter`:

- `version_tags`: the few tags the MLflow model page lists for a version (about a dozen, each one
  read by the gate, `lora-pipeline list` or a reviewer): task, mode, the candidate's ROUGE figures
  (4 decimals), the baseline's figure of the gate metric, the test and training data fingerprints,
  the training run, the adapter checksum; `gate_tags` adds the gate's decision and reason.
- `lineage_record`: everything else (every model's ROUGE figures, intervals, LoRA settings, base,
  git commit, the gate's full decision, both tracking stores), logged as `lineage.json` in the
  version's run.
- `lineage_header`: the description's first line, linking the training run in the MLflow UI;
  `link_runs` names the registration run after its version, and tags the training run with its
  version (`registered_version`); both runs get a note (their UI description) linking the version.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME, MLFLOW_RUN_NOTE

from lora_module.lineage import run_link, same_store, version_link
from lora_module.registry.gate import Decision
from lora_module.registry.inputs import RegistrationInputs

logger = logging.getLogger(__name__)

LINEAGE_FILE = "lineage.json"
GATE_TAGS = ("gate.decision", "gate.reason")
_PLAIN_TAGS = ("task", "mode", "eval.baseline", "eval_data_fingerprint", "training_run_id", "adapter_sha256")


def registration_run_name(task: str) -> str:
    """`register-<task>-<UTC time>`: the name of a registration's MLflow run."""
    return f"register-{task}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"


def _rounded(value: str) -> str:
    try:
        return f"{float(value):.4f}"
    except ValueError:
        return value


def version_tags(inp: RegistrationInputs, metric: str, uri: str) -> dict[str, str]:
    """The version's tags (see the module docstring); the full set goes to lineage.json."""
    full = inp.version_tags
    tags = {k: full[k] for k in _PLAIN_TAGS if k in full}
    for rouge_type in (k for k in inp.candidate_metrics if k != "data_fingerprint"):
        tags[f"rouge.{rouge_type}"] = _rounded(full[f"rouge.{rouge_type}"])
    base_key = f"rouge.{full.get('eval.baseline')}.{metric}"  # what the gate compares with
    if base_key in full:
        tags[base_key] = _rounded(full[base_key])
    tags["data_fingerprint"] = full.get("data_fingerprint", "unknown")[:12]
    tags["training_run_id"] = full.get("training_run_id", "none")  # part of the registration's identity
    if inp.training_run is not None and not same_store(inp.training_run[0], uri):
        tags["training_run_store"] = inp.training_run[0]
    return tags


def gate_tags(decision: Decision) -> dict[str, str]:
    """The gate's decision and its reason (the full decision is in lineage.json)."""
    return {k: v for k, v in decision.as_tags().items() if k in GATE_TAGS}


def lineage_record(inp: RegistrationInputs, name: str, version: str, run_id: str, uri: str,
                   decision: Decision) -> dict[str, Any]:
    """Everything about one version that is not a tag: the content of its run's lineage.json."""
    train_uri, train_run = inp.training_run or (None, None)
    return {
        "model": name, "version": version, "task": inp.task, "registration_run_id": run_id,
        "tracking_uri": uri,
        "training_run": {"run_id": train_run, "tracking_uri": train_uri,
                         "same_store": same_store(train_uri, uri) if train_uri else None},
        "adapter_dir": str(inp.adapter_dir), "report": str(inp.report_path) if inp.report_path else None,
        "train_dir": str(inp.train_dir) if inp.train_dir else None,
        "tags": dict(sorted(inp.version_tags.items())),
        "gate": decision.to_dict(),
        "adapter_config": inp.adapter_config,
    }


def lineage_header(client: MlflowClient, uri: str, inp: RegistrationInputs, call: Callable[..., Any]) -> str:
    """The description's first paragraph: the training run (a UI link when it is in this store)."""
    if inp.training_run is None:
        return "Registered without a training run (no metrics.json with an MLflow run).\n\n"
    train_uri, run_id = inp.training_run
    tags = inp.version_tags
    facts = ", ".join(f"{label} `{tags.get(key, 'unknown')[:12]}`" for label, key in (
        ("data", "data_fingerprint"), ("base", "base_fingerprint"), ("commit", "git_commit")))
    if not same_store(train_uri, uri):
        return f"Trained in MLflow run `{run_id}` of another tracking store ({train_uri}); {facts}.\n\n"
    experiment = _experiment_of(client, run_id, call)
    run = f"[`{run_id}`]({run_link(experiment, run_id)})" if experiment else f"`{run_id}` (not found)"
    return f"Trained in MLflow run {run}; {facts}.\n\n"


def _experiment_of(client: MlflowClient, run_id: str, call: Callable[..., Any]) -> str | None:
    try:
        return call(lambda: client.get_run(run_id).info.experiment_id, "read training run")
    except MlflowException as e:  # a deleted run, or an id from elsewhere: no link, not a failure
        logger.warning("training run %s not found (%s); the version links no run", run_id, e.error_code)
        return None


def link_runs(client: MlflowClient, uri: str, inp: RegistrationInputs, name: str, version: str, run_id: str,
              call: Callable[..., Any]) -> None:
    """Name the registration run `register-<model>-v<version>` with a note linking its version, and tag
    the training run (when in this store) with its version and a note linking back."""
    link = f"[{name} v{version}]({version_link(name, version)})"
    call(lambda: client.set_tag(run_id, MLFLOW_RUN_NAME, f"register-{name}-v{version}"), "name run")
    call(lambda: client.set_tag(run_id, MLFLOW_RUN_NOTE, f"Registers {link}; `{LINEAGE_FILE}` holds its "
                                "full lineage, `evaluation/` the ROUGE report."), "note on run")
    if inp.training_run is None or not same_store(inp.training_run[0], uri):
        return
    train_run = inp.training_run[1]
    note = f"Registered as {link} on {datetime.now(UTC):%Y-%m-%d}."
    try:
        call(lambda: client.set_tag(train_run, "registered_version", f"{name}/{version}"), "tag training run")
        call(lambda: client.set_tag(train_run, MLFLOW_RUN_NOTE, note), "note on training run")
    except MlflowException as e:
        logger.warning("training run %s not tagged with %s v%s: %s", train_run, name, version, e.error_code)
