"""Serving: many tasks in one batch on one base, in process and over HTTP.

The in-process test checks the multi-task predictor against each task's adapter alone (templates and
length limits per task). The integration test registers two tasks against a real `mlflow server`,
removes the training base folder (the logged copy must serve), starts `lora-pipeline serve-model`
from another working directory with a PATH that lacks the venv, and calls it over HTTP: one task,
a mixed batch, bad requests (4xx, then still serving) and a new champion picked up without restart.

    .venv/bin/pytest tests/test_serving.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow_server import free_port
from registry_helpers import make_adapter, make_candidate

from lora_module.prompt import PromptSettings
from lora_module.serving.multitask import MultiTaskPredictor, TaskRef, TaskState
from lora_module.serving.predictor import AdapterPredictor, load_adapter_with_base

TEXTS = ["alice meets bob at the cafe", "please book a table for two people tomorrow evening",
         "my laptop screen is broken", "the train leaves from platform four"]
PROMPTS = {
    "summary": PromptSettings("Summarize: {dialogue}\nSummary:", "dialogue", 24, 8, "seq2seq"),
    "topic": PromptSettings("Topic of: {dialogue}", "dialogue", 16, 3, "seq2seq"),
}


def test_mixed_batch_predictor_matches_each_task_alone(tiny_t5_dir, tmp_path):
    from lora_module import LoraModel, load_base_model

    adapters = {task: make_adapter(tiny_t5_dir, tmp_path / task, seed=i + 3)[0]
                for i, task in enumerate(PROMPTS)}
    alone = {}
    for task, adapter in adapters.items():
        model, tokenizer = load_adapter_with_base(adapter)
        alone[task] = AdapterPredictor(model, tokenizer, PROMPTS[task]).predict(TEXTS)
    assert alone["summary"] != alone["topic"]
    model = LoraModel(load_base_model(str(tiny_t5_dir)), None).eval()
    predictor = MultiTaskPredictor(model, load_adapter_with_base(adapters["topic"])[1],
                                   [TaskRef.parse(t) for t in PROMPTS], refresh_seconds=None)
    for task, adapter in adapters.items():
        model.load_adapter(adapter, f"{task}-v1")
        predictor.states[task] = TaskState(f"{task}-v1", "1", PROMPTS[task], predictor.tokenizer)
    tasks = ["topic", "summary", "summary", "topic", "topic", "summary", "summary", "topic"]
    texts = [TEXTS[i % 4] for i in range(8)]
    out = predictor.predict(tasks, texts, {"batch_size": 3})
    assert out == [alone[task][i % 4] for i, task in enumerate(tasks)]
    assert max(len(o.split()) for o in out if o) > 0
    with pytest.raises(ValueError, match=r"row 1: unknown task 'nope'; tasks served: \['summary', 'topic'\]"):
        predictor.predict(["topic", "nope"], TEXTS[:2])
    predictor.max_input_chars = 10
    with pytest.raises(ValueError, match="row 0: text has 27 characters; the limit is 10"):
        predictor.predict(["topic"], TEXTS[:1])


# ---- over HTTP ----------------------------------------------------------------------------------
def _prepared(root: Path, task: str, tokenizer_dir: Path) -> Path:
    """A prepared-data folder as the data stage leaves it: manifest (template, lengths) + tokenizer."""
    settings = PROMPTS[task]
    manifest = {"model_type": "seq2seq", "config": {
        "prompt_template": settings.template, "input_column": "dialogue",
        "max_source_length": settings.max_source_length, "max_target_length": settings.max_target_length}}
    (root / task).mkdir(parents=True)
    (root / task / "manifest.json").write_text(json.dumps(manifest))
    shutil.copytree(tokenizer_dir, root / task / "tokenizer")
    return root / task / "tokenizer"


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class Served:
    """`lora-pipeline serve-model URI` in its own process group, from `cwd`, PATH without the venv."""

    def __init__(self, model_uri: str, cwd: Path, tracking_uri: str) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LORA_PIPELINE_HOME")}
        env["PATH"] = "/usr/bin:/bin"
        exe = Path(sys.executable).parent / "lora-pipeline"
        cmd = [str(exe), "serve-model", model_uri, "--port", str(self.port), "--tracking-uri", tracking_uri,
               "--refresh-seconds", "0"]
        self.log = cwd / f"serve-{self.port}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.started = time.monotonic()

    def wait_ready(self, timeout: float = 120) -> float:
        while time.monotonic() - self.started < timeout:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=1) as r:
                    if r.status == 200:
                        return time.monotonic() - self.started
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"not ready in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def invoke(self, records: list[dict], **params) -> tuple[int, dict]:
        payload = {"dataframe_records": records, **({"params": params} if params else {})}
        return _post(f"{self.url}/invocations", payload)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture
def registry(tmp_path, mlflow_server, monkeypatch):
    """The session's shared MLflow server, for this test only (its tasks' names are used nowhere else)."""
    monkeypatch.setenv("LORA_PIPELINE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("LORA_BASE_CACHE", str(tmp_path / "base-cache"))
    return tmp_path, mlflow_server


@pytest.mark.slow
@pytest.mark.integration
def test_serve_single_and_multitask_over_http(registry, tiny_t5_dir):
    from lora_module.registry import register_adapter
    from lora_module.registry.multitask import register_multitask
    from lora_module.serving import load_predictor, load_registered

    root, server = registry
    base = shutil.copytree(tiny_t5_dir, root / "train" / "base")  # the training machine's base folder
    for task in PROMPTS:
        adapter, report, _ = make_candidate(root / "train" / task, base, seed=len(task), lora_hits=4,
                                           prompt=None)
        tok = _prepared(root / "train" / "prepared", task, tiny_t5_dir)
        assert register_adapter(task, adapter, report, prepared_dir=tok.parent, retries=1).alias == "champion"
    expected = {task: load_predictor(task).predict(TEXTS) for task in PROMPTS}
    uri = register_multitask(["summary", "topic"])
    shutil.rmtree(base)  # from here on the base exists only as the copy logged to the server
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    multi = Served("models:/lora-tasks@champion", elsewhere, server.uri)
    single = Served("models:/summary-lora@champion", elsewhere, server.uri)
    try:
        ready = multi.wait_ready(), single.wait_ready()
        start = time.monotonic()
        assert single.invoke([{"text": t} for t in TEXTS]) == (200, {"predictions": expected["summary"]})
        first = time.monotonic() - start
        tasks = ["topic", "summary", "summary", "topic"]
        status, body = multi.invoke([{"task": t, "text": x} for t, x in zip(tasks, TEXTS, strict=True)])
        assert status == 200, body
        assert body["predictions"] == [expected[t][i] for i, t in enumerate(tasks)]
        _bad_requests_are_4xx(single, multi)
        _new_champion_is_served(root, base=tiny_t5_dir, multi=multi)
        rows = [{"task": tasks[i % 4], "text": TEXTS[i % 4]} for i in range(16)]
        start = time.monotonic()
        for _ in range(3):
            assert multi.invoke(rows)[0] == 200
        per_row = (time.monotonic() - start) / 48
        print(f"\nready {ready[0]:.1f}/{ready[1]:.1f} s (multi/single, started together), first request "
              f"{first:.2f} s (4 rows), steady state {1000 * per_row:.1f} ms/row (16-row mixed batches), "
              f"{uri}")
    finally:
        multi.stop()
        single.stop()
    assert load_registered("summary")[0] is not None  # the logged base serves in-process as well


def _bad_requests_are_4xx(single: Served, multi: Served) -> None:
    status, body = multi.invoke([{"task": "nope", "text": "hi"}])
    assert status == 400 and "unknown task 'nope'; tasks served: ['summary', 'topic']" in body["message"]
    status, body = multi.invoke([{"text": "hi"}])
    assert status == 400 and "task" in body["message"], body
    status, body = multi.invoke([{"task": "topic", "text": "x" * 20_001}])
    assert status == 400 and "the limit is 20000" in body["message"], body
    status, body = single.invoke([{"prompt": "hi"}])
    assert status == 400 and "text" in body["message"], body
    status, body = multi.invoke([{"task": "topic", "text": "hi"}], max_new_tokens=0)
    assert status == 400 and "max_new_tokens" in body["message"], body
    status, body = multi.invoke([{"task": "topic", "text": TEXTS[0]}], max_new_tokens=2)
    assert status == 200 and len(body["predictions"]) == 1  # still serving


def _new_champion_is_served(root: Path, base: Path, multi: Served) -> None:
    """A better topic adapter registered while the server runs is served by the next request."""
    from lora_module.registry import register_adapter
    from lora_module.serving import load_predictor

    rows = [{"task": "topic", "text": t} for t in TEXTS]
    before = multi.invoke(rows)[1]["predictions"]
    adapter, report, _ = make_candidate(root / "train" / "topic2", base, seed=99, lora_hits=7, prompt=None)
    tok = _prepared(root / "train" / "prepared2", "topic", base)
    assert register_adapter("topic", adapter, report, prepared_dir=tok.parent, retries=1).alias == "champion"
    new = load_predictor("topic", base=str(base)).predict(TEXTS)
    status, body = multi.invoke(rows)
    assert status == 200 and body["predictions"] != before, body
    # Random tiny models have near-tied logits: a greedy token may flip between two processes'
    # kernels, so "the new adapter serves" is checked as most rows equal to its in-process outputs.
    assert sum(a == b for a, b in zip(body["predictions"], new, strict=True)) >= 3, (body, new)
