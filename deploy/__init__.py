"""Deployment files shipped with the package: prefect.yaml, task specs (tasks/), configs (configs/), serve.

In a checkout these files are in `deploy/`; installed, in the `lora_pipeline.deploy` package. Paths
written as `deploy/configs/x.yaml` (in task specs, commands, docs) are relative to `SHIPPED_ROOT`,
the folder that holds this package (the repository root, or `site-packages/lora_pipeline`), so they
name the same file in both.
"""

from pathlib import Path

DEPLOY_DIR = Path(__file__).resolve().parent
SHIPPED_ROOT = DEPLOY_DIR.parent
TASKS_DIR = DEPLOY_DIR / "tasks"
CONFIGS_DIR = DEPLOY_DIR / "configs"
PREFECT_YAML = DEPLOY_DIR / "prefect.yaml"
