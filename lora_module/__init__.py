"""LoRA / QLoRA core: our own LoRA layers, named adapters and PEFT-format adapter files.

    from lora_module import LoraConfig, LoraModel, load_base_model
    model = LoraModel(load_base_model("path/or/hub-name"), LoraConfig(r=8, lora_alpha=16))

Names are imported lazily (PEP 562), so `import lora_module` stays cheap: torch, transformers
and bitsandbytes load only when a name that needs them is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_module.config import LoraConfig
from lora_module.errors import AdapterLoadError, FingerprintMismatchError, LoraConfigError
from lora_module.lazy import lazy_attributes

_LAZY = {
    "LoraLinear": "lora_module.layers",
    "LoraModel": "lora_module.model",
    "get_lora_model": "lora_module.model",
    "base_fingerprint": "lora_module.model",
    "read_adapter_config": "lora_module.adapter_io",
    "load_base_model": "lora_module.qlora",
    "quantize_nf4": "lora_module.qlora",
    "is_quantized": "lora_module.qlora",
}

__all__ = [
    "AdapterLoadError", "FingerprintMismatchError", "LoraConfig", "LoraConfigError", "LoraLinear",
    "LoraModel", "base_fingerprint", "get_lora_model", "is_quantized", "load_base_model", "quantize_nf4",
    "read_adapter_config",
]

if TYPE_CHECKING:
    from lora_module.adapter_io import read_adapter_config
    from lora_module.layers import LoraLinear
    from lora_module.model import LoraModel, base_fingerprint, get_lora_model
    from lora_module.qlora import is_quantized, load_base_model, quantize_nf4


__getattr__ = lazy_attributes(__name__, _LAZY)
