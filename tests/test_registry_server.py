"""Registry tests against a real `mlflow server` (SQLite backend + proxied artifacts in a temp
folder) on 127.0.0.1: the session's restartable server (tests/conftest.py), which the outage test
stops and restarts.

    .venv/bin/pytest tests/test_registry_server.py -q
"""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow_server import client_for
from registry_helpers import PROMPTS, generate_texts, make_candidate, weights_sha
from transformers import AutoTokenizer

import lora_module.registry.register as register_module
from lora_module.registry import register_adapter
from lora_module.registry.retry import RegistryUnavailableError
from lora_module.serving import load_registered

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def server(restartable_mlflow_server, tmp_path_factory, monkeypatch):
    # Locks (and nothing else) live under the pipeline home when a server is used.
    monkeypatch.setenv("LORA_PIPELINE_HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return restartable_mlflow_server


@pytest.fixture(scope="module")
def tokenizer(tiny_t5_dir):
    return AutoTokenizer.from_pretrained(tiny_t5_dir)


def _complete(client: MlflowClient, name: str, version: str) -> None:
    """A complete version: lineage + gate tags, description, finished run, downloadable adapter."""
    mv = client.get_model_version(name, version)
    for tag in ("task", "adapter_sha256", "data_fingerprint", "rouge.rougeL", "gate.decision", "gate.reason"):
        assert tag in mv.tags, f"{name} v{version} lacks tag {tag}"
    assert "lineage.json" in {a.path for a in client.list_artifacts(mv.run_id)}  # the other lineage
    assert "\n# ROUGE evaluation" in mv.description  # after the lineage line
    assert client.get_run(mv.run_id).info.status == "FINISHED"
    files = {a.path for a in client.list_artifacts(mv.run_id, "evaluation")}
    assert "evaluation/report.json" in files


def _digest(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_two_versions_gate_both_ways_and_load_by_alias(server, tiny_t5_dir, tmp_path, tokenizer):
    a1, r1, m1 = make_candidate(tmp_path / "c1", tiny_t5_dir, seed=1, lora_hits=5)
    a2, r2, _ = make_candidate(tmp_path / "c2", tiny_t5_dir, seed=2, lora_hits=3)
    first = register_adapter("srv", a1, r1, tracking_uri=server.uri, retries=2, backoff=0.2)
    second = register_adapter("srv", a2, r2, tracking_uri=server.uri, retries=2, backoff=0.2)
    assert (first.version, first.alias) == ("1", "champion")
    assert (second.version, second.alias) == ("2", "challenger")
    assert "below the current champion v1" in second.decision["reason"]
    client = client_for(server.uri)
    for v in ("1", "2"):
        _complete(client, "srv-lora", v)
    # Artifacts went through the server's proxy into its --artifacts-destination folder.
    assert any(server.artifacts.rglob("adapter_model.safetensors"))
    model, tok = load_registered("srv", tracking_uri=server.uri)
    assert generate_texts(model, tok, PROMPTS[:4]) == generate_texts(m1, tokenizer, PROMPTS[:4])


def test_four_concurrent_registrations(server, tiny_t5_dir, tmp_path):
    hits = [2, 6, 4, 5]
    cands = [make_candidate(tmp_path / f"c{i}", tiny_t5_dir, seed=20 + i, lora_hits=h)
             for i, h in enumerate(hits)]
    barrier = threading.Barrier(len(cands))

    def register(c):
        barrier.wait()
        return register_adapter("conc", c[0], c[1], tracking_uri=server.uri, retries=6, backoff=0.2)

    with ThreadPoolExecutor(len(cands)) as pool:
        results = list(pool.map(register, cands))
    assert sorted(int(r.version) for r in results) == [1, 2, 3, 4]
    assert len({r.run_id for r in results}) == 4
    client = client_for(server.uri)
    for r, c in zip(results, cands, strict=True):
        _complete(client, "conc-lora", r.version)
        assert client.get_model_version("conc-lora", r.version).tags["adapter_sha256"] == weights_sha(c[0])
    # Gate decisions were serialised: whatever the order, the best adapter (6/8) ends as champion.
    best = results[hits.index(6)]
    assert str(client.get_model_version_by_alias("conc-lora", "champion").version) == best.version


def test_outage_clear_error_then_retry_through_restart(server, tiny_t5_dir, tmp_path, monkeypatch):
    adapter, report, _ = make_candidate(tmp_path / "c", tiny_t5_dir, seed=7, lora_hits=4)
    before = (_digest(adapter), _digest(report.parent))
    # 1) The server stops for good in the middle of a registration (run and model already logged,
    #    version not yet created): a clear error naming the URI, and the files on disk untouched.
    real_pending_tags = register_module._pending_gate_tags

    def stop_then_read(*args, **kwargs):
        server.stop()
        return real_pending_tags(*args, **kwargs)

    monkeypatch.setattr(register_module, "_pending_gate_tags", stop_then_read)
    t0 = time.monotonic()
    with pytest.raises(RegistryUnavailableError) as err:
        register_adapter("outage", adapter, report, tracking_uri=server.uri, retries=2, backoff=0.1)
    assert time.monotonic() - t0 < 30
    message = str(err.value)
    assert f"registry at {server.uri} unreachable: read versions of outage-lora failed 3 time(s)" in message
    assert str(adapter) in message and "re-run" in message
    assert (_digest(adapter), _digest(report.parent)) == before
    monkeypatch.setattr(register_module, "_pending_gate_tags", real_pending_tags)

    # 2) Later, from the same files, while the server is still down: the server is restarted during
    #    the registration's retries and the registration completes.
    def restart_soon():
        time.sleep(1.0)
        server.start()

    restarter = threading.Thread(target=restart_soon, daemon=True)
    restarter.start()
    res = register_adapter("outage", adapter, report, tracking_uri=server.uri, retries=12, backoff=0.5,
                           max_backoff=4.0)
    restarter.join()
    assert res.alias == "champion"  # the failed attempt created no version, so no champion existed
    client = client_for(server.uri)
    assert [str(mv.version) for mv in client.search_model_versions("name='outage-lora'")] == [res.version]
    _complete(client, "outage-lora", res.version)
    # The first attempt's run (left RUNNING while the server was away) was closed as FAILED.
    runs = client.search_runs([client.get_run(res.run_id).info.experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
