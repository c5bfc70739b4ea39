"""A resumed flow run does not register its adapter twice (`register_adapter(reuse_finished=True)`).

A flow process that dies after its registration finished but before its run folder is marked done
leaves a folder the next run with the same inputs adopts; that run passes `reuse_finished=True` and
gets the version already registered (no new run, version or alias change). Without the flag the
same adapter registers again as a new version, as the CLI and a deliberate re-registration expect;
an interrupted registration (version created, run never finished) is still completed either way.

    .venv/bin/pytest tests/test_register_reuse.py -q      # the flow test is marked slow (~30 s)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow_server import client_for, embedded_store_home
from registry_helpers import make_candidate, weights_sha
from test_flows import write_spec

import lora_module.registry.register as register_module
from lora_module import contracts as c
from lora_module.contracts import RUN_STATE_FILE
from lora_module.home import PipelineHome
from lora_module.registry.register import register_adapter
from lora_module.run_dirs import DONE, RUNNING, RunClaim


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Iterator[Path]:
    """A pipeline home whose embedded SQLite store is the registry."""
    with embedded_store_home(tmp_path_factory.mktemp("reuse_home")) as root:
        yield root


def _registry(tracking_uri: str, task: str, adapter_sha: str) -> tuple[list[str], dict[str, str], list]:
    """(versions of `<task>-lora`, its aliases {alias: version}, the registration runs of the adapter)."""
    client = client_for(tracking_uri)
    name = f"{task}-lora"
    versions = sorted(str(mv.version) for mv in client.search_model_versions(f"name='{name}'"))
    aliases = {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
    experiment = client.get_experiment_by_name(f"lora-{task}").experiment_id
    runs = client.search_runs([experiment], f"tags.{c.TAG_ADAPTER_SHA256} = '{adapter_sha}'")
    return versions, aliases, runs


# ---- registry level -----------------------------------------------------------------------------
def test_reuse_finished_returns_the_registered_version_and_creates_nothing(home, tiny_t5_dir, tmp_path,
                                                                          capsys):
    adapter, report, _ = make_candidate(tmp_path / "c", tiny_t5_dir, seed=31, lora_hits=5)
    uri, sha = PipelineHome.from_env().tracking_uri, weights_sha(adapter)
    first = register_adapter("reuse", adapter, report, retries=0)
    assert (first.version, first.alias, first.reused) == ("1", "champion", False)
    tags_before = client_for(uri).get_model_version("reuse-lora", "1").tags
    capsys.readouterr()

    again = register_adapter("reuse", adapter, report, retries=0, reuse_finished=True)
    assert (again.version, again.alias, again.run_id, again.reused, again.resumed) == (
        "1", "champion", first.run_id, True, False)
    assert again.decision == {"promote": True, "reason": first.decision["reason"]}
    assert f"reuse-lora v1: already registered by run {first.run_id} (reused)" in capsys.readouterr().out
    versions, aliases, runs = _registry(uri, "reuse", sha)
    assert versions == ["1"] and aliases == {"champion": "1"} and len(runs) == 1
    assert client_for(uri).get_model_version("reuse-lora", "1").tags == tags_before

    # The default keeps registering the same adapter again (a deliberate re-registration).
    third = register_adapter("reuse", adapter, report, retries=0)
    assert (third.version, third.reused) == ("2", False)
    versions, aliases, runs = _registry(uri, "reuse", sha)
    assert versions == ["1", "2"] and aliases == {"champion": "2", "challenger": "1"} and len(runs) == 2
    # Several finished registrations of it: the newest is returned, with the alias it holds now.
    latest = register_adapter("reuse", adapter, report, retries=0, reuse_finished=True)
    assert (latest.version, latest.alias, latest.reused) == ("2", "champion", True)
    assert latest.run_id == third.run_id
    assert _registry(uri, "reuse", sha)[0] == ["1", "2"]


def test_reuse_finished_still_completes_an_interrupted_registration(home, tiny_t5_dir, tmp_path, monkeypatch):
    adapter, report, _ = make_candidate(tmp_path / "c", tiny_t5_dir, seed=32, lora_hits=5)
    uri, sha = PipelineHome.from_env().tracking_uri, weights_sha(adapter)

    def die(*args, **kwargs):
        raise RuntimeError("process died after creating the version")

    monkeypatch.setattr(register_module, "_complete", die)
    with pytest.raises(RuntimeError, match="process died"):
        register_adapter("reuse_cut", adapter, report, retries=0)
    monkeypatch.undo()
    client = client_for(uri)
    assert client.get_model_version("reuse_cut-lora", "1").tags["gate.decision"] == "pending"

    res = register_adapter("reuse_cut", adapter, report, retries=0, reuse_finished=True)
    assert (res.version, res.alias, res.resumed, res.reused) == ("1", "champion", True, False)
    versions, aliases, runs = _registry(uri, "reuse_cut", sha)
    assert versions == ["1"] and aliases == {"champion": "1"}
    assert [r.info.status for r in runs] == ["FINISHED"] and runs[0].info.run_id == res.run_id
    assert client.get_model_version("reuse_cut-lora", "1").tags["gate.decision"] == "promoted"


# ---- flow level: the process dies between the register stage and the run folder's `done` --------
class Killed(Exception):
    """Stands for the SIGKILL that ends the flow process (the flow catches nothing on its way out)."""


@pytest.mark.slow
def test_a_flow_that_died_after_registering_is_resumed_without_a_second_version(
        harness, tmp_path, tiny_t5_dir, monkeypatch):
    """Slow (~20-30 s on 2 cores): one two-step training, two flow runs (evaluations, registrations)."""
    from lora_pipeline.flows.pipeline import task_pipeline

    spec = write_spec(tmp_path, "tiny_rereg", "summary", tiny_t5_dir, full=False, eval_limit=4)
    home = tmp_path / "home"

    def die_before_done(self: RunClaim) -> None:
        raise Killed("the flow process died after the register stage returned")

    monkeypatch.setattr(RunClaim, "finish", die_before_done)
    with pytest.raises(Killed):
        task_pipeline(task=str(spec), home=str(home))
    monkeypatch.undo()
    [run_dir] = list((home / "runs" / "tiny_rereg").iterdir())
    assert json.loads((run_dir / RUN_STATE_FILE).read_text())["state"] == RUNNING
    uri = PipelineHome.from_env(home).tracking_uri
    sha = weights_sha(run_dir / "lora" / c.ADAPTER_DIR)
    versions, before, _ = _registry(uri, "tiny_rereg", sha)
    [alias] = before  # the gate's alias for v1 (the two-step adapter may not beat the base)
    assert versions == ["1"] and before == {alias: "1"}

    second = task_pipeline(task=str(spec), home=str(home))  # the same inputs again
    assert list((home / "runs" / "tiny_rereg").iterdir()) == [run_dir]  # adopted
    assert json.loads((run_dir / RUN_STATE_FILE).read_text())["state"] == DONE
    assert (second["version"], second["alias"]) == ("1", alias)
    versions, aliases, runs = _registry(uri, "tiny_rereg", sha)
    assert versions == ["1"] and aliases == before
    assert [r.info.status for r in runs] == ["FINISHED"] and runs[0].info.run_id == second["run_id"]
