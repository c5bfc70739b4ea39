"""The flow a work pool runs for one task of a fanned-out many-task flow (see flows/fanout.py).

    prefect deployment run lora-pool-task/lora-pool-task --param task=summary
    pool_task("summary", {"eval_limit": 20})   # what each fanned-out run calls on its worker

It runs `task_pipeline(task, **params)` where the worker runs it (the worker's LORA_PIPELINE_HOME
and MLFLOW_TRACKING_URI apply) and publishes the result as a table artifact of the run, which is
how the parent flow, on another machine, reads it back.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from lora_pipeline.flows.fanout import RESULT_ARTIFACT
from lora_pipeline.flows.pipeline import task_pipeline


@flow(name="lora-pool-task")
def pool_task(task: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """`task_pipeline(task, **params)` on a worker; its result is also published for the parent."""
    result = task_pipeline(task=task, **(params or {}))
    create_table_artifact(key=RESULT_ARTIFACT, table=[json.loads(json.dumps(result, default=str))],
                          description=f"Result of task {task} for the flow that fanned it out")
    return result
