"""Evaluation protocols: how a score was made, named, validated and recorded beside every number.

A score means nothing without its protocol: DialogSum's lead-2 baseline scores 26.19 ROUGE-1 as the
best of three references and 20.70 with one reference per row. A protocol fixes

- `references`: how an example with several references scores: `max` (its best reference), `mean`
  (every reference counts as its own row: Hugging Face `evaluate` on a split that repeats each input
  once per reference gives the same mean) or `first` (only the first reference);
- `stemmer`: rouge_score's Porter stemmer on or off;
- `lsum_splitter`: how ROUGE-Lsum finds sentences: `punkt` (nltk Punkt, see `rouge.SENTENCE_SPLITTER`)
  or `newline` (only the newlines already in the text, rouge_score's own behaviour);
- `tokenizer`: `ascii` (rouge_score's tokens: lower-case a-z and 0-9, anything else splits) or
  `unicode` (letters and digits of every script; each CJK ideograph or kana is a token), so
  non-Latin text does not score 0; English text gets the same tokens either way;
- `decoding`: the generation settings that change outputs (beams, new tokens, prompt length); None
  when the outputs were given, not generated.

Named presets (`PROTOCOLS`): `best-reference` (the default, max over references), `one-reference-per-row`
(how the published FLAN-T5-base / DialogSum figures were made) and `first-reference`.

    from lora_module.evaluation.protocol import resolve_protocol
    p = resolve_protocol("one-reference-per-row")
    p = resolve_protocol({"name": "best-reference", "tokenizer": "unicode"})
    # named "best-reference+tokenizer=unicode"
    p.with_decoding(gen.to_dict()).protocol_id    # what the promotion gate compares
    p.describe()                                  # one line for table headers
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from lora_module.errors import PipelineError
from lora_module.files import sha256_json

REFERENCE_MODES = ("max", "mean", "first")
LSUM_SPLITTERS = ("punkt", "newline")
TOKENIZERS = ("ascii", "unicode")
DECODING_KEYS = ("num_beams", "max_new_tokens", "max_source_length")
"""Generation settings that change what a model outputs (batch size, device and dtype do not)."""
_SCORING_KEYS = ("references", "stemmer", "lsum_splitter", "tokenizer")
_REFERENCE_TEXT = {"max": "best of the references", "mean": "one reference per row (mean over references)",
                   "first": "first reference only"}


class ProtocolError(PipelineError, ValueError):
    """An evaluation protocol that is unknown or has an invalid setting."""


@dataclass(frozen=True)
class EvalProtocol:
    """How scores are made (see the module docstring); `name` is for people, `protocol_id` for comparisons."""

    name: str = "best-reference"
    references: str = "max"
    stemmer: bool = True
    lsum_splitter: str = "punkt"
    tokenizer: str = "ascii"
    decoding: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        for key, valid in (("references", REFERENCE_MODES), ("lsum_splitter", LSUM_SPLITTERS),
                           ("tokenizer", TOKENIZERS)):
            if getattr(self, key) not in valid:
                raise ProtocolError(f"protocol {self.name!r}: {key} must be one of {list(valid)}, "
                                    f"got {getattr(self, key)!r}")
        if not isinstance(self.stemmer, bool):
            raise ProtocolError(
                f"protocol {self.name!r}: stemmer must be true or false, got {self.stemmer!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ProtocolError(f"protocol name must be a non-empty string, got {self.name!r}")
        if self.decoding is not None:
            if not isinstance(self.decoding, Mapping) or set(self.decoding) - set(DECODING_KEYS):
                raise ProtocolError(f"protocol {self.name!r}: decoding must map some of "
                                    f"{list(DECODING_KEYS)} to values, got {self.decoding!r}")
            object.__setattr__(self, "decoding", {k: self.decoding[k] for k in DECODING_KEYS
                                                  if k in self.decoding})

    def scoring(self) -> dict[str, Any]:
        """The settings that turn outputs into scores (what one report may not mix)."""
        return {k: getattr(self, k) for k in _SCORING_KEYS}

    def with_decoding(self, generation: Mapping[str, Any] | None) -> EvalProtocol:
        """This protocol with the output-changing settings of `generation` (GenerationConfig.to_dict())."""
        if generation is None:
            return replace(self, decoding=None)
        return replace(self, decoding={k: generation.get(k) for k in DECODING_KEYS})

    @property
    def protocol_id(self) -> str:
        """12 hex characters over the scoring and decoding settings: equal ids, comparable scores."""
        return sha256_json({"scoring": self.scoring(), "decoding": self.decoding})[:12]

    def to_dict(self) -> dict[str, Any]:
        """Every setting plus `protocol_id` (what report.json and eval JSON record)."""
        return asdict(self) | {"decoding": dict(self.decoding) if self.decoding else None,
                               "protocol_id": self.protocol_id}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvalProtocol:
        """Read back what `to_dict` wrote (`protocol_id` is recomputed, not trusted)."""
        valid = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in valid})

    def describe(self) -> str:
        """One line for table headers: name, id and every setting in words."""
        splitter = "nltk Punkt sentences" if self.lsum_splitter == "punkt" else "newline sentences"
        text = (f"protocol {self.name} ({self.protocol_id}): {_REFERENCE_TEXT[self.references]}, "
                f"stemmer {'on' if self.stemmer else 'off'}, {self.tokenizer} tokens, Lsum on {splitter}")
        return f"{text}; {_decoding_text(self.decoding)}"


def _decoding_text(decoding: Mapping[str, Any] | None) -> str:
    if not decoding:
        return "outputs given, not generated"
    beams = decoding.get("num_beams") or 1
    search = "greedy" if beams == 1 else f"beam search ({beams} beams)"
    cut = decoding.get("max_source_length")
    return (f"{search} decoding, up to {decoding.get('max_new_tokens')} new tokens, prompts cut at "
            f"{cut if cut is not None else 'no'} tokens")


PROTOCOLS: dict[str, EvalProtocol] = {
    p.name: p for p in (
        EvalProtocol("best-reference", references="max"),
        EvalProtocol("one-reference-per-row", references="mean"),
        EvalProtocol("first-reference", references="first"),
    )
}
DEFAULT_PROTOCOL = "best-reference"


def resolve_protocol(value: str | Mapping[str, Any] | EvalProtocol | None) -> EvalProtocol:
    """A protocol from a preset name, a mapping `{name: PRESET, <setting>: value, ...}` (the preset with
    those settings changed, named `PRESET+key=value`), an EvalProtocol, or None (the default preset)."""
    if isinstance(value, EvalProtocol):
        return value
    if value is None:
        return PROTOCOLS[DEFAULT_PROTOCOL]
    if isinstance(value, str):
        return _preset(value)
    if not isinstance(value, Mapping):
        raise ProtocolError(
            f"protocol must be a preset name or a mapping of settings, got {type(value).__name__}")
    settings = dict(value)
    preset = _preset(settings.pop("name", DEFAULT_PROTOCOL))
    unknown = sorted(set(settings) - set(_SCORING_KEYS))
    if unknown:
        raise ProtocolError(f"unknown protocol settings {unknown}; valid: {['name', *_SCORING_KEYS]}")
    changed = {k: v for k, v in settings.items() if getattr(preset, k) != v}
    name = "+".join([preset.name, *(f"{k}={_word(v)}" for k, v in changed.items())])
    return replace(preset, name=name, **changed)


def _word(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _preset(name: Any) -> EvalProtocol:
    if name not in PROTOCOLS:
        raise ProtocolError(f"unknown evaluation protocol {name!r}; named protocols: {list(PROTOCOLS)}")
    return PROTOCOLS[name]


def protocol_of(record: Mapping[str, Any]) -> EvalProtocol:
    """The protocol an eval JSON or report row records; one written before protocols existed was
    scored with the default preset's settings and no recorded decoding."""
    recorded = record.get("protocol")
    if recorded is None:
        return PROTOCOLS[DEFAULT_PROTOCOL].with_decoding(record.get("generation"))
    return EvalProtocol.from_dict(recorded)
