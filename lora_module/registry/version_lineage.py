"""What a registered version shows a reviewer, and the two-way link between it and its training run.

Used by `register_adapter`; every key, name and link comes from `lora_module.contracts`:

- `version_tags`: the few tags the MLflow model page lists for a version (about a dozen, each one
  read by the gate, `lora-pipeline list` or a reviewer): task, mode, the candidate's ROUGE figures
  (4 decimals), the baseline's figure of the gate metric, the test and training data fingerprints,
  the training run, the adapter checksum; `gate_tags` adds the gate's decision and reason.
  Every tracking URI recorded here (tags, lineage.json, the description) has its credentials
  masked (`lora_module.redact`); the connection itself keeps the real one.
- `lineage_record`: everything else (every model's ROUGE figures, intervals, LoRA settings, base,
  git commit, the gate's full decision, both tracking stores, the prompt settings and where they
  came from), logged as `lineage.json` in the version's run.
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

from lora_module import contracts as c
from lora_module.lineage import same_store
from lora_module.redact import redact_uri
from lora_module.registry.gate import Decision
from lora_module.registry.inputs import RegistrationInputs

logger = logging.getLogger(__name__)


def version_tags(inp: RegistrationInputs, metric: str, uri: str) -> dict[str, str]:
    """The version's tags (see the module docstring); the full set goes to lineage.json."""
    train_uri = inp.training_run[0] if inp.training_run is not None else None
    other_store = train_uri if train_uri and not same_store(train_uri, uri) else None
    return c.version_tags(inp.version_tags, inp.rouge_types, metric, redact_uri(other_store))


def gate_tags(decision: Decision) -> dict[str, str]:
    """The gate's decision and its reason (the full decision is in lineage.json)."""
    return {k: v for k, v in decision.as_tags().items() if k in c.GATE_TAGS}


def lineage_record(inp: RegistrationInputs, name: str, version: str, run_id: str, uri: str,
                   decision: Decision) -> dict[str, Any]:
    """Everything about one version that is not a tag: the content of its run's lineage.json."""
    train_uri, train_run = inp.training_run or (None, None)
    return {
        "model": name, "version": version, "task": inp.task, "registration_run_id": run_id,
        "tracking_uri": redact_uri(uri),
        "training_run": {"run_id": train_run, "tracking_uri": redact_uri(train_uri),
                         "same_store": same_store(train_uri, uri) if train_uri else None},
        "adapter_dir": str(inp.adapter_dir), "report": str(inp.report_path) if inp.report_path else None,
        "train_dir": str(inp.train_dir) if inp.train_dir else None,
        "tags": dict(sorted(inp.version_tags.items())),
        "gate": decision.to_dict(),
        "adapter_config": inp.adapter_config,
        # Where the registered adapter's prompt settings came from: its own sidecar, or --prepared.
        "prompt": {"settings": inp.prompt.to_dict() if inp.prompt else None,
                   "from": str(inp.prompt_source or inp.adapter_dir)},
    }


def lineage_header(client: MlflowClient, uri: str, inp: RegistrationInputs, call: Callable[..., Any]) -> str:
    """The description's first paragraph: the training run (a UI link when it is in this store)."""
    if inp.training_run is None:
        return "Registered without a training run (no metrics.json with an MLflow run).\n\n"
    train_uri, run_id = inp.training_run
    tags = inp.version_tags
    facts = ", ".join(f"{label} `{tags.get(key, c.UNKNOWN)[:12]}`" for label, key in (
        ("data", c.TAG_DATA_FINGERPRINT), ("base", c.TAG_BASE_FINGERPRINT), ("commit", c.TAG_GIT_COMMIT)))
    if not same_store(train_uri, uri):
        store = redact_uri(train_uri)
        return f"Trained in MLflow run `{run_id}` of another tracking store ({store}); {facts}.\n\n"
    experiment = _experiment_of(client, run_id, call)
    run = f"[`{run_id}`]({c.run_link(experiment, run_id)})" if experiment else f"`{run_id}` (not found)"
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
    link = f"[{name} v{version}]({c.version_link(name, version)})"
    call(lambda: client.set_tag(run_id, MLFLOW_RUN_NAME, c.registered_run_name(name, version)), "name run")
    call(lambda: client.set_tag(run_id, MLFLOW_RUN_NOTE, f"Registers {link}; `{c.LINEAGE_FILE}` holds its "
                                "full lineage, `evaluation/` the ROUGE report."), "note on run")
    if inp.training_run is None or not same_store(inp.training_run[0], uri):
        return
    train_run = inp.training_run[1]
    note = f"Registered as {link} on {datetime.now(UTC):%Y-%m-%d}."
    try:
        call(lambda: client.set_tag(train_run, c.TAG_REGISTERED_VERSION, c.registered_version(name, version)),
             "tag training run")
        call(lambda: client.set_tag(train_run, MLFLOW_RUN_NOTE, note), "note on training run")
    except MlflowException as e:
        logger.warning("training run %s not tagged with %s v%s: %s", train_run, name, version, e.error_code)
