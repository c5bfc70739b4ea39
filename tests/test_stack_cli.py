"""`lora-pipeline stack` and the fan-out's parameters without starting anything (seconds).

The stack itself, servers and workers, is tested end to end in tests/test_stack.py (slow).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_module.errors import run_cli
from lora_pipeline.deploy import stack as st
from lora_pipeline.flows.fanout import pool_params


def test_status_and_down_of_a_home_without_a_stack(tmp_path, capsys):
    assert run_cli(st.main, ["status", "--home", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"no stack in {tmp_path} (`stack up` starts one)"
    assert run_cli(st.main, ["down", "--home", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "stopped: nothing was running"


def test_bad_worker_count_and_missing_postgres_are_one_line_errors(tmp_path, capsys):
    assert run_cli(st.main, ["up", "--home", str(tmp_path), "--workers", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --workers must be >= 0, got -1"
    with pytest.raises(st.StackError, match=r"PostgreSQL not found .*--pg-bin DIR$"):
        st.pg_bin(str(tmp_path / "nowhere"))
    assert not (tmp_path / st.STATE_FILE).exists()  # nothing was started, nothing recorded


def test_home_comes_from_the_option_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STACK_HOME", str(tmp_path / "env"))
    assert st.resolve_home(None) == tmp_path / "env"
    assert st.resolve_home(str(tmp_path / "opt")) == tmp_path / "opt"
    monkeypatch.delenv("LORA_STACK_HOME")
    monkeypatch.chdir(tmp_path)
    assert st.resolve_home(None) == tmp_path / ".lora_stack"


def _state(tmp_path: Path) -> dict:
    pw = tmp_path / "password"
    pw.write_text("s3cr3t-pw\n")
    return {"home": str(tmp_path), "pool": st.POOL,
            "postgres": {"port": 5999, "data": str(tmp_path / "data"), "bin": "/x", "password_file": str(pw)},
            "s3": {"pid": 0, "url": "http://127.0.0.1:7001", "log": str(tmp_path / "s3.log")},
            "mlflow": {"pid": 0, "url": "http://127.0.0.1:7002", "log": str(tmp_path / "mlflow.log")},
            "prefect": {"pid": 0, "url": "http://127.0.0.1:7003/api", "log": str(tmp_path / "prefect.log")},
            "workers": [{"pid": 0, "name": "stack-w1", "home": str(tmp_path / "w1"),
                         "log": str(tmp_path / "worker-1.log")}]}


def test_exports_and_status_redact_the_database_password(tmp_path):
    state = _state(tmp_path)
    (tmp_path / st.STATE_FILE).write_text(json.dumps(state))
    lines = st.exports(state)
    assert lines[:2] == ["export MLFLOW_TRACKING_URI=http://127.0.0.1:7002",
                         "export PREFECT_API_URL=http://127.0.0.1:7003/api"]
    text = "\n".join(lines + st.status(tmp_path))
    assert "s3cr3t-pw" not in text
    assert "postgresql+psycopg2://***@127.0.0.1:5999/mlflow" in text
    assert "postgresql+asyncpg://***@127.0.0.1:5999/prefect" in text
    assert "AWS_ACCESS_KEY_ID=lora-dev-key" in text  # the fake dev keys may show
    status = st.status(tmp_path)
    assert status[0].startswith("postgres  stopped") and all(" stopped " in line for line in status[1:])
    assert st.running_pids(state) == []


def test_pool_runs_get_the_overrides_but_not_the_parents_home_threads_or_base_path():
    params = {"home": "/parent/home", "tracking_uri": "sqlite:////parent/home/mlflow.db", "threads": 2,
              "checked": True, "eval_limit": 8, "train_overrides": ["--trainer.max_steps", "3"],
              "data_overrides": None, "registry_retries": 2}
    sent = pool_params(params, base_model=None, demo_base=None, tracking_uri=None)
    assert sent == {"eval_limit": 8, "train_overrides": ["--trainer.max_steps", "3"], "registry_retries": 2}
    sent = pool_params(params, base_model="demo", demo_base={"seed": 1}, tracking_uri="http://127.0.0.1:5000")
    assert sent["base_model"] == "demo" and sent["demo_base"] == {"seed": 1}
    assert sent["tracking_uri"] == "http://127.0.0.1:5000" and "home" not in sent
