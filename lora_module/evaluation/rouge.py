"""ROUGE scoring with uncertainty: per-example F-measures, bootstrap intervals, paired comparisons.

Scores come from `rouge_score` (the offline reference implementation), so our numbers are the
ones any other user of that package would get. The evaluation protocol
(`lora_module.evaluation.protocol`, default `best-reference`) decides the rest:

- several references per example score as the best reference (per metric), their mean, or the first;
- stemming on or off; rouge_score's ASCII tokens, or Unicode-aware ones for non-Latin text;
- ROUGE-Lsum gets newline-separated sentences from nltk's Punkt sentence splitter, as rouge_score
  documents (its pretrained model needs a download, so Punkt runs with a written-out abbreviation
  list: `SENTENCE_SPLITTER` says so in the report), or only the text's own newlines;
- every mean gets a percentile-bootstrap confidence interval, and two systems scored on the same
  examples are compared with a paired bootstrap.

Use it directly::

    from lora_module.evaluation.rouge import score_examples, summarize, paired_bootstrap
    per_example = score_examples(predictions, references)   # {"rouge1": [..], ...}
    summary = summarize(per_example)                         # {"rouge1": {"mean", "ci_low", ...}}
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np
from nltk.stem import porter
from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
from rouge_score import rouge_scorer, tokenize, tokenizers

from lora_module.errors import PipelineError
from lora_module.evaluation.protocol import EvalProtocol, resolve_protocol

ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")
ROUGE_LABELS: dict[str, str] = {
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
    "rougeLsum": "ROUGE-Lsum",
}
DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_SEED = 0


class RougeInputError(PipelineError, ValueError):
    """Predictions or references that cannot be scored (empty, misaligned, wrong type)."""


# Words that end in a period without ending a sentence: lower-case, without the final period (Punkt's
# convention). The pretrained English Punkt model learnt such a list from a corpus; this one is written out.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt vs etc e.g i.e a.m p.m no nos inc ltd co corp dept approx "
    "jan feb mar apr jun jul aug sep sept oct nov dec u.s u.k b.a m.a ph.d p.e".split()
)
SENTENCE_SPLITTER = (
    f"nltk Punkt (PunktSentenceTokenizer, {len(_ABBREVIATIONS)} fixed English abbreviations instead of the "
    "pretrained model that needs a download)"
)


@functools.cache
def _punkt() -> PunktSentenceTokenizer:
    params = PunktParameters()
    params.abbrev_types = set(_ABBREVIATIONS)
    return PunktSentenceTokenizer(params)


def split_sentences(text: str) -> list[str]:
    """Split text into sentences offline with nltk's Punkt algorithm; existing newlines are boundaries too.

    rouge_score's own convention for ROUGE-Lsum (`RougeScorer(split_summaries=True)`, and Hugging Face's
    summarization recipes) is `nltk.sent_tokenize`: Punkt with a pretrained English model, a download
    that is impossible offline. The same Punkt tokenizer runs here with its abbreviations written out
    ("Mr.", "e.g." do not end a sentence); without them, untrained Punkt splits "Mr. Smith" in two.
    """
    return [s for line in text.splitlines() for s in _punkt().tokenize(line) if s.strip()]


def lsum_text(text: str, splitter: str = "punkt") -> str:
    """The text with one sentence per line, the input format ROUGE-Lsum expects (`splitter` "newline":
    the text as it is, its own newlines the only sentence ends)."""
    return text if splitter == "newline" else "\n".join(split_sentences(text))


@functools.cache
def _porter_stem():
    # Stemming is ~70% of scoring time and a pure function of the word: memoized, the tokens (hence
    # the scores) are those of `RougeScorer(use_stemmer=True)`, several times faster.
    return functools.lru_cache(maxsize=1 << 17)(porter.PorterStemmer().stem)


# Unicode mode: every script's letters and digits; CJK ideographs and kana stand alone (no spaces there).
_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff])")
_NON_WORD = re.compile(r"[\W_]+")


class _ProtocolTokenizer(tokenizers.Tokenizer):
    """rouge_score's tokenizer with the protocol's stemmer and token rule.

    `ascii` is rouge_score's own `tokenize.tokenize` (lower-case a-z0-9 tokens, Porter stemming of
    words over 3 characters). `unicode` splits on non-word characters of any script instead, so
    identical Greek, Cyrillic or Chinese texts score 1.0 rather than 0; on ASCII text both give the
    same tokens (only ASCII words are stemmed).
    """

    def __init__(self, stemmer: bool, unicode_tokens: bool) -> None:
        self.stem = _porter_stem() if stemmer else None
        self.unicode_tokens = unicode_tokens

    def tokenize(self, text: str) -> list[str]:
        if not self.unicode_tokens:
            return tokenize.tokenize(text, self if self.stem else None)  # calls self.stem(word)
        words = _NON_WORD.split(_CJK.sub(r" \1 ", text.lower()))
        if self.stem:
            words = [self.stem(w) if len(w) > 3 and w.isascii() else w for w in words]
        return [w for w in words if w]


def _check_ascii_scorable(refs: list[list[str]], protocol: str) -> None:
    """Refuse references with letters but no ASCII token: every model would score 0 on them, silently."""
    for i, ref_list in enumerate(refs):
        for ref in ref_list:
            if any(ch.isalpha() for ch in ref) and not tokenize.tokenize(ref, None):
                raise RougeInputError(
                    f"references[{i}] {ref[:40]!r} has letters but no ASCII token, so protocol {protocol!r} "
                    "(tokenizer 'ascii') scores it 0 for every model; use tokenizer 'unicode' in the task's "
                    "protocol (e.g. protocol: {name: one-reference-per-row, tokenizer: unicode})")


def _normalize_references(references: Sequence[Sequence[str] | str]) -> list[list[str]]:
    out: list[list[str]] = []
    for i, refs in enumerate(references):
        if isinstance(refs, str):
            refs = [refs]
        if not isinstance(refs, Sequence) or not all(isinstance(r, str) for r in refs):
            raise RougeInputError(
                f"references[{i}] must be a string or a list of strings, "
                f"got {type(refs).__name__}: {refs!r:.80}"
            )
        kept = [r for r in refs if r.strip()]
        if not kept:
            raise RougeInputError(
                f"references[{i}] has no non-empty reference ({list(refs)!r:.80}); every example needs at "
                "least one reference text"
            )
        out.append(kept)
    return out


def score_examples(
    predictions: Sequence[str],
    references: Sequence[Sequence[str] | str],
    rouge_types: Sequence[str] = ROUGE_TYPES,
    protocol: EvalProtocol | str | None = None,
) -> dict[str, list[float]]:
    """Per-example ROUGE F-measures: `{rouge_type: [score per example]}`.

    `references[i]` is a string or a list of strings; with several, the protocol's `references`
    decides (default: each metric keeps its best reference). An empty prediction string scores 0;
    an empty list of predictions is an error.
    """
    protocol = resolve_protocol(protocol)
    if isinstance(predictions, str):
        raise RougeInputError("predictions must be a list of strings, got a single string")
    if len(predictions) == 0:
        raise RougeInputError("predictions is empty: there is nothing to score (0 examples)")
    if len(predictions) != len(references):
        raise RougeInputError(
            f"predictions and references differ in length: {len(predictions)} predictions vs "
            f"{len(references)} references; they must be aligned one per example"
        )
    unknown = [t for t in rouge_types if t not in ROUGE_TYPES]
    if unknown:
        raise RougeInputError(f"unknown rouge_types {unknown}; valid: {list(ROUGE_TYPES)}")
    for i, p in enumerate(predictions):
        if not isinstance(p, str):
            raise RougeInputError(f"predictions[{i}] must be a string, got {type(p).__name__}")
    refs = _normalize_references(references)
    if protocol.tokenizer == "ascii":
        _check_ascii_scorable(refs, protocol.name)

    tokenizer = _ProtocolTokenizer(protocol.stemmer, protocol.tokenizer == "unicode")
    scorer = rouge_scorer.RougeScorer(list(rouge_types), tokenizer=tokenizer)
    # Sentence-per-line text is harmless for ROUGE-1/2/L: the tokenizer treats "\n" as a space.
    scores: dict[str, list[float]] = {t: [] for t in rouge_types}
    for pred, ref_list in zip(predictions, refs, strict=True):
        pred_text = lsum_text(pred, protocol.lsum_splitter)
        per_ref = [scorer.score(lsum_text(ref, protocol.lsum_splitter), pred_text)
                   for ref in (ref_list[:1] if protocol.references == "first" else ref_list)]
        for t in rouge_types:
            values = [result[t].fmeasure for result in per_ref]
            scores[t].append(max(values) if protocol.references == "max" else sum(values) / len(values))
    return scores


def _as_array(values: Sequence[float], what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise RougeInputError(f"{what} must be a non-empty 1-D list of numbers, got shape {arr.shape}")
    return arr


def _check_bootstrap_args(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise RougeInputError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise RougeInputError(f"confidence must be in (0, 1), got {confidence}")


def bootstrap_ci(
    values: Sequence[float],
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> tuple[float, float]:
    """Percentile-bootstrap interval for the mean of `values` (seeded, so reproducible)."""
    _check_bootstrap_args(n_resamples, confidence)
    arr = _as_array(values, "values")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_resamples, arr.size))  # [resamples, n]
    means = arr[idx].mean(axis=1)  # [resamples]
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def summarize(
    per_example: dict[str, Sequence[float]],
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> dict[str, dict[str, float]]:
    """`{rouge_type: {"mean", "ci_low", "ci_high", "n"}}` for per-example scores."""
    out: dict[str, dict[str, float]] = {}
    for t, values in per_example.items():
        arr = _as_array(values, f"scores[{t!r}]")
        low, high = bootstrap_ci(arr, n_resamples, confidence, seed)
        out[t] = {"mean": float(arr.mean()), "ci_low": low, "ci_high": high, "n": int(arr.size)}
    return out


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> dict[str, float]:
    """Compare system A with system B scored on the same examples (same order).

    Resamples examples (not systems) so per-example difficulty cancels. Returns the mean
    difference A - B, its percentile interval, and `p_value`: twice the share of resampled
    differences on the far side of zero (a bootstrap two-sided p-value, capped at 1).
    """
    _check_bootstrap_args(n_resamples, confidence)
    arr_a = _as_array(a, "a")
    arr_b = _as_array(b, "b")
    if arr_a.size != arr_b.size:
        raise RougeInputError(
            f"paired bootstrap needs scores on the same examples: a has {arr_a.size}, b has {arr_b.size}"
        )
    diff = arr_a - arr_b  # [n]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(n_resamples, diff.size))  # [resamples, n]
    boot = diff[idx].mean(axis=1)  # [resamples]
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    share_le = float((boot <= 0).mean())
    share_ge = float((boot >= 0).mean())
    return {
        "mean_diff": float(diff.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "p_value": min(1.0, 2.0 * min(share_le, share_ge)),
        "share_a_better": float((boot > 0).mean()),
        "n": int(diff.size),
    }
