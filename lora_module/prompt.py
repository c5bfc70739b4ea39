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

Two prompt formats (`PromptSettings.format`, the data config's `prompt_format`):
- "template": the str.format template above; prompts are tokenized WITH the tokenizer's special tokens.
- "chat": each input becomes a user turn (after `system_prompt`, if any) rendered by the tokenizer's
  chat template (`apply_chat_template(..., add_generation_prompt=True)`); the template already holds
  BOS and the like, so prompts are tokenized WITHOUT special tokens (`settings.add_special_tokens`).
  Conversations (`render_conversations`, `[{"role": ..., "content": ...}, ...]` ending with a user
  turn) are checked by `validate_messages`; an over-long one loses its oldest turns first, then the
  end of its last user turn, never the generation prompt (`fit_conversation`).

    settings = PromptSettings(format="chat", system_prompt="Be brief.", max_source_length=512)
    prompts = settings.render_conversations([[{"role": "user", "content": "Hi"}]], tokenizer)

Standard library only (and the torch-free lora_module.config and errors): the registered pyfunc
model ships it. Tokenizers are used through their call and `apply_chat_template` interfaces only.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lora_module.config import dataclass_from_dict
from lora_module.errors import PipelineError

logger = logging.getLogger(__name__)


class PromptError(PipelineError, ValueError):
    """Recorded prompt settings that cannot build prompts here: a template that needs more than the one
    input text, or a tokenizer whose special tokens cannot be told apart from the text."""


PROMPT_FORMATS = ("template", "chat")


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


def fit_text(render: Callable[[str], str], text: str, tokenizer: Any, room: int) -> tuple[str, int]:
    """(kept text, tokens cut): `text` when `render(text)` fits in `room` tokens, else the longest start
    of `text` (cut at a token boundary) whose rendering fits. What `render` adds is never cut."""
    if _count(tokenizer, render(text)) <= room:
        return text, 0
    ends = _token_ends(tokenizer, text)
    # Tokens of the parts mostly add up; the loop removes the few a merge at the cut adds.
    keep = min(len(ends) - 1, room - _count(tokenizer, render("")))
    while keep > 0:
        over = _count(tokenizer, render(text[: ends[keep - 1]])) - room
        if over <= 0:
            return text[: ends[keep - 1]], len(ends) - keep
        keep -= over
    alone = _count(tokenizer, render(""))
    if alone > room:
        raise PromptTooLongError(
            f"the prompt template alone takes {alone} tokens (chat: with the system prompt and the "
            f"generation prompt), more than the {room} that max_source_length leaves after special tokens: "
            "raise max_source_length or shorten the template"
        )
    return "", len(ends)


def fit_prompt(render: Callable[[str], str], text: str, tokenizer: Any, room: int) -> tuple[str, int]:
    """(prompt, input tokens cut): `render(text)` when it fits in `room` tokens, else `render` of the
    longest start of `text` (cut at a token boundary) that fits. The template's text is never cut."""
    kept, cut = fit_text(render, text, tokenizer, room)
    return render(kept), cut


ROLES = ("system", "user", "assistant")
# ShareGPT's `from` names, mapped onto the roles above.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                  "assistant": "assistant"}


def normalize_messages(raw: Any) -> Any:
    """`raw` with ShareGPT turns (`{"from": "human"|"gpt"|"system", "value": ...}`) turned into
    `{"role", "content"}` ones and other keys dropped; anything else is returned for
    `validate_messages` to reject."""
    if not isinstance(raw, list):
        return raw
    out = []
    for turn in raw:
        if isinstance(turn, Mapping) and "from" in turn and "role" not in turn:
            role = turn["from"]
            out.append({"role": SHAREGPT_ROLES.get(role, role), "content": turn.get("value")})
        elif isinstance(turn, Mapping):
            out.append({"role": turn.get("role"), "content": turn.get("content")})
        else:
            out.append(turn)
    return out


def validate_messages(messages: Any, where: str, last: str | None = "user") -> None:
    """Raise PromptError (one line naming `where` and the turn) unless `messages` is a list of
    `{"role", "content"}` turns: an optional system turn first, then user and assistant turns
    alternating from a user turn, each with non-empty text, ending with a `last` turn (None: any)."""
    if not isinstance(messages, list) or not messages:
        raise PromptError(
            f"{where}: must be a non-empty list of {{'role', 'content'}} turns, got {messages!r:.80}")
    expected = "user"
    for j, turn in enumerate(messages):
        role = turn.get("role") if isinstance(turn, Mapping) else None
        if role not in ROLES:
            raise PromptError(f"{where}, turn {j}: role {role!r} is unknown (or the turn is not a mapping); "
                              f"valid roles are {list(ROLES)} (ShareGPT's human/gpt are mapped)")
        content = turn.get("content")
        if not isinstance(content, str) or not content.strip():
            raise PromptError(
                f"{where}, turn {j} ({role}): content is empty or not text; every turn needs text")
        if role == "system" and j == 0:
            continue
        if role != expected:
            raise PromptError(
                f"{where}, turn {j}: role {role!r} is out of order, expected {expected!r} (an optional "
                "system turn first, then user and assistant turns alternating, starting with user)")
        expected = "assistant" if role == "user" else "user"
    if last is not None and messages[-1]["role"] != last:
        raise PromptError(
            f"{where}: its last turn is {messages[-1]['role']!r}; it must be {last!r}")


def chat_template_of(tokenizer: Any) -> str | None:
    """The tokenizer's chat template text (a dict of named templates counts as its default), else None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return template or None


def check_chat_tokenizer(tokenizer: Any, where: str) -> None:
    """PromptError unless the tokenizer (named by `where`) carries a chat template."""
    if chat_template_of(tokenizer) is None:
        raise PromptError(
            f"{where} has no chat template (tokenizer.chat_template is empty); prompt format 'chat' needs "
            "one: use an instruct/chat model's tokenizer or the 'template' prompt format")


def render_chat(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    """The conversation as the chat template writes it (the generation prompt after it if asked)."""
    check_chat_tokenizer(tokenizer, f"tokenizer {type(tokenizer).__name__}")
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja2's TemplateError and the template's own raise_exception
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PromptError(f"the tokenizer's chat template cannot render this conversation: {first}") from e


def fit_conversation(tokenizer: Any, messages: list[dict[str, str]], room: int | None,
                     parts: Sequence[str] = ("", "")) -> tuple[list[dict[str, str]], int, int]:
    """(turns kept, turns dropped, tokens cut from the last user turn) so that the conversation with its
    generation prompt fits `room` tokens (None: no limit). `messages` ends with a user turn whose content
    is the raw input of `parts` (`input.join(parts)` is the turn's text): the oldest user/assistant pairs
    after the system turn go first, then the end of that raw input; the generation prompt is never cut."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = list(messages[len(system):])

    def with_input(x: str) -> list[dict[str, str]]:
        return [*system, *turns[:-1], {"role": "user", "content": x.join(parts)}]

    raw = turns[-1]["content"]
    if room is None:
        return with_input(raw), 0, 0
    dropped = 0
    while len(turns) > 1 and _count(tokenizer, render_chat(tokenizer, with_input(raw), True)) > room:
        turns, dropped = turns[2:], dropped + 2
    kept, cut = fit_text(lambda x: render_chat(tokenizer, with_input(x), True), raw, tokenizer, room)
    return with_input(kept), dropped, cut


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
    format: str = "template"
    """"template" (the str.format template) or "chat" (the tokenizer's chat template)."""
    system_prompt: str | None = None
    """chat only: a system turn put first (a conversation with its own system turn keeps that one)."""

    def __post_init__(self) -> None:
        if self.format not in PROMPT_FORMATS:
            raise PromptError(
                f"prompt format {self.format!r} is unknown; valid formats are {list(PROMPT_FORMATS)}")

    @property
    def add_special_tokens(self) -> bool:
        """Whether a rendered prompt is tokenized with the tokenizer's special tokens: not for "chat",
        whose template already writes BOS and the like (twice would be a double BOS)."""
        return self.format != "chat"

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
            format=config.get("prompt_format") or "template",
            system_prompt=config.get("system_prompt"),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptSettings:
        """Build from `to_dict()` output; unknown keys are an error that lists the valid ones."""
        return dataclass_from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _parts(self) -> list[str]:
        """The template's text around the input (["", ""] without a template)."""
        if self.template is None:
            return ["", ""]
        names = {name for _, name, _, _ in string.Formatter().parse(self.template) if name}
        others = sorted(names - {self.input_column})
        if others:
            raise PromptError(
                f"the prompt template also needs column(s) {others} besides {self.input_column!r}; "
                "a single input text cannot fill it: pass complete prompts instead"
            )
        return template_parts(self.template, {}, self.input_column)

    def _system(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def _render_chat(self, conversations: list[list[dict[str, str]]], tokenizer: Any,
                     parts: Sequence[str] = ("", "")) -> list[str]:
        """Each conversation (ending with a user turn holding the raw input of `parts`) fitted to
        max_source_length and rendered with its generation prompt."""
        if tokenizer is None:
            raise PromptError("prompt format 'chat' renders prompts with the tokenizer's chat template: "
                              "pass the model's tokenizer")
        fitted = [fit_conversation(tokenizer, c, self.max_source_length, parts) for c in conversations]
        dropped = [d for _, d, _ in fitted if d]
        cut = [n for _, _, n in fitted if n]
        if dropped or cut:
            logger.info("to fit max_source_length=%s: %d of %d conversations lost their oldest turns, %d "
                        "their last user turn's end (by %d tokens at most)", self.max_source_length,
                        len(dropped), len(conversations), len(cut), max(cut, default=0))
        return [render_chat(tokenizer, kept, True) for kept, _, _ in fitted]

    def render_conversations(self, conversations: list[list[dict[str, str]]],
                             tokenizer: Any = None) -> list[str]:
        """Prompts for conversations (`[{"role", "content"}, ...]`, ending with a user turn; checked by
        `validate_messages`). "chat": `system_prompt` first unless a conversation has its own system turn.
        "template": each must hold exactly one user turn (a system turn is ignored), which fills the
        template as `render` does."""
        conversations = [normalize_messages(c) for c in conversations]
        for i, conv in enumerate(conversations):
            validate_messages(conv, f"conversation {i}")
        if self.format == "chat":
            return self._render_chat(
                [c if c[0]["role"] == "system" else self._system() + c for c in conversations], tokenizer)
        texts = []
        for i, conv in enumerate(conversations):
            turns = [m for m in conv if m["role"] != "system"]
            if len(turns) != 1:
                raise PromptError(f"conversation {i} has {len(turns)} user/assistant turns; this task uses a "
                                  "plain prompt template: send one user message")
            if len(turns) < len(conv):
                logger.info("conversation %d: system turn ignored, this task uses a plain prompt template", i)
            texts.append(turns[0]["content"])
        return self.render(texts, tokenizer)

    def render(self, texts: list[str], tokenizer: Any = None) -> list[str]:
        """Each raw input text put into the template (unchanged when no template is recorded). Given
        the model's tokenizer and a recorded max_source_length, an over-long input is cut to fit, as
        the data stage cut it for training (`fit_prompt`): the template's text is kept whole.
        "chat": the templated text is one user turn after the system prompt, rendered by the
        tokenizer's chat template (required) with its generation prompt, cut the same way."""
        parts = self._parts()
        if self.format == "chat":
            return self._render_chat([self._system() + [{"role": "user", "content": t}] for t in texts],
                                     tokenizer, parts)
        if self.template is None:
            return list(texts)
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
