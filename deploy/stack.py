"""The production stack on one machine, as one command: PostgreSQL, an S3 server, MLflow, Prefect, workers.

    lora-pipeline stack up --workers 2        # or: python -m lora_pipeline.deploy.stack up --workers 2
    lora-pipeline stack status
    lora-pipeline stack down

`up` starts, each in its own process group, logging to `<home>/logs/`:
- PostgreSQL (Debian's package, `initdb` into `<home>/postgres/data` on first use, a random password in
  `<home>/postgres/password`), with one database for MLflow and one for Prefect. Run as root, it runs
  as the `postgres` user (PostgreSQL refuses root), so `<home>` must be reachable by that user;
- an S3-compatible object store (the moto server MLflow's own tests use; it keeps objects in memory,
  so `down` loses the artifacts: point `--artifacts-destination` at MinIO or S3 for real use);
- `mlflow server` on PostgreSQL with proxied artifacts in `s3://lora-mlflow/artifacts` (clients
  upload through the server and need no S3 keys);
- `prefect server start` on PostgreSQL, a process work pool, the deployments of prefect.yaml and the
  automation of automations.yaml (a run whose worker died is marked CRASHED);
- N process workers, each with its own LORA_PIPELINE_HOME (`<home>/workers/wK`), like N machines.

It prints the `export` lines for clients. Everything listens on 127.0.0.1 only. The home is
`--home`, else `$LORA_STACK_HOME`, else `./.lora_stack`; `<home>/stack.json` records what runs
(pids, ports) for `status` and `down`. Secrets printed are redacted; the S3 keys are fixed fake dev keys.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from lora_module.errors import ArgumentParser, PipelineError
from lora_module.redact import redact_uri
from lora_pipeline.deploy import DEPLOY_DIR, PREFECT_YAML

STATE_FILE = "stack.json"
AUTOMATIONS_YAML = DEPLOY_DIR / "automations.yaml"
DB_USER = "lora"
DATABASES = ("mlflow", "prefect")
BUCKET = "lora-mlflow"
POOL = "lora-process"
DEV_S3_KEYS = {"AWS_ACCESS_KEY_ID": "lora-dev-key", "AWS_SECRET_ACCESS_KEY": "lora-dev-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}
QUIET = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false"}
# The order `up` starts them in; `down` stops them the other way round.
SERVICES = ("s3", "mlflow", "prefect")


class StackError(PipelineError, RuntimeError):
    """The stack cannot start or stop: a missing program, an unreachable home, a server not coming up."""


# ---- processes ----------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int | None) -> bool:
    """Whether process group `pid` (a leader started by `spawn`) still has a process."""
    if not pid:
        return False
    try:
        os.killpg(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def last_line(log: Path) -> str:
    """The last non-empty line of a log file, for one-line errors."""
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()] if log.exists() else []
    return lines[-1].strip() if lines else "(empty log)"


def wait_http(url: str, pid: int, log: Path, timeout: float) -> None:
    """Until `url` answers 200; raises StackError naming the log if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            raise StackError(f"{url}: the server exited; see {log}: {last_line(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise StackError(f"{url} did not answer within {timeout:.0f} s; see {log}: {last_line(log)}")


def spawn(home: Path, name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> dict:
    """Start `cmd` as a process group of its own (so `down` ends exactly it), logging to logs/<name>.log."""
    log = home / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd or home, start_new_session=True)
    return {"pid": proc.pid, "log": str(log)}


def stop_group(pid: int | None, grace: float = 20.0) -> None:
    """SIGTERM a process group, SIGKILL what is left after `grace` seconds."""
    if not alive(pid):
        return
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(pid):
        os.killpg(pid, signal.SIGKILL)


def run(cmd: list[str], env: dict[str, str] | None = None, what: str = "", cwd: Path | None = None) -> str:
    """Run a set-up command to its end; a failure is one StackError line with its last output line."""
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
    if res.returncode != 0:
        out = [x for x in (res.stderr + res.stdout).splitlines() if x.strip()]
        raise StackError(f"{what or cmd[0]} failed (exit {res.returncode}): {out[-1] if out else ''}")
    return res.stdout


# ---- PostgreSQL ---------------------------------------------------------------------------------
def pg_bin(explicit: str | None) -> Path:
    """The folder of PostgreSQL's programs: --pg-bin, else the newest /usr/lib/postgresql/*/bin."""
    found = [Path(explicit)] if explicit else sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                                                   key=lambda p: int(p.parent.name) if p.parent.name.isdigit()
                                                   else 0)
    if not found or not (found[-1] / "pg_ctl").exists():
        raise StackError("PostgreSQL not found (no pg_ctl in --pg-bin or /usr/lib/postgresql/*/bin): "
                         "apt-get install postgresql, or pass --pg-bin DIR")
    return found[-1]


def as_db_owner(cmd: list[str]) -> list[str]:
    """`cmd` run as the `postgres` user when we are root (PostgreSQL refuses to run as root)."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _own_pg_dir(pg_dir: Path) -> None:
    """As root: hand the PostgreSQL folder to `postgres` and check that user can reach it."""
    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise StackError("running as root needs a `postgres` user to run PostgreSQL as; "
                         "apt-get install postgresql creates it") from None
    for p in [pg_dir, *pg_dir.rglob("*")]:
        os.chown(p, user.pw_uid, user.pw_gid)
    if subprocess.run(as_db_owner(["test", "-w", str(pg_dir)])).returncode != 0:
        raise StackError(f"user postgres cannot reach {pg_dir}: choose a --home that every user can "
                         "traverse (e.g. under /srv or /var/tmp), or chmod o+x its parent folders")


def start_postgres(home: Path, bindir: Path) -> dict:
    """initdb on first use, start on a free port, create the databases; returns its state entry."""
    pg_dir, port = home / "postgres", free_port()
    data, pwfile = pg_dir / "data", pg_dir / "password"
    pg_dir.mkdir(parents=True, exist_ok=True)
    if not pwfile.exists():
        pwfile.write_text(secrets.token_urlsafe(18) + "\n")
        pwfile.chmod(0o600)
    _own_pg_dir(pg_dir)
    if not (data / "PG_VERSION").exists():
        run(as_db_owner([str(bindir / "initdb"), "-D", str(data), "-U", DB_USER, f"--pwfile={pwfile}",
                         "--auth=scram-sha-256", "-E", "UTF8"]), what="initdb")
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories=''"
    run(as_db_owner([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(pg_dir / "server.log"), "-w",
                     "-t", "60", "-o", opts, "start"]), what="pg_ctl start")
    env = {**os.environ, "PGPASSWORD": pwfile.read_text().strip()}
    conn = ["-h", "127.0.0.1", "-p", str(port), "-U", DB_USER]
    for db in DATABASES:
        exists = run([str(bindir / "psql"), *conn, "-d", "postgres", "-tAc",
                      f"SELECT 1 FROM pg_database WHERE datname = '{db}'"], env, "psql")
        if not exists.strip():
            run([str(bindir / "createdb"), *conn, db], env, f"createdb {db}")
    return {"port": port, "data": str(data), "bin": str(bindir), "password_file": str(pwfile)}


def postgres_running(entry: dict | None) -> bool:
    """Whether the stack's PostgreSQL runs (its data folder has a postmaster.pid)."""
    return bool(entry) and Path(entry["data"], "postmaster.pid").exists()


def stop_postgres(entry: dict) -> None:
    """pg_ctl stop (fast: open connections are cut) if its data folder has a running server."""
    if postgres_running(entry):
        run(as_db_owner([str(Path(entry["bin"]) / "pg_ctl"), "-D", entry["data"], "-m", "fast", "-w",
                         "stop"]), what="pg_ctl stop")


# ---- servers and workers ------------------------------------------------------------------------
def base_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment with analytics off and `extra` on top."""
    return {**os.environ, **QUIET, **extra}


def start_s3(home: Path, timeout: float) -> dict:
    """The moto S3 server on a free port, with the artifact bucket created."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    entry = spawn(home, "s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                  base_env(DEV_S3_KEYS))
    wait_http(f"{url}/moto-api/", entry["pid"], Path(entry["log"]), timeout)
    # moto does not check signatures: a plain PUT creates the bucket, no boto3 needed here.
    urllib.request.urlopen(urllib.request.Request(f"{url}/{BUCKET}", method="PUT"), timeout=10).close()
    return {**entry, "port": port, "url": url}


def start_mlflow(home: Path, pg: dict, s3_url: str, timeout: float) -> dict:
    """`mlflow server` on the PostgreSQL database `mlflow`, artifacts proxied into the S3 bucket."""
    port = free_port()
    # No password in the URI (it would show in `ps`): libpq reads PGPASSWORD from the environment.
    backend = f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{pg['port']}/mlflow"
    env = base_env({**DEV_S3_KEYS, "MLFLOW_S3_ENDPOINT_URL": s3_url, "PGPASSWORD": _password(pg),
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
           "--artifacts-destination", f"s3://{BUCKET}/artifacts", "--serve-artifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    entry = spawn(home, "mlflow", cmd, env)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", entry["pid"], Path(entry["log"]), timeout)
    return {**entry, "port": port, "url": url, "backend": backend}


def start_prefect(home: Path, pg: dict, timeout: float) -> dict:
    """`prefect server start` with its database in PostgreSQL (database `prefect`, driver asyncpg)."""
    port = free_port()
    env = base_env({"PREFECT_HOME": str(home / "prefect-server"), "PGPASSWORD": _password(pg),
                    "PREFECT_SERVER_DATABASE_CONNECTION_URL":
                        f"postgresql+asyncpg://{DB_USER}@127.0.0.1:{pg['port']}/prefect"})
    entry = spawn(home, "prefect", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                    "--port", str(port)], env)
    api = f"http://127.0.0.1:{port}/api"
    wait_http(f"{api}/health", entry["pid"], Path(entry["log"]), timeout)
    return {**entry, "port": port, "url": api}


def set_up_prefect(home: Path, api: str, prefect_yaml: Path | None) -> None:
    """The process work pool, the deployments of `prefect_yaml` (unless None) and the automations."""
    env = base_env({"PREFECT_API_URL": api, "PREFECT_HOME": str(home / "prefect-client")})
    prefect = [sys.executable, "-m", "prefect"]
    run([*prefect, "work-pool", "create", POOL, "--type", "process", "--overwrite"], env, "work-pool create")
    if prefect_yaml is not None:
        # Flow runs start in the folder `prefect deploy` ran in: the caller's, as in the README.
        run([*prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_yaml)], env,
            "prefect deploy", cwd=Path.cwd())
    import yaml

    for automation in yaml.safe_load(AUTOMATIONS_YAML.read_text())["automations"]:
        if subprocess.run([*prefect, "automation", "inspect", automation["name"]], env=env,
                          capture_output=True).returncode != 0:
            run([*prefect, "automation", "create", "--from-json", json.dumps(automation)], env,
                "automation create")


def start_workers(home: Path, n: int, api: str, mlflow_uri: str) -> list[dict]:
    """N process workers on the pool, each with a pipeline home of its own (as on N machines)."""
    out = []
    for k in range(1, n + 1):
        folder = home / "workers" / f"w{k}"
        (folder / "prefect").mkdir(parents=True, exist_ok=True)
        env = base_env({"PREFECT_API_URL": api, "PREFECT_HOME": str(folder / "prefect"),
                        "LORA_PIPELINE_HOME": str(folder / "home"), "MLFLOW_TRACKING_URI": mlflow_uri,
                        # Heartbeats let the automation mark a dead worker's run CRASHED (30 s: the least).
                        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30", "PREFECT_WORKER_QUERY_SECONDS": "5"})
        cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--name", f"stack-w{k}",
               "--limit", "1"]
        entry = spawn(home, f"worker-{k}", cmd, env, cwd=Path.cwd())
        out.append({**entry, "name": f"stack-w{k}", "home": str(folder / "home")})
    return out


def _password(pg: dict) -> str:
    return Path(pg["password_file"]).read_text().strip()


# ---- commands -----------------------------------------------------------------------------------
def resolve_home(home: str | None) -> Path:
    """--home, else $LORA_STACK_HOME, else ./.lora_stack (absolute)."""
    return Path(home or os.environ.get("LORA_STACK_HOME") or ".lora_stack").resolve()


def load_state(home: Path) -> dict[str, Any]:
    path = home / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def save_state(home: Path, state: dict[str, Any]) -> None:
    path = home / STATE_FILE
    path.write_text(json.dumps(state, indent=2))
    path.chmod(0o600)


def running_pids(state: dict[str, Any]) -> list[int]:
    """Pids of the stack's process groups that still run (workers and servers)."""
    entries = [*state.get("workers", []), *(state.get(s) for s in SERVICES)]
    return [e["pid"] for e in entries if e and alive(e.get("pid"))]


def up(home: Path, workers: int, pg_bin_dir: str | None = None, prefect_yaml: Path | None = PREFECT_YAML,
       timeout: float = 240.0) -> dict[str, Any]:
    """Start the whole stack (stopping what it started if a part fails); returns its state."""
    home.mkdir(parents=True, exist_ok=True)
    old = load_state(home)
    if running_pids(old) or postgres_running(old.get("postgres")):
        raise StackError(f"the stack in {home} is already up (`stack status`; `stack down` first)")
    # Children inherit an ignored SIGINT (a script's `&` job); a handler is reset to default by exec,
    # so the workers' SIGTERM -> SIGINT shutdown works on `down`.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    state: dict[str, Any] = {"home": str(home), "pool": POOL}
    try:
        state["postgres"] = start_postgres(home, pg_bin(pg_bin_dir))
        save_state(home, state)
        state["s3"] = start_s3(home, timeout)
        save_state(home, state)
        state["mlflow"] = start_mlflow(home, state["postgres"], state["s3"]["url"], timeout)
        save_state(home, state)
        state["prefect"] = start_prefect(home, state["postgres"], timeout)
        save_state(home, state)
        set_up_prefect(home, state["prefect"]["url"], prefect_yaml)
        state["workers"] = start_workers(home, workers, state["prefect"]["url"], state["mlflow"]["url"])
        save_state(home, state)
    except BaseException:
        down(home)
        raise
    return state


def down(home: Path) -> list[str]:
    """Stop workers, servers and PostgreSQL (its data stays for the next `up`); returns what stopped."""
    state = load_state(home)
    stopped = []
    for entry in [*state.get("workers", []), *(state.get(s) for s in reversed(SERVICES))]:
        if entry and alive(entry.get("pid")):
            stop_group(entry["pid"])
            stopped.append(Path(entry["log"]).stem)
    if state.get("postgres"):
        stop_postgres(state["postgres"])
        stopped.append("postgres")
    (home / STATE_FILE).unlink(missing_ok=True)
    return stopped


def exports(state: dict[str, Any]) -> list[str]:
    """The shell lines a client runs to use the stack, and the stores behind it (secrets redacted)."""
    pg = state["postgres"]
    secret = f"postgresql+psycopg2://{DB_USER}:{_password(pg)}@127.0.0.1:{pg['port']}"
    return [
        f"export MLFLOW_TRACKING_URI={state['mlflow']['url']}",
        f"export PREFECT_API_URL={state['prefect']['url']}",
        "# the object store itself (MLflow proxies artifacts; these fake dev keys only read it directly):",
        f"export MLFLOW_S3_ENDPOINT_URL={state['s3']['url']} "
        + " ".join(f"{k}={v}" for k, v in DEV_S3_KEYS.items()),
        f"# MLflow backend store: {redact_uri(secret + '/mlflow')}; artifacts: s3://{BUCKET}/artifacts",
        f"# Prefect database: {redact_uri(secret.replace('psycopg2', 'asyncpg') + '/prefect')}"
        f" (password in {pg['password_file']})",
    ]


def status(home: Path) -> list[str]:
    """One line per part of the stack: running or not, pid, address."""
    state = load_state(home)
    if not state:
        return [f"no stack in {home} (`stack up` starts one)"]
    pg = state.get("postgres")
    lines = [f"postgres  {'running' if postgres_running(pg) else 'stopped'}"
             + (f"  127.0.0.1:{pg['port']}" if pg else "")]
    for name in SERVICES:
        entry = state.get(name)
        if entry:
            run_ = "running" if alive(entry["pid"]) else "stopped"
            lines.append(f"{name:<9} {run_}  pid {entry['pid']}  {entry['url']}")
    for w in state.get("workers", []):
        run_ = "running" if alive(w["pid"]) else "stopped"
        lines.append(f"{w['name']:<9} {run_}  pid {w['pid']}  pool {state['pool']}  home {w['home']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """`lora-pipeline stack up|down|status`."""
    parser = ArgumentParser(prog="lora-pipeline stack", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("action", choices=("up", "down", "status"),
                        help="up: start every part and print the URIs; down: stop them; status: what runs")
    parser.add_argument("--home", help="stack folder (default: $LORA_STACK_HOME, else ./.lora_stack)")
    parser.add_argument("--workers", type=int, default=2, help="process workers to start (up)")
    parser.add_argument("--pg-bin", help="PostgreSQL's programs (default: /usr/lib/postgresql/*/bin)")
    parser.add_argument("--no-deploy", action="store_true",
                        help="create the work pool, deploy nothing (up; default: deploy prefect.yaml's)")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds each server may take to start")
    args = parser.parse_args(argv)
    home = resolve_home(args.home)
    if args.action == "up":
        if args.workers < 0:
            raise StackError(f"--workers must be >= 0, got {args.workers}")
        state = up(home, args.workers, args.pg_bin, None if args.no_deploy else PREFECT_YAML, args.timeout)
        print("\n".join([f"# stack up in {home} ({len(state['workers'])} workers on pool {POOL})",
                         *exports(state)]))
    elif args.action == "down":
        stopped = down(home)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    else:
        state = load_state(home)
        print("\n".join(status(home) + (exports(state) if running_pids(state) else [])))
    return 0


if __name__ == "__main__":
    from lora_module.errors import run_cli

    raise SystemExit(run_cli(main, sys.argv[1:]))
