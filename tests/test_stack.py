"""The production stack end to end: `lora-pipeline stack up`, the fan-out of many tasks over two
workers, a worker killed mid-training, `stack down`.

`stack up` starts PostgreSQL (MLflow's backend store and the Prefect server's database), the moto
S3 server (MLflow's artifact store, proxied), `mlflow server`, `prefect server` and two process
workers, each with its own LORA_PIPELINE_HOME (two "machines"). Four tiny tasks go to the pool as
runs of the `lora-pool-task` deployment (`lora-pipeline run --deployment ...`). As soon as a
worker that has finished a task starts training its next one, that worker and everything under
it is SIGKILLed (a machine that dies); the automation of deploy/automations.yaml marks the
silent run CRASHED, the fan-out submits it again, and the other worker takes it. Every task must
end registered exactly once, with the alias its result names, both workers must have finished
work, and the stores must be the stack's (rows in PostgreSQL, objects in the bucket). Everything
listens on 127.0.0.1.

Slow (minutes: four tiny trainings, one of them twice, and the 75 s the automation waits for a
missing heartbeat); skipped where PostgreSQL is not installed (CI installs it: .ci/run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow_server import client_for

from lora_module import contracts as c
from lora_pipeline.deploy import stack as st

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "deploy" / "configs"
TASKS = ("stack_a", "stack_b", "stack_c", "stack_d")
DEPLOYMENT = "lora-pool-task/lora-pool-task"
LORA_PIPELINE = str(Path(sys.executable).with_name("lora-pipeline"))  # the console script


def _has_postgres() -> bool:
    try:
        st.pg_bin(None)
        return True
    except st.StackError:
        return False


def cli(*args: str, env: dict[str, str], timeout: float = 600) -> str:
    res = subprocess.run([LORA_PIPELINE, *args], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"lora-pipeline {' '.join(args)}:\n{res.stdout}\n{res.stderr[-4000:]}"
    return res.stdout


@pytest.fixture(scope="module")
def stack(tiny_t5_dir):
    """`stack up --workers 2` in a home the `postgres` user can reach (as root, PostgreSQL runs as it),
    with the pool-task deployment deployed; `stack down` at the end whatever happened."""
    if not _has_postgres():
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it on CI)")
    home = Path(tempfile.mkdtemp(prefix="lora-stack-"))
    home.chmod(0o755)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_HOME": str(home / "client-prefect")}
    for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "LORA_PIPELINE_HOME"):
        env.pop(k, None)
    try:
        out = cli("stack", "up", "--home", str(home / "stack"), "--workers", "2", "--no-deploy", env=env)
        state = json.loads((home / "stack" / st.STATE_FILE).read_text())
        env.update(PREFECT_API_URL=state["prefect"]["url"], MLFLOW_TRACKING_URI=state["mlflow"]["url"])
        res = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file",
                              str(REPO / "deploy" / "prefect.yaml"), "--name", "lora-pool-task"],
                             env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        yield {"home": home, "env": env, "state": state, "up": out, "specs": _write_specs(home, tiny_t5_dir)}
    finally:
        subprocess.run([LORA_PIPELINE, "stack", "down", "--home",
                        str(home / "stack")], env=env, cwd=REPO, timeout=300)
        shutil.rmtree(home, ignore_errors=True)


def _write_specs(home: Path, base: Path) -> list[str]:
    """Four tiny T5 tasks (a few steps each, no full fine-tuning)."""
    paths = []
    for name in TASKS:
        path = home / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "name": name,
            "data_config": str(CONFIGS / "data_demo_summary.yaml"),
            "lora_config": str(CONFIGS / "demo_summary_lora.yaml"),
            "base_model": str(base),
            "generation": {"batch_size": 8, "max_new_tokens": 8, "max_source_length": 128},
            "data_overrides": {"demo_train_size": 40, "demo_validation_size": 8, "demo_test_size": 8,
                               "max_source_length": 128},
            "train_overrides": ["--trainer.max_steps", "3", "--data.batch_size", "8",
                                "--trainer.enable_progress_bar", "false"],
        }))
        paths.append(str(path))
    return paths


def test_up_prints_the_uris_and_status_shows_every_part(stack):
    state, out = stack["state"], stack["up"]
    assert f"export MLFLOW_TRACKING_URI={state['mlflow']['url']}" in out
    assert f"export PREFECT_API_URL={state['prefect']['url']}" in out
    password = Path(state["postgres"]["password_file"]).read_text().strip()
    assert password not in out and "postgresql+psycopg2://***@127.0.0.1" in out
    status = cli("stack", "status", "--home", str(stack["home"] / "stack"), env=stack["env"])
    assert password not in status
    for part in ("postgres", "s3", "mlflow", "prefect", "stack-w1", "stack-w2"):
        assert any(line.startswith(part) and " running " in line + " " for line in status.splitlines()), \
            status
    urls = (state["mlflow"]["url"], state["prefect"]["url"], state["s3"]["url"])
    assert all(url.startswith("http://127.0.0.1:") for url in urls)


def _training_worker(state: dict) -> dict | None:
    """The first worker that has finished a task (a report in its home) and trains another now."""
    for worker in state["workers"]:
        if not any(Path(worker["home"]).glob("runs/*/*/report")):
            continue
        for child in psutil.Process(worker["pid"]).children(recursive=True):
            try:
                if "lora_module.training" in " ".join(child.cmdline()):
                    return worker
            except psutil.NoSuchProcess:
                continue
    return None


def _kill_machine(worker: dict) -> None:
    """SIGKILL a worker and every process under it at once, as when its machine dies."""
    root = psutil.Process(worker["pid"])
    for proc in [root, *root.children(recursive=True)]:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _fan_out_killing_one_worker(stack: dict) -> tuple[dict, dict]:
    """Run the four tasks on the pool; kill the first worker seen training its second task (so both
    have finished one and the rerun overlaps the other's second task): (summary, killed worker)."""
    cmd = [LORA_PIPELINE, "run", "--deployment", DEPLOYMENT,
           "--home", str(stack["home"] / "parent")]
    for spec in stack["specs"]:
        cmd += ["--task", spec]
    log = stack["home"] / "parent.log"
    with open(log, "w") as err:
        parent = subprocess.Popen(cmd, env=stack["env"], cwd=REPO, stdout=subprocess.PIPE, stderr=err,
                                  text=True)
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and parent.poll() is None and time.monotonic() < deadline:
        killed = _training_worker(stack["state"])
        if killed is None:
            time.sleep(0.3)
    assert killed is not None, f"no worker was seen training a second task:\n{log.read_text()[-3000:]}"
    _kill_machine(killed)
    try:
        out, _ = parent.communicate(timeout=1200)
    finally:
        parent.kill()
    assert parent.returncode == 0, f"fan-out failed:\n{log.read_text()[-6000:]}"
    lines = out.splitlines()
    return json.loads("\n".join(lines[lines.index("{"):])), killed


def test_fan_out_survives_a_killed_worker(stack):
    summary, killed = _fan_out_killing_one_worker(stack)
    results = summary["results"]
    assert summary["failed"] == {} and set(results) == set(TASKS)
    homes = {w["name"]: Path(w["home"]) for w in stack["state"]["workers"]}
    survivor = next(n for n in homes if n != killed["name"])
    # Both workers took work: each finished a task (its report), the killed one started another.
    assert all(any(home.glob("runs/*/*/report")) for home in homes.values())
    rerun = [n for n, r in results.items() if len(r["flow_runs"]) == 2]
    assert len(rerun) == 1 and all(len(r["flow_runs"]) == 1 for n, r in results.items() if n not in rerun)
    assert results[rerun[0]]["report"].startswith(str(homes[survivor]))
    assert any((homes[killed["name"]] / "runs" / rerun[0]).glob("*"))

    client = client_for(stack["state"]["mlflow"]["url"])
    for name, result in results.items():
        versions = client.search_model_versions(f"name='{name}-lora'")
        assert [str(v.version) for v in versions] == ["1"], name  # registered once, the rerun included
        aliases = client.get_registered_model(f"{name}-lora").aliases
        assert aliases.get(result["alias"]) == "1" and result["version"] == "1"
    _stores_are_the_stacks(stack["state"], len(TASKS))


def _stores_are_the_stacks(state: dict, n_models: int) -> None:
    """MLflow's models and Prefect's flow runs are rows in PostgreSQL; the artifacts objects in the bucket."""
    import boto3
    import psycopg2

    pg = state["postgres"]
    password = Path(pg["password_file"]).read_text().strip()
    with psycopg2.connect(host="127.0.0.1", port=pg["port"], user=st.DB_USER, password=password,
                          dbname="mlflow") as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM registered_models WHERE name LIKE 'stack_%'")
        assert cur.fetchone()[0] == n_models
    with psycopg2.connect(host="127.0.0.1", port=pg["port"], user=st.DB_USER, password=password,
                          dbname="prefect") as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM flow_run WHERE state_type = 'CRASHED'")
        assert cur.fetchone()[0] >= 1
    s3 = boto3.client("s3", endpoint_url=state["s3"]["url"], **{
        k.lower(): v for k, v in st.DEV_S3_KEYS.items() if k != "AWS_DEFAULT_REGION"},
        region_name=st.DEV_S3_KEYS["AWS_DEFAULT_REGION"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=st.BUCKET).get("Contents", [])]
    assert any(k.endswith(c.ADAPTER_WEIGHTS_FILE) for k in keys), keys[:20]


def test_down_stops_everything(stack):
    pids = st.running_pids(stack["state"])
    assert pids
    out = cli("stack", "down", "--home", str(stack["home"] / "stack"), env=stack["env"])
    assert "postgres" in out and "mlflow" in out
    assert not any(st.alive(pid) for pid in pids)
    assert not Path(stack["state"]["postgres"]["data"], "postmaster.pid").exists()
    status = cli("stack", "status", "--home", str(stack["home"] / "stack"), env=stack["env"])
    assert "no stack" in status
