"""Serving registered adapters: predictors, the MLflow pyfunc models, and the HTTP command.

    from lora_module.serving import load_predictor
    load_predictor("summary").predict(["#Person1#: Hi ..."])      # models:/summary-lora@champion

Modules: `predictor` (an adapter on its base with its prompt settings; the one predict path),
`loading` (a registered version by task, alias or version), `multitask` (many tasks on one base,
mixed-task batches, champions followed while serving, and its pyfunc model), `pyfunc` (the
single-task pyfunc model and what a logged model ships), `cli` (`predict`, `serve-model`), `server`
(the HTTP server `serve-model` runs) and `openai_api` (its `/v1` routes).
Serving reads the registry through `registry.store` only, never registration or the gate.

Names are imported lazily (PEP 562), so the logged models ship this `__init__` and nothing more.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_module.lazy import lazy_attributes

_LAZY = {
    "AdapterPredictor": "lora_module.serving.predictor",
    "load_adapter_with_base": "lora_module.serving.predictor",
    "load_predictor": "lora_module.serving.loading",
    "load_registered": "lora_module.serving.loading",
    "MultiTaskPredictor": "lora_module.serving.multitask",
    "TaskRef": "lora_module.serving.multitask",
}

__all__ = [
    "AdapterPredictor", "MultiTaskPredictor", "TaskRef", "load_adapter_with_base", "load_predictor",
    "load_registered",
]

if TYPE_CHECKING:
    from lora_module.serving.loading import load_predictor, load_registered
    from lora_module.serving.multitask import MultiTaskPredictor, TaskRef
    from lora_module.serving.predictor import AdapterPredictor, load_adapter_with_base


__getattr__ = lazy_attributes(__name__, _LAZY)
