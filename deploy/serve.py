"""Serve the deployments of deploy/prefect.yaml from one long-lived process (no work pool, no worker).

    python deploy/serve.py                       # every deployment, with its cron schedule
    python deploy/serve.py lora-summary          # only the named ones

The process polls the Prefect API (PREFECT_API_URL, e.g. a `prefect server start` on this
machine) and runs each scheduled or triggered flow run itself; stop it with Ctrl-C. The
deployments, parameters and schedules are read from prefect.yaml, so the two ways of deploying
cannot drift apart.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import the project's flows

from prefect import serve  # noqa: E402
from prefect.schedules import Cron  # noqa: E402

from lora_pipeline.flows.pipeline import many_tasks, task_pipeline  # noqa: E402

PREFECT_YAML = ROOT / "deploy" / "prefect.yaml"
FLOWS = {"flows/pipeline.py:task_pipeline": task_pipeline, "flows/pipeline.py:many_tasks": many_tasks}


def deployments(names: list[str] | None = None, prefect_yaml: Path = PREFECT_YAML) -> list:
    """`RunnerDeployment`s for the deployments in prefect.yaml (all, or those named)."""
    spec = yaml.safe_load(prefect_yaml.read_text())
    known = [d["name"] for d in spec["deployments"]]
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise SystemExit(f"unknown deployments {unknown}; prefect.yaml defines {known}")
    out = []
    for d in spec["deployments"]:
        if names and d["name"] not in names:
            continue
        schedules = [Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
                     for s in d.get("schedules") or []]
        out.append(FLOWS[d["entrypoint"]].to_deployment(
            name=d["name"], description=d.get("description"), tags=d.get("tags"),
            parameters=d.get("parameters") or {}, schedules=schedules or None,
        ))
    return out


if __name__ == "__main__":
    serve(*deployments(sys.argv[1:] or None))
