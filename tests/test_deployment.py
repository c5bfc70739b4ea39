"""deploy/prefect.yaml and deploy/serve.py: every deployment points at a real flow and a shipped task."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prefect import Flow
from prefect.flows import load_flow_from_entrypoint

from lora_pipeline.deploy import PREFECT_YAML, serve
from lora_pipeline.flows.specs import known_tasks

REPO = Path(__file__).resolve().parents[1]


def test_prefect_yaml_deployments_are_complete():
    config = yaml.safe_load(PREFECT_YAML.read_text())
    names = [d["name"] for d in config["deployments"]]
    assert {"lora-summary", "lora-topic"} <= set(names) and len(names) == len(set(names))
    for d in config["deployments"]:
        # A module path, not a file in a checkout: the installed package is what a worker imports.
        assert ":" not in d["entrypoint"] and d["entrypoint"].startswith("lora_pipeline.flows.")
        assert isinstance(load_flow_from_entrypoint(d["entrypoint"], use_placeholder_flow=False), Flow)
        assert d["work_pool"]["name"] == "lora-process"
        params = d["parameters"]
        for task in params.get("tasks") or [params["task"]]:
            assert task in known_tasks(), f"{d['name']}: unknown task {task!r}"
    scheduled = {d["name"]: d["schedules"][0]["cron"] for d in config["deployments"] if d.get("schedules")}
    assert scheduled["lora-summary"] == "0 2 * * *" and scheduled["lora-topic"] == "30 2 * * *"


def test_serve_builds_the_same_deployments():
    assert PREFECT_YAML == REPO / "deploy" / "prefect.yaml"  # the editable install maps deploy/ here
    built = {d.name: d for d in serve.deployments()}
    config = yaml.safe_load(PREFECT_YAML.read_text())
    assert set(built) == {d["name"] for d in config["deployments"]}
    for d in config["deployments"]:
        assert built[d["name"]].parameters == d["parameters"]
        got = [(s.schedule.cron, s.schedule.timezone, s.active) for s in built[d["name"]].schedules or []]
        assert got == [(s["cron"], s["timezone"], s["active"]) for s in d.get("schedules") or []]
        assert built[d["name"]].entrypoint == d["entrypoint"]
    assert [d.name for d in serve.deployments(["lora-topic"])] == ["lora-topic"]
    with pytest.raises(SystemExit, match="unknown deployments"):
        serve.deployments(["nope"])
