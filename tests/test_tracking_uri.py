"""`--tracking-uri` is honoured by every command that takes it, and by every call beneath it.

    .venv/bin/pytest tests/test_tracking_uri.py -q

Each command runs as a new user's shell would run it: `LORA_PIPELINE_HOME` an empty folder,
`MLFLOW_TRACKING_URI` unset, MLflow's process-wide URIs unset (as in a fresh process) and an empty
working directory, with `--tracking-uri` naming the session's real `mlflow server`. Everything must
be written to and read from that server: afterwards neither the home nor the working directory
holds an MLflow store (`mlflow.db`, `mlartifacts/`, `mlruns/`). One module-scoped registration of
three tiny adapters (through `lora-pipeline register`) serves every test; the task names are this
module's own, as the shared server requires.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow.tracking._model_registry.utils as registry_uri_state
import mlflow.tracking._tracking_service.utils as tracking_uri_state
import pytest
from mlflow_server import client_for
from registry_helpers import PROMPTS, generate_texts, make_candidate
from transformers import AutoTokenizer

import lora_module.serving.cli as serving_cli
from lora_pipeline.flows.cli import main as lora_pipeline

TASKS = ("uri-summary", "uri-topic", "uri-manual")  # registered models <task>-lora on the shared server
STORE_NAMES = ("mlflow.db", "mlartifacts", "mlruns")


@contextmanager
def new_user(root: Path) -> Iterator[Path]:
    """An empty home and working directory, no tracking URI anywhere: what a fresh shell has."""
    home, cwd = root / "home", root / "cwd"
    home.mkdir(parents=True)
    cwd.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_PIPELINE_HOME", str(home))
        mp.setenv("LORA_BASE_CACHE", str(root / "base-cache"))  # a logged base is downloaded, not reused
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "LORA_BASE_MODEL_PATH", "OMP_NUM_THREADS"):
            mp.delenv(key, raising=False)
        # What an earlier test set process-wide (mlflow.set_tracking_uri) would hide a call that
        # forgets the URI; a new process starts with neither.
        mp.setattr(tracking_uri_state, "_tracking_uri", None)
        mp.setattr(registry_uri_state, "_registry_uri", None)
        mp.chdir(cwd)
        yield home


def assert_no_local_store(root: Path) -> None:
    """Nothing MLflow writes for a local store exists under the home or the working directory."""
    found = [str(p) for name in STORE_NAMES for p in root.rglob(name)]
    assert found == [], f"a local MLflow store was created: {found}"


@pytest.fixture(scope="module")
def registered(mlflow_server, tiny_t5_dir, tmp_path_factory) -> dict:
    """Three tasks registered through `lora-pipeline register --tracking-uri`, each from a base folder
    that is deleted afterwards (so loading must take the base's logged copy from the server)."""
    root = tmp_path_factory.mktemp("uri")
    base = root / "base"
    shutil.copytree(tiny_t5_dir, base)
    models = {}
    with new_user(root / "register"):
        for seed, task in enumerate(TASKS):
            adapter, report, model = make_candidate(root / task, base, seed=60 + seed, lora_hits=5)
            rc = lora_pipeline(["register", task, str(adapter), "--report", str(report),
                                "--tracking-uri", mlflow_server.uri, "--retries", "1"])
            assert rc == 0
            models[task] = model
    shutil.rmtree(base)
    return {"uri": mlflow_server.uri, "root": root, "models": models}


def test_register_writes_only_to_the_server(registered):
    client = client_for(registered["uri"])
    for task in TASKS:
        mv = client.get_model_version_by_alias(f"{task}-lora", "champion")
        assert mv.version == "1" and mv.tags["task"] == task
        assert client.get_run(mv.run_id).info.status == "FINISHED"
    assert_no_local_store(registered["root"] / "register")


def test_list_show_promote_demote_read_the_server(registered, tmp_path, capsys):
    uri = ["--tracking-uri", registered["uri"]]
    name = f"{TASKS[2]}-lora"
    with new_user(tmp_path):
        assert lora_pipeline(["list", TASKS[2], *uri]) == 0
        assert f"{name} (task {TASKS[2]}): 1 version(s)" in capsys.readouterr().out
        assert lora_pipeline(["show", TASKS[2], "@champion", "--json", *uri]) == 0
        assert json.loads(capsys.readouterr().out)["version"] == "1"
        assert lora_pipeline(["demote", TASKS[2], "--reason", "uri test", *uri]) == 0
        assert client_for(registered["uri"]).get_registered_model(name).aliases == {}
        assert lora_pipeline(["promote", TASKS[2], "1", "--reason", "uri test", *uri]) == 0
        client = client_for(registered["uri"])
        assert client.get_registered_model(name).aliases == {"champion": "1"}
        assert client.get_model_version(name, "1").tags["manual.last"] == "promoted to champion: uri test"
        assert lora_pipeline(["list", *uri]) == 0  # every model: read from the server, not the home
        assert f"{name} (task {TASKS[2]})" in capsys.readouterr().out
    assert_no_local_store(tmp_path)


def test_predict_reads_adapter_and_logged_base_from_the_server(registered, tmp_path, capsys, tiny_t5_dir):
    task = TASKS[0]
    with new_user(tmp_path):
        argv = ["predict", task, "--text", PROMPTS[0], "--text", PROMPTS[1], "--max-new-tokens", "6",
                "--json", "--tracking-uri", registered["uri"]]
        assert lora_pipeline(argv) == 0
    outputs = [row["output"] for row in json.loads(capsys.readouterr().out)]
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5_dir)
    assert outputs == generate_texts(registered["models"][task], tokenizer, PROMPTS[:2], max_new_tokens=6)
    assert any((tmp_path / "base-cache").rglob("model.safetensors"))  # the base came from the server
    assert_no_local_store(tmp_path)


def test_register_multitask_resolves_and_registers_on_the_server(registered, tmp_path, capsys):
    with new_user(tmp_path):
        rc = lora_pipeline(["register-multitask", "--tasks", TASKS[0], TASKS[1], "--name", "uri-tasks",
                            "--tracking-uri", registered["uri"]])
        assert rc == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip().splitlines()[-1] == "models:/uri-tasks/1"
    client = client_for(registered["uri"])
    mv = client.get_model_version_by_alias("uri-tasks", "champion")
    tasks = client.get_run(mv.run_id).data.tags["tasks"]
    assert mv.version == "1" and tasks == " ".join(f"models:/{t}-lora@champion" for t in TASKS[:2])
    assert_no_local_store(tmp_path)


def test_serve_model_checks_the_server_and_hands_it_to_the_server_process(registered, tmp_path, capsys,
                                                                          monkeypatch):
    started = []
    monkeypatch.setattr(serving_cli.os, "execve", lambda exe, cmd, env: started.append((cmd, env)))
    uri = registered["uri"]
    with new_user(tmp_path):
        model = f"models:/{TASKS[0]}-lora@champion"
        assert lora_pipeline(["serve-model", model, "--port", "5999", "--tracking-uri", uri]) == 0
        missing = f"models:/{TASKS[0]}-lora@nobody"
        assert lora_pipeline(["serve-model", missing, "--tracking-uri", uri]) == 2
    ((cmd, env),) = started  # the unregistered alias stopped before a server was started
    assert cmd[cmd.index("-m", 2) + 1] == model
    assert env["MLFLOW_TRACKING_URI"] == env["MLFLOW_REGISTRY_URI"] == uri
    assert env["OMP_NUM_THREADS"] == "1"  # serving's default: one torch thread per worker
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and missing in err and uri in err and len(err.splitlines()) == 1
    assert_no_local_store(tmp_path)
