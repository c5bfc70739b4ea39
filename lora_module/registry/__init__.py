"""The MLflow model registry: register adapters through the promotion gate, load them back, serve them.

    from lora_module.registry import register_adapter, load_registered
    res = register_adapter("dialogsum", "runs/x/adapter", report_path="runs/x/eval/report.json",
                           train_dir="runs/x")
    model, tokenizer = load_registered("dialogsum")          # models:/dialogsum-lora@champion

Modules: `register` (versions, tags, tracking set-up), `gate` (the promotion decision, retries),
`inputs` (checked registration inputs), `pyfunc` (the logged MLflow model), `loading` (by alias,
many tasks on one base), `cli` (the registry commands).
"""

from lora_module.registry.gate import (
    CHAMPION,
    Decision,
    RegistryUnavailableError,
    RetryPolicy,
    decide_promotion,
)
from lora_module.registry.loading import (
    MultiTaskModel,
    RegisteredAdapter,
    download_adapter,
    load_registered,
    parse_model_ref,
)
from lora_module.registry.register import (
    RegistrationResult,
    champion_info,
    configure_tracking,
    ensure_experiment,
    ensure_task_experiment,
    experiment_name_for,
    model_name_for,
    register_adapter,
)

__all__ = [
    "CHAMPION", "Decision", "MultiTaskModel", "RegisteredAdapter", "RegistrationResult",
    "RegistryUnavailableError", "RetryPolicy", "champion_info", "configure_tracking", "decide_promotion",
    "download_adapter", "ensure_experiment", "ensure_task_experiment", "experiment_name_for", "load_registered",
    "model_name_for", "parse_model_ref", "register_adapter",
]
