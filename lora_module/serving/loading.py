"""Load a registered adapter back, ready to generate: one task's version on its base.

    from lora_module.serving import load_predictor, load_registered
    predictor = load_predictor("summary")                     # models:/summary-lora@champion
    predictor.predict(["#Person1#: Hi ..."])                  # the task's template applied
    model, tokenizer = load_registered("summary", version=3)  # just the LoraModel and its tokenizer

The base is the recorded folder, else its logged copy, else the Hub id (`registry.bases`); a base
with another weights fingerprint is refused unless `force`.
"""

from __future__ import annotations

import tempfile
from typing import Any

from lora_module.contracts import CHAMPION
from lora_module.registry.bases import BaseRecord, resolve_base
from lora_module.registry.store import download_adapter
from lora_module.serving.predictor import AdapterPredictor


def load_predictor(task_or_uri: str, version: str | int | None = None, alias: str | None = CHAMPION,
                   base: Any = None, force: bool = False, tracking_uri: str | None = None, retries: int = 3,
                   backoff: float = 1.0, quantize: str | None = None) -> AdapterPredictor:
    """A registered adapter with the prompt settings it was trained with (`AdapterPredictor`).

    `task_or_uri`: a task (`<task>-lora@champion` by default) or a `models:/` URI; `base`: a folder
    / Hub id / loaded model to use instead of the recorded base (`quantize="nf4"`: in 4 bit).
    """
    with tempfile.TemporaryDirectory(prefix="lora-registry-") as tmp:
        reg = download_adapter(task_or_uri, tmp, version, alias, tracking_uri, retries, backoff)
        if base is None:
            base = resolve_base(BaseRecord.read(reg.base_dir))
        return AdapterPredictor.from_adapter(reg.adapter_dir, base=base, force=force,
                                             tokenizer_dir=reg.tokenizer_dir, quantize=quantize)


def load_registered(task_or_uri: str, **options: Any) -> tuple[Any, Any]:
    """`(LoraModel, tokenizer)` of a registered adapter; `options`: load_predictor's keywords."""
    predictor = load_predictor(task_or_uri, **options)
    return predictor.model, predictor.tokenizer
