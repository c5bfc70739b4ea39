"""Lineage facts that need the outside world: the code's commit and whether two tracking URIs name one store.

    from lora_module.lineage import git_commit, same_store
    git_commit()                              # '3cedd2d...' ('-dirty' with local changes), None outside git
    same_store("sqlite:////a/mlflow.db", "sqlite:////a/./mlflow.db")   # True
    same_store("http://***@h:5000", "http://alice:pw@h:5000")           # True: credentials do not count

Standard library (and lora_module.redact) only. The names, tag keys and UI links these facts end up
in are built by `lora_module.contracts` (`training_run_tags`, `run_name`, `run_link`, `version_link`):
the training module tags its MLflow run with them, the registry links a version and its training run
both ways.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from lora_module.redact import MASK, redact_uri


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
    """A tracking URI in one spelling: SQLite paths resolved, no trailing slash, lower-case scheme/host,
    no credentials (a recorded URI has them masked, the live one does not: both name one store)."""
    uri = (redact_uri(uri.strip()) or "").replace(f"://{MASK}@", "://").rstrip("/")
    if uri.startswith("sqlite:///"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    scheme, sep, rest = uri.partition("://")
    host, slash, path = rest.partition("/")
    return f"{scheme.lower()}{sep}{host.lower().replace('localhost', '127.0.0.1')}{slash}{path}"


def same_store(a: str | None, b: str | None) -> bool:
    """Whether two tracking URIs name the same MLflow store (False when either is unknown)."""
    return bool(a and b) and _normal_store(a) == _normal_store(b)
