"""The Prefect worker recipe of deploy/README.md stops on one SIGTERM.

    .venv/bin/pytest tests/test_worker_stop.py -q

A Prefect worker turns SIGTERM into SIGINT, and a shell without job control (any script) starts its
`&` jobs with SIGINT ignored: such a worker ignores `kill`. The recipe's worker line resets SIGINT
(`env --default-signal=INT`). The test takes that line from deploy/README.md as written, runs it in
a script against the session's Prefect server (its own pool name), and sends one SIGTERM; the same
line without the reset shows the failure it prevents.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POOL = "worker-stop-test"


def recipe_worker_line() -> str:
    """The worker command of deploy/README.md section 2, `\\` continuations joined."""
    text = (REPO / "deploy" / "README.md").read_text().replace("\\\n", " ")
    (line,) = [x for x in text.splitlines() if "prefect worker start" in x and x.rstrip().endswith("&")]
    return " ".join(line.split())


def test_script_jobs_start_with_sigint_ignored_unless_reset():
    """The cause, without Prefect: what SIGINT handler a Python `&` job of a script gets."""
    probe = f"{sys.executable} -c 'import signal; print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)'"
    for prefix, ignored in (("", "True"), ("env --default-signal=INT ", "False")):
        out = subprocess.run(["bash", "-c", f"{prefix}{probe} & wait"], capture_output=True, text=True,
                             check=True, stdin=subprocess.DEVNULL).stdout.strip()
        assert out == ignored, (prefix, out)


def _start(line: str, root: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int, Path]:
    """Run `line` (a backgrounded worker) in a bash script; returns the script, the worker's pid, its log."""
    log, pid_file = root / f"worker-{time.monotonic_ns()}.log", root / "pid"
    pid_file.unlink(missing_ok=True)
    script = f"{line.removesuffix('&')} >{log} 2>&1 &\necho $! >{pid_file}\nwait\n"
    proc = subprocess.Popen(["bash", "-c", script], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "started!" not in (log.read_text() if log.exists() else ""):
        assert proc.poll() is None, log.read_text()
        time.sleep(0.3)
    assert "started!" in log.read_text(), log.read_text()
    return proc, int(pid_file.read_text()), log


def _exits_within(proc: subprocess.Popen, seconds: float) -> bool:
    try:
        proc.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def test_recipe_worker_stops_on_one_sigterm(prefect_api, tmp_path):
    line = recipe_worker_line()
    assert "env --default-signal=INT" in line and "--pool lora-process" in line
    line = line.replace("--pool lora-process", f"--pool {POOL}")
    line = re.sub(r"(?<!\S)\.venv/bin/", str(Path(sys.executable).parent) + "/", line)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "prefect"),
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    runs = {}
    for name, text in (("recipe", line), ("without the reset", line.replace("env --default-signal=INT", ""))):
        proc, pid, log = _start(text, tmp_path, env)
        try:
            os.kill(pid, signal.SIGTERM)
            runs[name] = _exits_within(proc, 15 if name == "recipe" else 5)
        finally:
            if proc.poll() is None:  # the script and the worker it started: one process group
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        if name == "recipe":
            assert runs[name], f"the recipe's worker ignored SIGTERM:\n{log.read_text()}"
            assert "stopped!" in log.read_text()
    assert runs == {"recipe": True, "without the reset": False}
