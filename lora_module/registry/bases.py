"""Where a registered model's base comes from, on a machine that never saw the training run.

A base named by a Hub id stays a Hub id. A local base folder is logged once to the tracking
server (experiment `lora-bases`, one run per weights fingerprint, tag `base_fingerprint`, files
under artifact path `base`); every registered model that uses it records that run (`base.json`,
`BaseRecord`). At load the base is, in this order:

1. `model_config["base"]` (in-process `mlflow.pyfunc.load_model(uri, model_config=...)`), else the
   environment variable `LORA_BASE_MODEL_PATH` (a folder or Hub id; what `mlflow models serve` and
   `lora-pipeline serve-model --base` use);
2. the recorded folder, where it exists on this machine (the training machine: no download);
3. the logged copy, downloaded once into `LORA_BASE_CACHE` (default: `<tmp>/lora-bases`) under
   its fingerprint;
4. the recorded name as a Hub id.

Whatever is chosen, the adapter's fingerprint guard still refuses a base with other weights.

    record = ensure_base_logged("/models/demo-base", fingerprint)   # at registration
    base = resolve_base(record)                                      # at load
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lora_module import contracts
from lora_module.config import dataclass_from_dict

logger = logging.getLogger(__name__)

BASES_EXPERIMENT = "lora-bases"
BASE_ENV = "LORA_BASE_MODEL_PATH"
CACHE_ENV = "LORA_BASE_CACHE"
BASE_FILE = "base.json"
_DONE = "complete"  # marker written after a download finished, so a broken-off one is not reused


@dataclass(frozen=True)
class BaseRecord:
    """What a registered model knows about its base."""

    name_or_path: str
    """The base as training named it: a Hub id or a folder on the training machine."""
    fingerprint: str
    """The base weights' fingerprint (lora_module.adapter_io), checked at load."""
    artifact_uri: str | None = None
    """`runs:/<id>/base` of the logged copy of a local folder; None for a Hub id."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BaseRecord:
        return dataclass_from_dict(cls, d)

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / BASE_FILE).write_text(json.dumps(asdict(self), indent=2))
        return folder

    @classmethod
    def read(cls, folder: str | Path | None) -> BaseRecord | None:
        file = Path(folder) / BASE_FILE if folder is not None else None
        return cls.from_dict(json.loads(file.read_text())) if file is not None and file.is_file() else None


def ensure_base_logged(name_or_path: str, fingerprint: str, client: Any = None) -> BaseRecord:
    """The record of a base; a local folder is uploaded unless a finished run with its fingerprint exists."""
    import mlflow
    from mlflow import MlflowClient

    if not Path(name_or_path).is_dir():
        return BaseRecord(name_or_path, fingerprint)
    uri = mlflow.get_tracking_uri()
    client = client or MlflowClient(tracking_uri=uri)
    experiment_id = _bases_experiment(client, uri)
    found = client.search_runs(
        [experiment_id],
        f"tags.{contracts.TAG_BASE_FINGERPRINT} = '{fingerprint}' and attributes.status = 'FINISHED'",
        max_results=1)
    if found:
        return BaseRecord(name_or_path, fingerprint, f"runs:/{found[0].info.run_id}/base")
    tags = {contracts.TAG_BASE_FINGERPRINT: fingerprint, contracts.TAG_BASE_SOURCE: name_or_path}
    run = client.create_run(experiment_id, tags=tags,
                            run_name=f"base-{fingerprint[:12]}")
    try:
        client.log_artifacts(run.info.run_id, name_or_path, "base")
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")  # never found by the search above
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    logger.info("logged base %s (fingerprint %s) as run %s", name_or_path, fingerprint[:12], run.info.run_id)
    return BaseRecord(name_or_path, fingerprint, f"runs:/{run.info.run_id}/base")


def _bases_experiment(client: Any, uri: str) -> str:
    """The id of the bases experiment, created (artifact root as the pipeline's experiments) if missing."""
    from mlflow.exceptions import MlflowException

    from lora_module.home import artifact_location_for

    exp = client.get_experiment_by_name(BASES_EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(BASES_EXPERIMENT,
                                        artifact_location=artifact_location_for(uri, BASES_EXPERIMENT))
    except MlflowException:  # a concurrent registration created it first
        return client.get_experiment_by_name(BASES_EXPERIMENT).experiment_id


def resolve_base(record: BaseRecord | None, override: str | None = None) -> str | None:
    """The folder or Hub id to load as the base (order: module docstring); None: no record, no override."""
    override = override or os.environ.get(BASE_ENV) or None
    if override:
        return override
    if record is None:
        return None
    if Path(record.name_or_path).is_dir():
        return record.name_or_path
    if record.artifact_uri is not None:
        return str(_download(record))
    return record.name_or_path


def _download(record: BaseRecord) -> Path:
    """The logged base in the cache (downloaded on first use; concurrent workers each download, one wins)."""
    import mlflow

    cache = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "lora-bases")
    target = cache / record.fingerprint[:16]
    if (target / _DONE).is_file():
        return target / "base"
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="download-", dir=cache))
    mlflow.artifacts.download_artifacts(artifact_uri=record.artifact_uri, dst_path=str(staging))
    (staging / _DONE).write_text(record.artifact_uri or "")
    try:
        staging.rename(target)
    except OSError:  # another worker finished first: use its copy
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("base %s downloaded from %s into %s", record.name_or_path, record.artifact_uri, target)
    return target / "base"
