"""deploy/prefect.yaml and deploy/serve.py: every deployment points at a real flow and a shipped task."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from lora_pipeline.flows.specs import known_tasks

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "deploy" / "prefect.yaml"


def load_serve():
    sys.path.insert(0, str(REPO / "deploy"))
    try:
        import serve
    finally:
        sys.path.remove(str(REPO / "deploy"))
    return serve


def test_prefect_yaml_deployments_are_complete():
    config = yaml.safe_load(PREFECT_YAML.read_text())
    names = [d["name"] for d in config["deployments"]]
    assert {"lora-summary", "lora-topic"} <= set(names) and len(names) == len(set(names))
    for d in config["deployments"]:
        path, _, func = d["entrypoint"].partition(":")
        assert (REPO / path).is_file() and f"def {func}(" in (REPO / path).read_text()
        assert d["work_pool"]["name"] == "lora-process"
        params = d["parameters"]
        for task in params.get("tasks") or [params["task"]]:
            assert task in known_tasks(), f"{d['name']}: unknown task {task!r}"
    scheduled = {d["name"]: d["schedules"][0]["cron"] for d in config["deployments"] if d.get("schedules")}
    assert scheduled["lora-summary"] == "0 2 * * *" and scheduled["lora-topic"] == "30 2 * * *"


def test_serve_builds_the_same_deployments():
    serve = load_serve()
    built = {d.name: d for d in serve.deployments()}
    config = yaml.safe_load(PREFECT_YAML.read_text())
    assert set(built) == {d["name"] for d in config["deployments"]}
    for d in config["deployments"]:
        assert built[d["name"]].parameters == d["parameters"]
        got = [(s.schedule.cron, s.schedule.timezone, s.active) for s in built[d["name"]].schedules or []]
        assert got == [(s["cron"], s["timezone"], s["active"]) for s in d.get("schedules") or []]
    assert [d.name for d in serve.deployments(["lora-topic"])] == ["lora-topic"]
    with pytest.raises(SystemExit, match="unknown deployments"):
        serve.deployments(["nope"])
