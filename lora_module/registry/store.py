"""Read registered versions back: resolve a task, alias or version and download its files.

    from lora_module.registry.store import download_adapter
    reg = download_adapter("summary", tmp)                   # models:/summary-lora@champion
    reg.adapter_dir, reg.tokenizer_dir, reg.base_dir, reg.version, reg.tags

The serving package reads the registry through this module only: it imports the retry policy and
the tracking set-up, never registration or the promotion gate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from lora_module import contracts
from lora_module.contracts import CHAMPION
from lora_module.errors import PipelineError
from lora_module.redact import redact_text, redact_uri
from lora_module.registry.retry import RetryPolicy
from lora_module.registry.tracking import configure_tracking, model_name_for

# MLflow error codes of a name, version or alias the registry does not have.
NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


class NotRegisteredError(PipelineError, LookupError):
    """The registry has no such registered model, version or alias (names the store)."""


@dataclass(frozen=True)
class RegisteredAdapter:
    """A registered version downloaded to disk."""

    name: str
    """Registered model name."""
    version: str
    """Version number (resolved from the alias if one was asked for)."""
    adapter_dir: Path
    """The downloaded PEFT-format adapter folder."""
    tokenizer_dir: Path | None
    """The tokenizer shipped with the version, if any."""
    tags: dict[str, str]
    """The version's tags (lineage, ROUGE figures, gate decision)."""
    base_dir: Path | None = None
    """The folder holding the version's base record, if any (`bases.BASE_FILE`)."""

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def parse_model_ref(ref: str, version: str | int | None = None, alias: str | None = CHAMPION
                    ) -> tuple[str, str | None, str | None]:
    """A task name or `models:/<name>[/<version>|@<alias>]` -> (name, version, alias); an explicit
    `version` wins over any alias."""
    if ref.startswith("models:/"):
        rest = ref.removeprefix("models:/")
        if "@" in rest:
            name, alias = rest.split("@", 1)
        elif "/" in rest:
            name, version = rest.rsplit("/", 1)
        else:
            name = rest
    else:
        name = model_name_for(ref)
    if version is not None:
        return name, str(version), None
    if not alias:
        raise NotRegisteredError(f"give a version or an alias for {ref!r}")
    return name, None, alias


def download_adapter(
    task_or_uri: str,
    dst: str | os.PathLike,
    version: str | int | None = None,
    alias: str | None = CHAMPION,
    tracking_uri: str | None = None,
    retries: int = 3,
    backoff: float = 1.0,
) -> RegisteredAdapter:
    """Download a registered version (by version number, else by alias) into `dst`."""
    uri = configure_tracking(tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    policy = RetryPolicy(retries=retries, backoff=backoff)
    name, version, alias = parse_model_ref(task_or_uri, version, alias)

    def lookup():
        if version is not None:
            return client.get_model_version(name, version)
        return client.get_model_version_by_alias(name, alias)

    try:
        mv = policy.call(lookup, f"look up {name} {'v' + version if version else '@' + str(alias)}", uri)
    except MlflowException as e:
        if e.error_code in NOT_FOUND_CODES:
            what = f"version {version}" if version is not None else f"alias {alias!r}"
            raise NotRegisteredError(f"registered model {name!r} has no {what} at {redact_uri(uri)}: "
                                     f"{redact_text(e.message)}") from e
        raise
    local = Path(policy.call(
        lambda: mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(dst), tracking_uri=uri),
        f"download {name} v{mv.version}", uri))
    artifacts = local / "artifacts"
    tokenizer, base = artifacts / contracts.TOKENIZER_ARTIFACT, artifacts / contracts.BASE_ARTIFACT
    return RegisteredAdapter(name, str(mv.version), artifacts / contracts.ADAPTER_DIR,
                             tokenizer if tokenizer.is_dir() else None, dict(mv.tags or {}),
                             base if base.is_dir() else None)


def check_registered(model_uri: str, tracking_uri: str) -> None:
    """NotRegisteredError unless the registry at `tracking_uri` has `models:/NAME@ALIAS` or `/VERSION`."""
    name, version, alias = parse_model_ref(model_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if version is not None:
            client.get_model_version(name, version)
        else:
            client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        raise NotRegisteredError(f"{model_uri} is not in the registry at {redact_uri(tracking_uri)}: "
                                 f"{redact_text(e.message)}") from e
