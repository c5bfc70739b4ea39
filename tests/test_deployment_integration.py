"""Deployments end to end against real servers on 127.0.0.1.

The session's Prefect server and shared `mlflow server` (tests/conftest.py) + `prefect deploy` from
deploy/prefect.yaml (its `lora-summary` deployment, pointed at a tiny task spec and a test work
pool) + a process worker (`prefect worker start --pool ...`) started and stopped by this test. A
triggered run of the deployment must complete and register a version in the MLflow server's
registry, and the deployment must carry the schedule written in prefect.yaml.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow_server import client_for, log_tail

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "deploy" / "configs"
POOL = "lora-it-pool"
DEPLOYMENT = "lora-task/lora-summary"


class Process:
    """A child process in its own process group, logging to a file; stop() ends exactly that group."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str], cwd: Path = REPO):
        self.log = log
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                         start_new_session=True)

    def tail(self) -> str:
        return log_tail(self.log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def cli(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    res = subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, f"prefect {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_t5_dir, prefect_api, mlflow_server):
    """A work pool and the deployment on the session's Prefect server, and a process worker; runs
    register into the shared MLflow server (task `tiny_summary`: no other test there uses it)."""
    root = tmp_path_factory.mktemp("stack")
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_API_URL": prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "MLFLOW_TRACKING_URI": mlflow_server.uri,
        "LORA_PIPELINE_HOME": str(root / "home"),
        "OMP_NUM_THREADS": "1",
    }
    procs: list[Process] = []
    try:
        spec = root / "tiny_summary.yaml"
        spec.write_text(yaml.safe_dump({
            "name": "tiny_summary",
            "data_config": str(CONFIGS / "data_demo_summary.yaml"),
            "lora_config": str(CONFIGS / "demo_summary_lora.yaml"),
            "base_model": str(tiny_t5_dir),
            "generation": {"batch_size": 8, "max_new_tokens": 8, "max_source_length": 128},
            "data_overrides": {"demo_train_size": 40, "demo_validation_size": 8, "demo_test_size": 8,
                               "max_source_length": 128},
            "train_overrides": ["--trainer.max_steps", "2", "--data.batch_size", "8",
                                "--trainer.enable_progress_bar", "false"],
        }))
        # deploy/prefect.yaml, pointed at the tiny spec and the test's pool; schedules as written.
        config = yaml.safe_load((REPO / "deploy" / "prefect.yaml").read_text())
        config["deployments"] = [d for d in config["deployments"] if d["name"] == "lora-summary"]
        deployment = config["deployments"][0]
        deployment["work_pool"] = {**deployment["work_pool"], "name": POOL}
        deployment["parameters"] = {**deployment["parameters"], "task": str(spec), "home": str(root / "home"),
                                    "registry_retries": 1}
        prefect_yaml = root / "prefect.yaml"
        prefect_yaml.write_text(yaml.safe_dump(config, sort_keys=False))

        cli(env, "work-pool", "create", POOL, "--type", "process")
        cli(env, "--no-prompt", "deploy", "--prefect-file", str(prefect_yaml), "--name", "lora-summary")
        worker = Process([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--limit", "1"],
                         root / "worker.log", env)
        procs.append(worker)
        yield {"api": prefect_api, "mlflow": mlflow_server, "env": env, "worker": worker, "root": root,
               "expected": yaml.safe_load((REPO / "deploy" / "prefect.yaml").read_text())}
    finally:
        for p in reversed(procs):
            p.stop()


def test_deployment_runs_on_worker_and_registers(stack):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack["api"]}):
        run = run_deployment(DEPLOYMENT, timeout=900)
        assert run.state.is_completed(), (
            f"flow run ended {run.state.type}: {run.state.message}\n--- worker ---\n{stack['worker'].tail()}"
        )

        async def read():
            async with get_client() as client:
                return await client.read_deployment_by_name(DEPLOYMENT)

        deployment = asyncio.run(read())
    expected = next(d for d in stack["expected"]["deployments"] if d["name"] == "lora-summary")
    crons = [s.schedule.cron for s in deployment.schedules]
    assert crons == [s["cron"] for s in expected["schedules"]] and all(s.active for s in deployment.schedules)
    assert deployment.work_pool_name == POOL

    client = client_for(stack["mlflow"].uri)
    versions = client.search_model_versions("name='tiny_summary-lora'")
    assert [str(v.version) for v in versions] == ["1"]
    assert versions[0].tags["task"] == "tiny_summary"
    assert client.get_registered_model("tiny_summary-lora").aliases  # champion or challenger

