"""The pipeline home: where every stage reads and writes, and which MLflow store and experiment it uses.

    from lora_module.home import PipelineHome
    home = PipelineHome.from_env()               # $LORA_PIPELINE_HOME, $MLFLOW_TRACKING_URI, else defaults
    home = PipelineHome.from_env("/data/lp")     # an explicit folder wins over the environment
    home.data_dir, home.base_dir, home.runs_dir("summary"), home.evals_dir("summary"), home.locks_dir
    home.tracking_uri, home.experiment("summary"), home.artifact_location("lora-summary")

A home is built once, at an edge (a flow, a command line, a test), and then handed down explicitly;
`from_env` is the only place that reads the environment, and nothing writes it. Layout under `root`:

    data/                 prepared data folders, content-addressed: <name>-<fingerprint[:12]>/
    base/                 the built demo base model
    runs/<task>/<run>/    one flow run of a task: training outputs, evaluations, the report
    evals/<task>/         base-model evaluations, content-addressed: base-<key[:12]>/
    locks/                file locks that serialise alias changes of a registered model
    mlflow.db, mlartifacts/<experiment>/    the embedded MLflow store (when no tracking server is set)

One MLflow experiment per task, `lora-<task>`, holds its training and registration runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from lora_module.errors import PipelineError, check_output_dir
from lora_module.redact import redact_uri

HOME_ENV = "LORA_PIPELINE_HOME"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_ROOT = ".lora_pipeline"
_SQLITE = "sqlite:///"
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")
"""Tracking-URI schemes MLflow 3 accepts (a `+driver` suffix allowed); its ./mlruns file store is refused."""


class TrackingUriError(PipelineError, ValueError):
    """A tracking URI MLflow cannot use as a store."""


def experiment_name_for(task: str) -> str:
    """The MLflow experiment of a task: `lora-<task>` (its training and registration runs)."""
    return f"lora-{task}"


def artifact_location_for(tracking_uri: str, experiment: str) -> str | None:
    """Artifact root of a new experiment: `mlartifacts/<experiment>` beside a SQLite store (a file
    URI); None for a tracking server, which then uses its own (e.g. its `--artifacts-destination`)."""
    if tracking_uri.startswith(_SQLITE):
        return (Path(tracking_uri.removeprefix(_SQLITE)).parent / "mlartifacts" / experiment).as_uri()
    return None


def ensure_store_folder(tracking_uri: str) -> str:
    """Create the folder of a SQLite store (SQLite creates the file, not its folder); returns the URI."""
    if tracking_uri.startswith(_SQLITE):
        Path(tracking_uri.removeprefix(_SQLITE)).parent.mkdir(parents=True, exist_ok=True)
    return tracking_uri


@dataclass(frozen=True)
class PipelineHome:
    """The pipeline's output folder and MLflow store; every path a stage writes comes from here."""

    root: Path
    """Absolute folder holding data/, base/, runs/, evals/, locks/ (and mlflow.db by default)."""
    tracking_uri: str
    """MLflow tracking and registry URI: `sqlite:///<root>/mlflow.db` or an `http(s)://` server."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))  # accept a str; frozen, so set it this way
        if not self.root.is_absolute():
            raise ValueError(f"PipelineHome.root must be an absolute path, got {self.root!r}; "
                             "build it with PipelineHome.from_env(...)")
        check_output_dir(self.root, "pipeline home (--home or $LORA_PIPELINE_HOME)")
        if not isinstance(self.tracking_uri, str) or "://" not in self.tracking_uri:
            raise ValueError(f"PipelineHome.tracking_uri must be a URI such as sqlite:///path/mlflow.db or "
                             f"http://host:5000, got {self.tracking_uri!r}")
        scheme = self.tracking_uri.split("://", 1)[0].split("+", 1)[0].lower()
        if scheme not in TRACKING_SCHEMES:
            raise TrackingUriError(
                f"tracking URI {redact_uri(self.tracking_uri)!r} has scheme {scheme!r}; MLflow stores are "
                f"{', '.join(s + '://' for s in TRACKING_SCHEMES)} (--tracking-uri or $MLFLOW_TRACKING_URI)")

    @classmethod
    def from_env(cls, home: str | os.PathLike | None = None, tracking_uri: str | None = None) -> PipelineHome:
        """The home from explicit values, else the documented environment variables, else defaults.

        Args:
            home: The folder; None: `$LORA_PIPELINE_HOME`, else `./.lora_pipeline` (resolved to an
                absolute path now, so a later change of working directory does not move it).
            tracking_uri: The MLflow store; None: `$MLFLOW_TRACKING_URI`, else the embedded SQLite
                file `sqlite:///<home>/mlflow.db` (never MLflow's own `./mlruns` file store, which
                MLflow 3 refuses for the registry).
        """
        root = Path(home or os.environ.get(HOME_ENV) or DEFAULT_ROOT).expanduser().resolve()
        uri = tracking_uri or os.environ.get(TRACKING_ENV) or f"{_SQLITE}{root / 'mlflow.db'}"
        return cls(root, uri)

    def create(self) -> PipelineHome:
        """Create the home folder (and the SQLite store's folder); returns self."""
        self.root.mkdir(parents=True, exist_ok=True)
        ensure_store_folder(self.tracking_uri)
        return self

    @property
    def data_dir(self) -> Path:
        """Prepared data folders (the data stage's `output_root`)."""
        return self.root / "data"

    @property
    def base_dir(self) -> Path:
        """Where the demo base model is built."""
        return self.root / "base"

    @property
    def locks_dir(self) -> Path:
        """File locks of the registry."""
        return self.root / "locks"

    def runs_dir(self, task: str) -> Path:
        """Flow runs of `task`, one sub-folder per run."""
        return self.root / "runs" / task

    def new_run_dir(self, task: str, run_id: str) -> Path:
        """A fresh folder for one run of `task`, `runs/<task>/<UTC time>-<run_id[:8]>` (not created)."""
        return self.runs_dir(task) / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{run_id[:8]}"

    def evals_dir(self, task: str) -> Path:
        """Content-addressed base-model evaluations of `task`."""
        return self.root / "evals" / task

    def experiment(self, task: str) -> str:
        """The MLflow experiment of `task`."""
        return experiment_name_for(task)

    def artifact_location(self, experiment: str) -> str | None:
        """Artifact root for a new `experiment` in this home's store (None: the server decides)."""
        return artifact_location_for(self.tracking_uri, experiment)
