"""No credentials from the tracking URI in anything we record, log, tag or print (#27, "Security").

A user's `MLFLOW_TRACKING_URI` / `--tracking-uri` may be `http://alice:PASSWORD@host:port`. The
connection keeps working (the test's `mlflow server` ignores basic-auth userinfo, which is fine: the
client still sends it), but the password may not appear in: the training run's `tracking_uri` tag,
metrics.json, config.yaml, fit.log, the registration's lineage.json and tags, the flow's console output,
Prefect's stored flow parameters or any other file the run writes (checked byte for byte, binary files
included). The password is a unique string so that a chance match in binary data cannot pass as a leak.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow_server import client_for
from test_flows import write_spec

from lora_module import contracts as c
from lora_module.lineage import same_store
from lora_module.training.launcher import run_fit

SECRET = "PWs3cr3t-7f1c9e"
ROOT = Path(__file__).resolve().parents[1]


def _with_password(uri: str) -> str:
    return uri.replace("http://", f"http://alice:{SECRET}@", 1)


def _files_with_secret(*roots: Path) -> list[str]:
    hits = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink() and SECRET.encode() in path.read_bytes():
                hits.append(str(path))
    return hits


def test_same_store_ignores_masked_credentials():
    assert same_store("http://***@127.0.0.1:5000", f"http://alice:{SECRET}@127.0.0.1:5000/")
    assert not same_store("http://***@127.0.0.1:5000", f"http://alice:{SECRET}@127.0.0.1:5001")


def test_training_with_credentials_in_the_environment_records_none(mlflow_server, tmp_path, tiny_t5_dir,
                                                                   seq2seq_tokenizer_dir, monkeypatch):
    from test_training import prepare_tiny

    uri = _with_password(mlflow_server.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    prepared = prepare_tiny(seq2seq_tokenizer_dir, "seq2seq", tmp_path / "prepared")
    out = run_fit(ROOT / "deploy" / "configs" / "demo_summary_lora.yaml",
                  ["--model.model_name_or_path", str(tiny_t5_dir), "--data.prepared_dir", str(prepared),
                   "--trainer.max_steps", "1", "--trainer.accelerator", "cpu", "--data.batch_size", "4",
                   "--trainer.logger.init_args.task", "creds_env"], output_dir=tmp_path / "out")
    metrics = json.loads((out / c.METRICS_FILE).read_text())
    assert metrics["mlflow_tracking_uri"] == mlflow_server.uri.replace("http://", "http://***@")
    run = client_for(mlflow_server.uri).get_run(metrics["mlflow_run_id"])  # it reached the server
    assert run.data.tags[c.TAG_TRACKING_URI] == metrics["mlflow_tracking_uri"]
    assert SECRET not in json.dumps(run.data.tags) + json.dumps(run.data.params)
    assert _files_with_secret(tmp_path) == []
    assert _files_with_secret(mlflow_server.artifacts) == []  # the uploaded config.yaml, metrics.json


def test_standalone_fit_prints_no_password(mlflow_server, tmp_path, tiny_t5_dir, seq2seq_tokenizer_dir):
    """`lora-pipeline fit` run by hand: MLflow's "View run ... at: <URI>" line would carry the password."""
    import os
    import subprocess
    import sys

    from test_training import prepare_tiny

    prepared = prepare_tiny(seq2seq_tokenizer_dir, "seq2seq", tmp_path / "prepared")
    env = {**os.environ, "MLFLOW_TRACKING_URI": _with_password(mlflow_server.uri), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", None)
    res = subprocess.run(
        [str(Path(sys.executable).parent / "lora-pipeline"), "fit", "--config",
         str(ROOT / "deploy" / "configs" / "demo_summary_lora.yaml"),
         "--model.model_name_or_path", str(tiny_t5_dir),
         "--data.prepared_dir", str(prepared), "--trainer.max_steps", "1", "--trainer.accelerator", "cpu",
         "--data.batch_size", "4", "--model.output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((tmp_path / "out" / c.METRICS_FILE).read_text())
    assert client_for(mlflow_server.uri).get_run(metrics["mlflow_run_id"])  # it logged to the server
    assert SECRET not in res.stdout + res.stderr
    assert _files_with_secret(tmp_path) == []


@pytest.mark.slow
def test_flow_with_tracking_uri_credentials_prints_records_and_tags_none(
        harness, prefect_api, mlflow_server, tmp_path, tiny_t5_dir, capfd):
    """Slow (~1 min on 2 cores): one whole flow run (prepare, evaluate, train, evaluate, register)."""
    from lora_pipeline.flows.pipeline import main

    uri = _with_password(mlflow_server.uri)
    spec = write_spec(tmp_path, "creds_flow", "summary", tiny_t5_dir, full=False, eval_limit=4)
    home = tmp_path / "home"
    assert main(["--task", str(spec), "--home", str(home), "--tracking-uri", uri, "--no-full",
                 "--max-concurrency", "1"]) == 0
    captured = capfd.readouterr()
    summary = json.loads(captured.out[captured.out.index("{"):])
    result = summary["results"]["creds_flow"]
    assert SECRET not in captured.out + captured.err
    assert "***@" in result["tracking_uri"] and SECRET not in result["mlflow_link"]

    client = client_for(mlflow_server.uri)  # registered on the server the URI names
    version = client.get_model_version(result["model_name"], result["version"])
    assert SECRET not in json.dumps(version.tags) + (version.description or "")
    training = client.get_run(version.tags["training_run_id"])
    assert training.data.tags[c.TAG_TRACKING_URI].startswith("http://***@")
    registration = client.get_run(result["run_id"])
    assert SECRET not in json.dumps(registration.data.tags) + json.dumps(registration.data.params)
    assert _files_with_secret(tmp_path, mlflow_server.artifacts, harness) == []
    # Prefect's own record of the flow runs (their parameters) in its server's database.
    assert _files_with_secret(Path(harness).parent) == [], "Prefect stored the credentials"
