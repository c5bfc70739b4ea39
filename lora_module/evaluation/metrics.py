"""The metric registry: every score the evaluation computes is one `Metric` entry, read by everything else.

The report (tables, chart, paired comparisons), the eval JSON, the registration's MLflow metrics and
version tags, the promotion gate (which direction is better), the task spec's `metric` validation
and the rank sweep's metric choice all look metrics up here, so adding a metric is one
`register_metric` call:

    from lora_module.evaluation.metrics import Metric, register_metric
    register_metric(Metric("length_ratio", "length ratio", per_example=lambda inp: [...]))

A metric is either per-example (a score per example; its mean and a percentile-bootstrap interval)
or corpus-level (per-example sufficient statistics, summed, turned into one score by `from_stats`;
the bootstrap resamples examples and recomputes the score, as sacrebleu's own does). Registered:

- `rouge1`, `rouge2`, `rougeL`, `rougeLsum`: ROUGE F-measures (`evaluation.rouge`);
- `exact_match`: the prediction equals a reference after lower-casing and collapsing whitespace;
- `chrf`, `bleu`: sacrebleu's corpus chrF and BLEU (default settings, 13a tokens), as 0-1 fractions;
- `loss`, `perplexity`: the model's held-out token loss on the references (teacher-forced, the
  same test rows) and its exponential; they need the model, so outputs scored without one skip them.

Every metric follows the evaluation protocol's `references` rule (max: best reference; mean: every
reference as its own row; first: the first reference).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lora_module import contracts as c
from lora_module.errors import PipelineError
from lora_module.evaluation.protocol import EvalProtocol
from lora_module.evaluation.rouge import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    ROUGE_LABELS,
    ROUGE_TYPES,
    bootstrap_ci,
    paired_bootstrap,
    score_examples,
)

NLL = "nll"
"""Extra input of the model-based metrics: per example, per reference, [summed token NLL, tokens]."""


class MetricError(PipelineError, ValueError):
    """An unknown metric name, or a metric entry that cannot be registered."""


@dataclass
class ScoringInput:
    """What a scorer gets: aligned predictions and references, the protocol, and model-made extras."""

    predictions: Sequence[str]
    references: Sequence[Sequence[str]]
    protocol: EvalProtocol
    extras: dict[str, Any] = field(default_factory=dict)
    """Inputs only a model can give (key NLL); a metric whose `needs` is absent is skipped."""
    cache: dict[str, Any] = field(default_factory=dict)
    """Work shared by several metrics (the four ROUGE types are scored in one pass)."""


@dataclass(frozen=True)
class Metric:
    """One metric: a name, how to score it, which direction is better, how to show it."""

    name: str
    """Key in eval JSON and report.json, in tags (`contracts.metric_key`), in task specs."""
    label: str
    """Column header (ROUGE-1, chrF, ...)."""
    higher_is_better: bool = True
    per_example: Callable[[ScoringInput], list[float]] | None = None
    """Scores per example; the metric is their mean."""
    corpus_stats: Callable[[ScoringInput], list[list[float]]] | None = None
    """Sufficient statistics per example (summed over examples); needs `from_stats`."""
    from_stats: Callable[[np.ndarray], float] | None = None
    """The corpus score from summed statistics."""
    scale: float = 100.0
    """Display factor: 100 shows a 0-1 score in points."""
    unit: str = "points"
    """What a change of `scale * value` is called in the report."""
    bounded: bool = True
    """A 0-1 score (drawn in the report's bar chart with the others)."""
    needs: str | None = None
    """An `extras` key the scorer reads; absent (no model): the metric is not computed."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.replace("_", "").isalnum():
            raise MetricError(f"metric name must be letters, digits and '_', got {self.name!r}")
        corpus = self.corpus_stats is not None and self.from_stats is not None
        half = (self.corpus_stats is None) != (self.from_stats is None)
        if (self.per_example is not None) == corpus or half:
            raise MetricError(
                f"metric {self.name!r} needs either per_example, or corpus_stats with from_stats")

    @property
    def corpus(self) -> bool:
        return self.per_example is None

    def better(self, a: float, b: float) -> bool:
        """`a` is strictly better than `b`."""
        return a > b if self.higher_is_better else a < b


_REGISTRY: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    """Add a metric; a name that is taken is an error (unregister it first)."""
    if metric.name in _REGISTRY:
        raise MetricError(f"metric {metric.name!r} is already registered; unregister_metric it first")
    _REGISTRY[metric.name] = metric
    return metric


def unregister_metric(name: str) -> None:
    """Remove a metric (a plugin's or a test's)."""
    get_metric(name)
    del _REGISTRY[name]


def metric_names() -> tuple[str, ...]:
    """Every registered metric, in registration order (the report's column order)."""
    return tuple(_REGISTRY)


def get_metric(name: str) -> Metric:
    """The registered metric `name`; an unknown name lists the valid ones."""
    if name not in _REGISTRY:
        raise MetricError(f"unknown metric {name!r}; registered metrics: {list(_REGISTRY)}")
    return _REGISTRY[name]


def metric_tag(name: str, model: str | None = None) -> str:
    """The tag / MLflow metric key of a metric's figure (`rouge.rougeL`, `metric.base.chrf`)."""
    return c.metric_key(name, model)


# ---- computing and summarising -------------------------------------------------------------------
def compute(predictions: Sequence[str], references: Sequence[Sequence[str]], protocol: EvalProtocol,
            extras: dict[str, Any] | None = None) -> dict[str, dict[str, list]]:
    """`{name: {"scores": [...]} | {"stats": [[...], ...]}}` for every registered metric whose needs are
    met."""
    inp = ScoringInput(predictions, [list(r) for r in references], protocol, dict(extras or {}))
    out: dict[str, dict[str, list]] = {}
    for m in _REGISTRY.values():
        if m.needs is not None and m.needs not in inp.extras:
            continue
        if m.corpus:
            out[m.name] = {"stats": [list(map(float, row)) for row in m.corpus_stats(inp)]}
        else:
            out[m.name] = {"scores": [float(v) for v in m.per_example(inp)]}
    return out


def _resample_counts(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] how often each example is drawn: the same draws as `rouge.bootstrap_ci`."""
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    counts = np.zeros((n_resamples, n))
    np.add.at(counts, (np.repeat(np.arange(n_resamples), n), idx.ravel()), 1.0)
    return counts


def _corpus_boot(metric: Metric, stats: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    sums = _resample_counts(len(stats), n_resamples, seed) @ stats  # [resamples, k]
    return np.array([metric.from_stats(row) for row in sums])


def summarize_metric(name: str, scored: dict[str, list], n_resamples: int = DEFAULT_RESAMPLES,
                     confidence: float = DEFAULT_CONFIDENCE, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """{"mean" (the score: a mean, or the corpus score), "ci_low", "ci_high", "n"} of one metric."""
    metric = get_metric(name)
    if not metric.corpus:
        values = np.asarray(scored["scores"], dtype=np.float64)
        low, high = bootstrap_ci(values, n_resamples, confidence, seed)
        return {"mean": float(values.mean()), "ci_low": low, "ci_high": high, "n": int(values.size)}
    stats = np.asarray(scored["stats"], dtype=np.float64)
    boot = _corpus_boot(metric, stats, n_resamples, seed)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return {"mean": float(metric.from_stats(stats.sum(axis=0))), "ci_low": float(low), "ci_high": float(high),
            "n": len(stats), "corpus": True}


def paired_metric(name: str, a: dict[str, list], b: dict[str, list], n_resamples: int = DEFAULT_RESAMPLES,
                  confidence: float = DEFAULT_CONFIDENCE, seed: int = DEFAULT_SEED) -> dict[str, float]:
    """System A vs B on the same examples (`rouge.paired_bootstrap`'s fields); `share_a_better` follows
    the metric's direction."""
    metric = get_metric(name)
    if not metric.corpus:
        out = paired_bootstrap(a["scores"], b["scores"], n_resamples, confidence, seed)
        if not metric.higher_is_better:  # the same draws with B - A: the share where A is lower
            out["share_a_better"] = paired_bootstrap(b["scores"], a["scores"], n_resamples, confidence,
                                                     seed)["share_a_better"]
        return out
    sa, sb = np.asarray(a["stats"], dtype=np.float64), np.asarray(b["stats"], dtype=np.float64)
    boot = _corpus_boot(metric, sa, n_resamples, seed) - _corpus_boot(metric, sb, n_resamples, seed)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    better = boot > 0 if metric.higher_is_better else boot < 0
    return {"mean_diff": float(metric.from_stats(sa.sum(axis=0)) - metric.from_stats(sb.sum(axis=0))),
            "ci_low": float(low), "ci_high": float(high),
            "p_value": min(1.0, 2.0 * min(float((boot <= 0).mean()), float((boot >= 0).mean()))),
            "share_a_better": float(better.mean()), "n": len(sa)}


# ---- the shipped metrics -------------------------------------------------------------------------
def _rouge(rouge_type: str) -> Callable[[ScoringInput], list[float]]:
    def score(inp: ScoringInput) -> list[float]:
        if "rouge" not in inp.cache:
            inp.cache["rouge"] = score_examples(inp.predictions, inp.references, ROUGE_TYPES, inp.protocol)
        return inp.cache["rouge"][rouge_type]

    return score


def _chosen(refs: Sequence[str], protocol: EvalProtocol) -> Sequence[str]:
    return refs[:1] if protocol.references == "first" else refs


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def _exact_match(inp: ScoringInput) -> list[float]:
    out = []
    for pred, refs in zip(inp.predictions, inp.references, strict=True):
        hits = [float(_normal(pred) == _normal(r)) for r in _chosen(refs, inp.protocol)]
        out.append(sum(hits) / len(hits) if inp.protocol.references == "mean" else max(hits))
    return out


def _sacrebleu_stats(kind: str) -> Callable[[ScoringInput], list[list[float]]]:
    """Per-example sacrebleu statistics: max = sacrebleu's own multi-reference statistics, mean = the
    sum over references (each its own row), first = the first reference's."""
    def stats(inp: ScoringInput) -> list[list[float]]:
        scorer = _sacrebleu(kind)
        rows = []
        for pred, refs in zip(inp.predictions, inp.references, strict=True):
            refs = list(_chosen(refs, inp.protocol))
            if inp.protocol.references == "mean":
                per_ref = [scorer._extract_corpus_statistics([pred], [[r]])[0] for r in refs]
                rows.append(list(np.sum(np.asarray(per_ref, dtype=np.float64), axis=0)))
            else:
                rows.append(scorer._extract_corpus_statistics([pred], [[r] for r in refs])[0])
        return rows

    return stats


def _sacrebleu(kind: str) -> Any:
    from sacrebleu.metrics import BLEU, CHRF

    return BLEU() if kind == "bleu" else CHRF()


def _sacrebleu_score(kind: str) -> Callable[[np.ndarray], float]:
    def score(summed: np.ndarray) -> float:
        values = [int(round(v)) for v in summed] if kind == "bleu" else list(summed)
        return _sacrebleu(kind)._compute_score_from_stats(values).score / 100.0

    return score


def _nll_stats(inp: ScoringInput) -> list[list[float]]:
    """[summed token NLL, tokens] per example: best reference (lowest loss per token), all, or the first."""
    rows = []
    for per_ref in inp.extras[NLL]:
        chosen = [list(map(float, r)) for r in _chosen(per_ref, inp.protocol)]
        if inp.protocol.references == "max":
            rows.append(min(chosen, key=lambda r: r[0] / max(r[1], 1.0)))
        else:
            rows.append(list(np.sum(np.asarray(chosen), axis=0)))
    return rows


def _loss(summed: np.ndarray) -> float:
    return float(summed[0] / summed[1]) if summed[1] > 0 else math.nan


for _t in ROUGE_TYPES:
    register_metric(Metric(_t, ROUGE_LABELS[_t], per_example=_rouge(_t)))
register_metric(Metric("exact_match", "exact match", per_example=_exact_match))
for _kind, _label in (("chrf", "chrF"), ("bleu", "BLEU")):
    register_metric(Metric(_kind, _label, corpus_stats=_sacrebleu_stats(_kind),
                           from_stats=_sacrebleu_score(_kind)))
register_metric(Metric("loss", "held-out loss", higher_is_better=False, corpus_stats=_nll_stats,
                       from_stats=_loss, scale=1.0, unit="nats", bounded=False, needs=NLL))
register_metric(Metric("perplexity", "perplexity", higher_is_better=False, corpus_stats=_nll_stats,
                       from_stats=lambda s: math.exp(_loss(s)), scale=1.0, unit="", bounded=False, needs=NLL))
