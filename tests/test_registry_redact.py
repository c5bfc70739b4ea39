"""No tracking-store password leaves the registry (issue #27 item 5, registry side): version tags
(`training_run_store`), lineage.json, the version description, the run's params, the console, and
every "registry unreachable" line show `http://***@host`, while the connection uses the real URI.

    .venv/bin/pytest tests/test_registry_redact.py -q
"""

from __future__ import annotations

import functools
import json
import logging

import mlflow
import pytest
import yaml
from mlflow_server import client_for, free_port
from registry_helpers import make_adapter, make_candidate

from lora_module import contracts as c
from lora_module.errors import run_cli
from lora_module.registry import multitask, store
from lora_module.registry.cli import main as cli_main
from lora_module.registry.register import register_adapter
from lora_module.registry.retry import RegistryUnavailableError

SECRETS = ("s3cret", "pw2", "pw3")


def _with_password(uri: str, user: str = "alice", password: str = "s3cret") -> str:
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://{user}:{password}@{rest}"


def _clean(text: str) -> bool:
    return not any(s in text for s in SECRETS)


def _everything_printed(capsys, caplog) -> str:
    out = capsys.readouterr()
    return out.out + out.err + caplog.text


def test_unreachable_registry_lines_mask_the_password(tiny_t5_dir, tmp_path, capsys, caplog):
    """register_adapter, `lora-pipeline list` and `register-multitask` against a store that is down."""
    caplog.set_level(logging.INFO)
    down = _with_password(f"http://127.0.0.1:{free_port()}")
    adapter, _ = make_adapter(tiny_t5_dir, tmp_path / "adapter", seed=1)
    with pytest.raises(RegistryUnavailableError) as info:
        register_adapter("redact", adapter, tracking_uri=down, retries=0)
    assert "***@127.0.0.1" in str(info.value) and _clean(str(info.value))
    assert run_cli(cli_main, ["list", "--tracking-uri", down, "--retries", "0"]) == 2
    assert run_cli(cli_main, ["show", "redact", "1", "--tracking-uri", down, "--retries", "0"]) == 2
    with pytest.MonkeyPatch.context() as mp:  # one attempt, not the serving default's 7 s of retries
        mp.setattr(multitask, "download_adapter", functools.partial(store.download_adapter, retries=0))
        assert run_cli(multitask.main, ["--tasks", "redact", "--tracking-uri", down]) == 2
    printed = _everything_printed(capsys, caplog)
    lines = [line for line in printed.splitlines() if line.startswith("error:")]
    assert len(lines) == 3 and all("***@127.0.0.1" in line for line in lines), lines
    assert _clean(printed), printed


def _training_outputs(root, other_store: str):
    """A training folder whose run lives in another (password-protected, unreachable) store and whose
    config names a logger URI with a password."""
    root.mkdir(parents=True)
    metrics = {"mlflow_run_id": "0123abcd", "mlflow_tracking_uri": other_store}
    (root / c.METRICS_FILE).write_text(json.dumps(metrics))
    config = {"trainer": {"logger": {"init_args": {"tracking_uri": "http://carol:pw3@mlflow.internal:5000"}}}}
    (root / c.CONFIG_FILE).write_text(yaml.safe_dump(config))
    return root


def test_what_a_registration_records_masks_every_password(mlflow_server, tiny_t5_dir, tmp_path, capsys,
                                                          caplog):
    caplog.set_level(logging.INFO)
    uri = _with_password(mlflow_server.uri)
    other = _with_password(f"http://127.0.0.1:{free_port()}", "bob", "pw2")
    adapter, report, _ = make_candidate(tmp_path / "c", tiny_t5_dir, seed=2, lora_hits=5)
    train = _training_outputs(tmp_path / "train", other)
    res = register_adapter("redactrec", adapter, report, train_dir=train, tracking_uri=uri, retries=0)
    assert res.tracking_uri == uri  # the live connection keeps the real URI
    client = client_for(mlflow_server.uri)
    mv = client.get_model_version(res.model_name, res.version)
    assert mv.tags[c.TAG_TRAINING_RUN_STORE].startswith("http://***@127.0.0.1")
    assert _clean(json.dumps(mv.tags)) and _clean(mv.description or "")
    lineage = mlflow.artifacts.load_dict(f"runs:/{res.run_id}/{c.LINEAGE_FILE}")
    assert lineage["tracking_uri"] == "http://***@" + mlflow_server.uri.split("://", 1)[1]
    assert _clean(json.dumps(lineage)), lineage
    run = client.get_run(res.run_id)
    assert _clean(json.dumps(run.data.params)) and _clean(json.dumps(run.data.tags))
    assert "http://***@mlflow.internal:5000" in json.dumps(run.data.params)
    printed = _everything_printed(capsys, caplog)
    assert "***@127.0.0.1" in printed  # the warning about the other store, masked
    assert _clean(printed), printed
