"""The prompt settings a model was trained with, read from the prepared data's manifest.

The data stage (`lora_pipeline.data.prepare`) records its config in `manifest.json`: the prompt
template, the input column and the source/target length limits. Training reads its tokenized rows
from that folder, so those values are what the model learnt with; evaluation, serving and
`predict` take them from here instead of keeping their own defaults:

    settings = PromptSettings.from_manifest(manifest)
    prompts = settings.render(["#Person1#: Hi ..."])           # the task's template applied
    prompts = settings.render(texts, tokenizer)                # ... with over-long inputs cut to fit
    length = settings.resolve("max_source_length", override)   # an override that differs is logged

Truncation keeps the instruction: an over-long prompt loses the end of its INPUT FIELD, never the
template's own text, so "...\n\nSummary: " always ends the prompt. `fit_prompt` does the cutting
for the data stage (`lora_pipeline.data.encode`, at training time) and for evaluation/serving
(`PromptSettings.render` with a tokenizer), so both cut the same input at the same token.

Standard library only (and the torch-free lora_module.config and errors): the registered pyfunc
model ships it. Tokenizers are used through their call interface only.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from lora_module.config import dataclass_from_dict
from lora_module.errors import PipelineError

logger = logging.getLogger(__name__)


class PromptError(PipelineError, ValueError):
    """Recorded prompt settings that cannot build prompts here: a template that needs more than the one
    input text, or a tokenizer whose special tokens cannot be told apart from the text."""


class PromptTooLongError(PromptError):
    """The template's own text (without any input) does not fit in max_source_length."""


def template_parts(template: str, values: Mapping[str, Any], input_column: str) -> list[str]:
    """The template's text around its input placeholder, other placeholders filled from `values`:
    `input.join(parts)` equals `template.format_map({**values, input_column: input})`."""
    parts, current = [], ""
    for literal, name, _, _ in string.Formatter().parse(template):
        current += literal
        if name is None:
            continue
        if name == input_column:
            parts.append(current)
            current = ""
        else:
            current += str(values[name])
    parts.append(current)
    return parts


def special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text's content (e.g. ([], [eos]) for T5)."""
    probe = "hello world"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise PromptError(
        f"cannot locate the text inside its special tokens for tokenizer {type(tokenizer).__name__}: its "
        f"ids for {probe!r} with special tokens do not contain those without; use a tokenizer that only "
        "adds special tokens around the text"
    )


def prompt_room(tokenizer: Any, max_source_length: int, model_type: str | None) -> int:
    """Prompt tokens (without special tokens) that fit in `max_source_length`. A causal prompt gets
    only the tokenizer's prefix (BOS): the EOS ends the target, after the prompt."""
    prefix, suffix = special_affixes(tokenizer)
    return max_source_length - len(prefix) - (0 if model_type == "causal" else len(suffix))


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _token_ends(tokenizer: Any, text: str) -> list[int]:
    """The character offset where each token of `text` ends: the cut points that keep whole tokens."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [end for _, end in enc["offset_mapping"]]
    n = _count(tokenizer, text)
    # A slow tokenizer has no offsets: cut points spread evenly over the characters (fit_prompt checks).
    return [round(len(text) * (i + 1) / n) for i in range(n)]


def fit_prompt(render: Callable[[str], str], text: str, tokenizer: Any, room: int) -> tuple[str, int]:
    """(prompt, input tokens cut): `render(text)` when it fits in `room` tokens, else `render` of the
    longest start of `text` (cut at a token boundary) that fits. The template's text is never cut."""
    prompt = render(text)
    if _count(tokenizer, prompt) <= room:
        return prompt, 0
    ends = _token_ends(tokenizer, text)
    # Tokens of the parts mostly add up; the loop removes the few a merge at the cut adds.
    keep = min(len(ends) - 1, room - _count(tokenizer, render("")))
    while keep > 0:
        prompt = render(text[: ends[keep - 1]])
        over = _count(tokenizer, prompt) - room
        if over <= 0:
            return prompt, len(ends) - keep
        keep -= over
    prompt = render("")
    if _count(tokenizer, prompt) > room:
        raise PromptTooLongError(
            f"the prompt template alone takes {_count(tokenizer, prompt)} tokens, more than the {room} that "
            "max_source_length leaves after special tokens: raise max_source_length or shorten the template"
        )
    return prompt, len(ends)


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
        return dataclass_from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self, texts: list[str], tokenizer: Any = None) -> list[str]:
        """Each raw input text put into the template (unchanged when no template is recorded). Given
        the model's tokenizer and a recorded max_source_length, an over-long input is cut to fit, as
        the data stage cut it for training (`fit_prompt`): the template's text is kept whole."""
        if self.template is None:
            return list(texts)
        names = {name for _, name, _, _ in string.Formatter().parse(self.template) if name}
        others = sorted(names - {self.input_column})
        if others:
            raise PromptError(
                f"the prompt template also needs column(s) {others} besides {self.input_column!r}; "
                "a single input text cannot fill it: pass complete prompts instead"
            )
        parts = template_parts(self.template, {}, self.input_column)
        if tokenizer is None or self.max_source_length is None:
            return [t.join(parts) for t in texts]
        room = prompt_room(tokenizer, self.max_source_length, self.model_type)
        fitted = [fit_prompt(lambda x: x.join(parts), t, tokenizer, room) for t in texts]
        cut = [n for _, n in fitted if n]
        if cut:
            logger.info("%d of %d inputs cut to fit max_source_length=%d (by %d tokens at most)",
                        len(cut), len(texts), self.max_source_length, max(cut))
        return [p for p, _ in fitted]

    def resolve(self, field: str, override: int | None, setting: str | None = None) -> int | None:
        """`override` (the value of `setting`, default: `field`) when given, else the trained value
        `field`; an override that differs from the trained value is logged, naming both."""
        trained = getattr(self, field)
        if override is None:
            return trained
        if trained is not None and override != trained:
            logger.warning(
                "%s=%s overrides the model's training setting %s=%s (from the prepared data's manifest)",
                setting or field, override, field, trained,
            )
        return override
