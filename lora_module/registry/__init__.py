"""The MLflow model registry: register adapters through the promotion gate, read versions back.

    from lora_module.registry import register_adapter
    res = register_adapter("summary", "runs/x/adapter", report_path="runs/x/eval/report.json",
                           train_dir="runs/x")
    res.model_uri, res.alias, res.decision                   # models:/summary-lora/3, champion, ...

Modules: `register` (a new version: tags, lineage, the gate, aliases), `gate` (the promotion
decision), `aliases` (converging champion/challenger), `inputs` (checked registration inputs),
`version_lineage` (links between runs and versions), `reuse` (earlier registrations of the same
adapter: complete or reuse), `logged_model` (the logged pyfunc model),
`multitask` (the multi-task model's registration), `store` (resolve and download a version),
`bases` (portable base records), `retry` (the retry policy), `tracking` (tracking URI, experiments,
names), `cli` (the registry commands). Loading a version to generate with: `lora_module.serving`.

Names are imported lazily (PEP 562): the served model ships this package's `__init__` with only
the few registry modules it reads through (`store`, `bases`, `retry`, `tracking`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_module.lazy import lazy_attributes

_LAZY = {
    "register_adapter": "lora_module.registry.register",
    "RegistrationResult": "lora_module.registry.register",
    "champion_info": "lora_module.registry.register",
    "Decision": "lora_module.registry.gate",
    "decide_promotion": "lora_module.registry.gate",
    "RetryPolicy": "lora_module.registry.retry",
    "RegistryUnavailableError": "lora_module.registry.retry",
    "configure_tracking": "lora_module.registry.tracking",
    "ensure_experiment": "lora_module.registry.tracking",
    "ensure_task_experiment": "lora_module.registry.tracking",
    "experiment_name_for": "lora_module.registry.tracking",
    "model_name_for": "lora_module.registry.tracking",
    "RegisteredAdapter": "lora_module.registry.store",
    "download_adapter": "lora_module.registry.store",
    "parse_model_ref": "lora_module.registry.store",
}

__all__ = [
    "Decision", "RegisteredAdapter", "RegistrationResult", "RegistryUnavailableError", "RetryPolicy",
    "champion_info", "configure_tracking", "decide_promotion", "download_adapter", "ensure_experiment",
    "ensure_task_experiment", "experiment_name_for", "model_name_for", "parse_model_ref", "register_adapter",
]

if TYPE_CHECKING:
    from lora_module.registry.gate import Decision, decide_promotion
    from lora_module.registry.register import RegistrationResult, champion_info, register_adapter
    from lora_module.registry.retry import RegistryUnavailableError, RetryPolicy
    from lora_module.registry.store import RegisteredAdapter, download_adapter, parse_model_ref
    from lora_module.registry.tracking import (
        configure_tracking,
        ensure_experiment,
        ensure_task_experiment,
        experiment_name_for,
        model_name_for,
    )


__getattr__ = lazy_attributes(__name__, _LAZY)
