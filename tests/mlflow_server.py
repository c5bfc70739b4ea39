"""A real `mlflow server` on 127.0.0.1 for integration tests: a process group that can be stopped,
killed and started again on the same store and port.

Not a test module (no `test_` prefix): tests/conftest.py wraps it in the session's server fixtures
(pytest puts `tests/` on sys.path), and a test asks for one of those::

    def test_something(mlflow_server):             # shared: nobody stops it
        client = MlflowClient(mlflow_server.uri)    # "http://127.0.0.1:<port>"

    def test_outage(restartable_mlflow_server):    # may stop(), kill() and start() it

The backend is SQLite and artifacts are proxied by the server into a folder (both in `root`),
so `stop()` (or `kill()`, a crash) + `start()` keeps every run, model and artifact: fault tests use
that to take the registry away and bring it back on the same port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def embedded_store_home(root: Path) -> Iterator[Path]:
    """Within the block, `root` is the pipeline home (MLFLOW_TRACKING_URI unset), its embedded SQLite
    store already created: that takes seconds, better spent once than in a test's clock."""
    import pytest

    from lora_module.home import PipelineHome

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("LORA_PIPELINE_HOME", str(root))
        client_for(PipelineHome.from_env().tracking_uri).search_experiments()
        yield root


def client_for(uri: str):
    """An MlflowClient whose tracking AND registry are `uri`. Given only a tracking URI, MlflowClient
    takes MLflow's process-wide registry URI, which is whatever an earlier test configured."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Until `url` answers 200; fails at once, with the end of the server's `log`, if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited:\n{log_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} not up after {timeout} s:\n{log_tail(log)}")


def log_tail(log: Path, n: int = 60) -> str:
    """The last `n` lines of a server log ("" before it exists)."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else ""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to a process group; False when no process of the group is left."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


class MlflowServer:
    """One `mlflow server` process group (SQLite backend + proxied artifacts under `root`)."""

    def __init__(self, root: Path, port: int | None = None, start_timeout: float = 90.0) -> None:
        self.root = Path(root)
        self.port = port or free_port()
        self.start_timeout = start_timeout
        self.db = self.root / "mlflow.db"
        self.artifacts = self.root / "artifacts"
        self.log_path = self.root / "server.log"
        self._proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> MlflowServer:
        """Start the server and wait until `/health` answers (raises with the log tail if not)."""
        if self.running:
            return self
        self.artifacts.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.db}",
            "--artifacts-destination", str(self.artifacts),
            "--host", "127.0.0.1", "--port", str(self.port),
            # One worker: tests share 2 cores, and SQLite serialises writes anyway.
            "--workers", "1",
        ]
        env = dict(os.environ)
        # The job runner spawns a pool of huey consumers we never use: seconds of start-up saved.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child until stop()
        # A new session gives the server (and the uvicorn worker it forks) its own process group,
        # so stop() ends exactly the processes started here.
        self._proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, env=env, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self._proc.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {self.start_timeout}s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """Terminate the server's process group; kill it if it does not exit within 10 s."""
        if self._proc is None:
            return
        pgid = self._proc.pid  # start_new_session: the group id is the leader's pid
        _signal_group(pgid, signal.SIGTERM)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _signal_group(pgid, signal.SIGKILL)
            self._proc.wait(timeout=10)
        # The uvicorn worker may outlive the leader by a moment; the port must be free for a restart.
        deadline = time.monotonic() + 10
        while _signal_group(pgid, 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal_group(pgid, signal.SIGKILL)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash: no graceful shutdown, requests in
        flight are cut); `start()` brings the same store back on the same port."""
        if self._proc is None:
            return
        pgid = self._proc.pid
        _signal_group(pgid, signal.SIGKILL)
        self._proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _signal_group(pgid, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._proc = None

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
