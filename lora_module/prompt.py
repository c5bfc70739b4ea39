"""The prompt settings a model was trained with, read from the prepared data's manifest.

The data stage (`lora_pipeline.data.prepare`) records its config in `manifest.json`: the prompt
template, the input column and the source/target length limits. Training reads its tokenized rows
from that folder, so those values are what the model learnt with; evaluation, serving and
`predict` take them from here instead of keeping their own defaults:

    settings = PromptSettings.from_manifest(manifest)
    prompts = settings.render(["#Person1#: Hi ..."])           # the task's template applied
    length = settings.resolve("max_source_length", override)   # an override that differs is logged

Standard library only: the registered pyfunc model ships this file.
"""

from __future__ import annotations

import logging
import string
from dataclasses import asdict, dataclass, fields
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptSettings:
    """Template and length limits of one task's prepared data (None: not recorded)."""

    template: str | None = None
    """str.format template with one placeholder per column; None: inputs are already prompts."""
    input_column: str = "dialogue"
    """The placeholder a raw input text fills."""
    max_source_length: int | None = None
    """Prompt tokens the model was trained on (longer prompts were cut)."""
    max_target_length: int | None = None
    """Target tokens the model was trained on (end-of-sequence token included)."""
    model_type: str | None = None
    """"seq2seq" or "causal"."""

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> PromptSettings:
        """The settings recorded in a prepared folder's manifest.json (its `config` section)."""
        config = manifest.get("config") or {}
        return cls(
            template=config.get("prompt_template"),
            input_column=config.get("input_column") or "dialogue",
            max_source_length=config.get("max_source_length"),
            max_target_length=config.get("max_target_length"),
            model_type=manifest.get("model_type") or config.get("model_type"),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptSettings:
        """Build from `to_dict()` output; unknown keys are an error that lists the valid ones."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown prompt settings {unknown}; valid keys: {valid}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self, texts: list[str]) -> list[str]:
        """Each raw input text put into the template (unchanged when no template is recorded)."""
        if self.template is None:
            return list(texts)
        names = {name for _, name, _, _ in string.Formatter().parse(self.template) if name}
        others = sorted(names - {self.input_column})
        if others:
            raise ValueError(
                f"the prompt template also needs column(s) {others} besides {self.input_column!r}; "
                "a single input text cannot fill it: pass complete prompts instead"
            )
        return [self.template.format_map({self.input_column: t}) for t in texts]

    def resolve(self, field: str, override: int | None) -> int | None:
        """`override` when given, else the trained value; an override that differs is logged."""
        trained = getattr(self, field)
        if override is None:
            return trained
        if trained is not None and override != trained:
            logger.warning(
                "%s=%s overrides the value the model was trained with (%s, from the prepared data's "
                "manifest)", field, override, trained,
            )
        return override
