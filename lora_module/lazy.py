"""PEP 562 lazy names for a package's `__init__`: a name is imported from its module on first use.

    _LAZY = {"LoraModel": "lora_module.model"}
    __getattr__ = lazy_attributes(__name__, _LAZY)

So `import lora_module` (or `lora_module.serving`) stays cheap and imports only what is used: torch,
MLflow and the registry load when a name that needs them is first read. `code_identity` reads the
same `_LAZY` tables to follow such names.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, table: Mapping[str, str]) -> Callable[[str], Any]:
    """The module `__getattr__` of `package`: `table[name]`'s `name`, cached in the package once read."""

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(table[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
