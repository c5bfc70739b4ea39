"""Lineage a reviewer can follow: run names, the code's commit, tracking-store identity, UI links.

    from lora_module.lineage import run_name, git_commit, same_store, run_link, version_link
    run_name("summary", "lora", 8, run_id="3fa2c1..")   # 'summary-lora-r8-20261130T231502Z-3fa2c1' (UTC)
    git_commit()                              # '3cedd2d...' ('-dirty' with local changes), None outside git
    same_store("sqlite:////a/mlflow.db", "sqlite:////a/./mlflow.db")   # True
    run_link("3", run_id), version_link("summary-lora", "4")            # '#/experiments/3/runs/...'

Standard library only: the training module names and tags its MLflow run with these, the registry
links a version and its training run both ways with them. The links are MLflow UI routes relative
to the page (`#/...`), so they work in Markdown descriptions whatever host serves the UI.
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

TASK_TAG = "task"
GIT_TAG = "git_commit"


def run_name(task: str | None, method: str, r: int | None = None, when: datetime | None = None,
             run_id: str | None = None) -> str:
    """`<task>-<method>[-r<r>]-<UTC time>[-<run_id[:6]>]`, e.g. `summary-lora-r8-20261130T231502Z-3fa2c1`.

    MLflow's own generated names come from `random`, which `seed_everything` seeds: every seeded
    run would get the same name, hence a name of our own. Full fine-tuning has no rank; the run id's
    start keeps two runs started in the same second (a sweep) apart.
    """
    stamp = (when or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    parts = [task or "untitled", method] + ([f"r{r}"] if r is not None and method != "full" else [])
    return "-".join([*parts, stamp] + ([run_id[:6]] if run_id else []))


def git_commit() -> str | None:
    """Commit of this code's checkout (`-dirty` when tracked files changed); None outside a git checkout."""
    repo = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not head:
        return None
    return f"{head}-dirty" if dirty else head


def _normal_store(uri: str) -> str:
    """A tracking URI in one spelling: SQLite paths resolved, no trailing slash, lower-case scheme/host."""
    uri = uri.strip().rstrip("/")
    if uri.startswith("sqlite:///"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    scheme, sep, rest = uri.partition("://")
    host, slash, path = rest.partition("/")
    return f"{scheme.lower()}{sep}{host.lower().replace('localhost', '127.0.0.1')}{slash}{path}"


def same_store(a: str | None, b: str | None) -> bool:
    """Whether two tracking URIs name the same MLflow store (False when either is unknown)."""
    return bool(a and b) and _normal_store(a) == _normal_store(b)


def run_link(experiment_id: str, run_id: str) -> str:
    """The MLflow UI route of a run, relative to the UI page."""
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def version_link(model_name: str, version: str) -> str:
    """The MLflow UI route of a registered model version, relative to the UI page."""
    return f"#/models/{model_name}/versions/{version}"
