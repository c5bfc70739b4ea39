"""The one rule for names the pipeline turns into keys, file names and registry names.

Task names, adapter names, evaluated-model names and registered model names all follow it, so a
task name is always a valid adapter name and `<task>-lora` a valid registered model name:

    from lora_module.names import check_name
    check_name("task name", "summary")                      # returns the name
    check_name("adapter name", "a.b", LoraConfigError)      # raises: the message shows the pattern

1 to 100 ASCII letters, digits, '_' and '-', starting with a letter or digit: no '.' (module paths
use it), no '/' (file paths), no quotes (MLflow's registry filters are SQL-like strings).
"""

from __future__ import annotations

import re

from lora_module.errors import PipelineError

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}"
_NAME = re.compile(NAME_PATTERN)


class InvalidNameError(PipelineError, ValueError):
    """A task, adapter or model name that breaks the naming rule."""


def is_valid_name(value: object) -> bool:
    """Whether `value` follows the rule (a str matching NAME_PATTERN)."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def check_name(kind: str, value: object, error: type[Exception] = InvalidNameError) -> str:
    """`value` if it follows the rule, else `error` naming `kind`, the value and the allowed pattern."""
    if not is_valid_name(value):
        raise error(
            f"invalid {kind} {value!r}: use 1-100 letters, digits, '_' or '-', starting with a letter or "
            f"digit (pattern {NAME_PATTERN})"
        )
    return value  # type: ignore[return-value]
