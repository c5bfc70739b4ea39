"""Serve the deployments of prefect.yaml from one long-lived process (no work pool, no worker).

    lora-pipeline serve                          # every deployment, with its cron schedule
    lora-pipeline serve lora-summary             # only the named ones

The process polls the Prefect API (PREFECT_API_URL, e.g. a `prefect server start` on this
machine) and runs each scheduled or triggered flow run itself; stop it with Ctrl-C. The
deployments, parameters and schedules are read from the prefect.yaml shipped in this package, so
the two ways of deploying cannot drift apart. Flows are found by their module path (the
entrypoints in prefect.yaml), so serving works from any working directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from lora_module.errors import ArgumentParser
from lora_pipeline.deploy import PREFECT_YAML


def deployments(names: Sequence[str] | None = None, prefect_yaml: Path = PREFECT_YAML) -> list:
    """`RunnerDeployment`s for the deployments in prefect.yaml (all, or those named)."""
    from prefect.deployments.runner import EntrypointType
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron

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
        flow = load_flow_from_entrypoint(d["entrypoint"], use_placeholder_flow=False)
        out.append(flow.to_deployment(
            name=d["name"], description=d.get("description"), tags=d.get("tags"),
            parameters=d.get("parameters") or {}, schedules=schedules or None,
            entrypoint_type=EntrypointType.MODULE_PATH,
        ))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """`lora-pipeline serve [NAME ...]`: serve the named deployments (all by default) until Ctrl-C."""
    parser = ArgumentParser(prog="lora-pipeline serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"deployment names from {PREFECT_YAML} (default: all of them)")
    args = parser.parse_args(argv)
    from prefect import serve

    serve(*deployments(args.names or None))
