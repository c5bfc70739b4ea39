"""What a user sees in the MLflow and Prefect UIs after training, evaluating and registering an adapter.

    .venv/bin/pytest tests/test_ui_pages.py -q                       # ~1-2 min; skipped without chromium
    UI_SCREENSHOTS=/tmp/ui .venv/bin/pytest tests/test_ui_pages.py   # also keep the PNG screenshots

Real servers on 127.0.0.1 (`mlflow server`, `prefect server start` with its UI), the real code (a
2-step `lora-pipeline fit`, `build_report`, `register_adapter`, the flow's ROUGE artifact), and
headless Chromium (`apt-get install chromium`) rendering the single-page apps: `--dump-dom` after
the JavaScript ran (`--virtual-time-budget`) gives the text a user reads on the MLflow training run,
registration run and model-version pages and on the Prefect artifact page; `--screenshot` the look.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow_server import client_for, free_port, wait_http
from registry_helpers import make_report
from test_training import prepare_tiny
from test_training_cli import DEMO_CONFIG, overrides

from lora_module.registry import register_adapter
from lora_module.training.cli import main as fit_main

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"headless browser {CHROMIUM} not installed "
                       "(apt-get install chromium)"),
]
TASK = "ui_demo"


def browse(url: str, screenshot: Path | None = None, budget_ms: int = 15000) -> str:
    """The page's DOM after its scripts ran (and a PNG of it when `screenshot` is given)."""
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--virtual-time-budget={budget_ms}", "--window-size=1400,1000"]
    if screenshot is not None:
        subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120,
                       check=True)
    return subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120,
                          check=True).stdout


def text_of(dom: str) -> str:
    """Visible-ish text: tags and scripts dropped, whitespace collapsed."""
    dom = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("UI_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_t5_dir, seq2seq_tokenizer_dir, mlflow_server) -> dict:
    """A 2-step training logged to the session's shared MLflow server, its report, and its registration
    (task TASK: no other test uses that name)."""
    root = tmp_path_factory.mktemp("ui")
    saved_env = dict(os.environ)
    try:
        prepared = prepare_tiny(seq2seq_tokenizer_dir, "seq2seq", root / "data")
        out = root / "run"
        fit_main(["fit", "--config", str(DEMO_CONFIG), *overrides(tiny_t5_dir, prepared, out, 2),
                  "--trainer.logger.init_args.task", TASK,
                  "--trainer.logger.init_args.tracking_uri", mlflow_server.uri])
        report = make_report(root / "eval", out / "adapter", lora_hits=6, base_hits=1, task=TASK)
        res = register_adapter(TASK, out / "adapter", report, train_dir=out, tracking_uri=mlflow_server.uri,
                               retries=1, backoff=0.1)
    finally:  # the in-process fit exported MLFLOW_TRACKING_URI: later tests must not inherit it
        os.environ.clear()
        os.environ.update(saved_env)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"server": mlflow_server, "res": res, "report": report, "training_run": metrics["mlflow_run_id"],
            "client": client_for(mlflow_server.uri)}


def test_mlflow_training_run_page_shows_lineage(registered, shots):
    client, run_id = registered["client"], registered["training_run"]
    run = client.get_run(run_id)
    url = f"{registered['server'].uri}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    page = text_of(browse(url, shots / "mlflow_training_run.png"))
    assert run.info.run_name in page and f"lora-{TASK}" in page
    res = registered["res"]
    assert f"Registered as {res.model_name} v{res.version}" in page  # the note linking the version
    for tag in ("data_fingerprint", "base_fingerprint", "registered_version"):
        assert tag in page, f"{tag} not shown on the training run page"


def test_mlflow_registration_run_page_shows_rouge_and_report(registered, shots):
    res, client = registered["res"], registered["client"]
    run = client.get_run(res.run_id)
    url = f"{registered['server'].uri}/#/experiments/{run.info.experiment_id}/runs/{res.run_id}"
    page = text_of(browse(url, shots / "mlflow_registration_run.png"))
    assert "rouge.lora.rougeL" in page and "0.75" in page
    artifacts = text_of(browse(f"{url}/artifacts/evaluation/report.md", shots / "mlflow_report.png"))
    assert "ROUGE evaluation" in artifacts and "report.md" in artifacts


def test_mlflow_model_version_page_shows_gate_lineage_and_report(registered, shots):
    res, client = registered["res"], registered["client"]
    base = registered["server"].uri
    dom = browse(f"{base}/#/models/{res.model_name}/versions/{res.version}", shots / "mlflow_version.png")
    page = text_of(dom)
    assert "Trained in MLflow run" in page and "ROUGE evaluation" in page  # description: link + report
    train_exp = client.get_run(registered["training_run"]).info.experiment_id
    assert f'href="#/experiments/{train_exp}/runs/{registered["training_run"]}"' in dom
    assert "gate.decision" in page and "promoted" in page and "0.7500" in page
    model_page = text_of(browse(f"{base}/#/models/{res.model_name}", shots / "mlflow_model.png"))
    assert "champion" in model_page


@pytest.fixture(scope="module")
def prefect_ui(tmp_path_factory):
    """A real `prefect server start` with its UI; yields its base URL."""
    root = tmp_path_factory.mktemp("prefect")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(root), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    log = root / "server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port), "--analytics-off"], stdout=f, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", proc, log, timeout=240)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_prefect_artifact_page_shows_the_rouge_table(registered, prefect_ui, shots):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from lora_pipeline.flows.pipeline import _publish

    res, report_path = registered["res"], registered["report"]
    reg = {"model_name": res.model_name, "version": res.version, "alias": res.alias, "run_id": res.run_id,
           "tracking_uri": res.tracking_uri, "decision": res.decision}

    @flow(name="ui-artifact-check")
    def publish() -> None:
        _publish(TASK, json.loads(Path(report_path).read_text()), reg, str(report_path))

    with temporary_settings({PREFECT_API_URL: f"{prefect_ui}/api"}):
        state = publish(return_state=True)
        flow_run_id = state.state_details.flow_run_id
        with get_client(sync_client=True) as client:
            artifact = next(a for a in client.read_artifacts() if a.flow_run_id == flow_run_id)
            flow_run = client.read_flow_run(flow_run_id)
    page = text_of(browse(f"{prefect_ui}/artifacts/artifact/{artifact.id}", shots / "prefect_artifact.png"))
    assert "ROUGE on 8 test examples" in page and "ROUGE-Lsum" in page and "75.00" in page
    assert f"{res.model_name} v{res.version}" in page and res.run_id in page  # the version, the MLflow link
    assert artifact.key in page and flow_run.name in page  # the page names the flow run it belongs to
    # The flow-run page draws its artifacts on a canvas: only a screenshot to look at.
    run_page = text_of(browse(f"{prefect_ui}/runs/flow-run/{flow_run_id}", shots / "prefect_flow_run.png"))
    assert flow_run.name in run_page and "Completed" in run_page
