"""The promotion gate of the MLflow registry: which version holds `champion` (no MLflow here).

The gate is a plain function of numbers so it can be read, tested and argued about on its own:

    from lora_module.registry.gate import decide_promotion
    d = decide_promotion({"rougeL": 0.31, "data_fingerprint": "abc"}, {"rougeL": 0.22},
                         {"rougeL": 0.30, "data_fingerprint": "abc", "version": "3"}, "rougeL")
    d.promote, d.alias, d.reason   # True, "champion", "... >= champion v3 ..."

Rule: a candidate becomes `champion` only if its metric is strictly better than the base model's
and at least as good as the current champion's, both measured on the same test data (same data
fingerprint) under the same evaluation protocol (same `protocol_id`: references rule, stemmer,
tokens, decoding; `lora_module.evaluation.protocol`). Which direction is better comes from the
metric registry (`lora_module.evaluation.metrics`: ROUGE up, held-out loss down). A champion
evaluated on other test data, under another protocol, or without the metric is not comparable: the
candidate is then promoted on the base comparison alone, and the reason says so in one sentence.
Anything else: `challenger`.

Versions are read through their tags (`VersionScore.from_tags`, keys from `lora_module.contracts`);
`Decision.as_tags` writes the decision back. Retrying registry calls is `registry.retry`'s job.

Because MLflow has no compare-and-set on aliases, the registry does not apply that rule to "the
champion it read a moment ago" but to the whole registry (`choose_aliases`): of the versions that
are eligible (metric present, strictly better than their base, not demoted by hand), those scored on
the newest eligible version's test data under its protocol compete, and the best metric wins (a tie:
the newer version). `challenger` is the newest other version. Every registration recomputes that choice from
all versions, so whatever the interleaving, the last writer leaves the gate's choice.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from lora_module import contracts as c
from lora_module.contracts import CHALLENGER, CHAMPION
from lora_module.evaluation.metrics import get_metric, metric_tag

PROMOTED = "promoted"
NOT_PROMOTED = "not_promoted"
PENDING = "pending"
"""Values of the `gate.decision` tag (pending: the registration has not finished yet)."""


def _number(value: Any) -> float | None:
    """A finite float, or None for missing / unparsable / NaN values (tags are strings)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


@dataclass(frozen=True)
class Decision:
    """Outcome of the promotion gate, with every number it was based on."""

    promote: bool
    """True: the new version takes the `champion` alias; False: it gets `challenger`."""
    alias: str
    """The alias given to the new version ('champion' or 'challenger')."""
    reason: str
    """One sentence with the numbers that decided."""
    metric: str
    """The compared metric (a ROUGE type such as 'rougeL')."""
    candidate: float | None
    """The new version's metric."""
    base: float | None
    """The untouched base model's metric on the same test data."""
    champion: float | None = None
    """The current champion's metric (None: no champion, or it has no such metric)."""
    champion_version: str | None = None
    """The current champion's version number, if there is one."""
    champion_comparable: bool | None = None
    """Whether the champion was evaluated on the same test data (None: no champion)."""
    data_fingerprint: str | None = None
    """Fingerprint of the test data the candidate was evaluated on."""
    protocol_id: str | None = None
    """The evaluation protocol the candidate was scored under (None: not recorded)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def as_tags(self) -> dict[str, str]:
        """Model-version tags (strings) recording the decision."""
        def show(v: Any) -> str:
            return "none" if v is None else (f"{v:.6f}" if isinstance(v, float) else str(v))

        return {
            c.TAG_GATE_DECISION: PROMOTED if self.promote else NOT_PROMOTED,
            c.TAG_GATE_ALIAS: self.alias,
            c.TAG_GATE_REASON: self.reason,
            c.TAG_GATE_METRIC: self.metric,
            c.TAG_GATE_CANDIDATE: show(self.candidate),
            c.TAG_GATE_BASE: show(self.base),
            c.TAG_GATE_CHAMPION: show(self.champion),
            c.TAG_GATE_CHAMPION_VERSION: show(self.champion_version),
            c.TAG_GATE_CHAMPION_COMPARABLE: show(self.champion_comparable),
            c.TAG_GATE_JSON: json.dumps(self.to_dict(), sort_keys=True),
        }

    def summary(self) -> str:
        verdict = "PROMOTED to champion" if self.promote else "kept as challenger"
        return f"promotion gate ({self.metric}): {verdict}: {self.reason}"


def decide_promotion(
    candidate: dict[str, Any],
    base: dict[str, Any] | None,
    champion: dict[str, Any] | None,
    metric: str = "rougeL",
) -> Decision:
    """Apply the gate. Each dict maps metric names to values; `candidate` and `champion` also carry
    `data_fingerprint` (the test data they were scored on) and `protocol_id` (the protocol they were
    scored under, with its `protocol` name for the reason), and `champion` its `version`."""
    better = get_metric(metric).better
    cand = _number(candidate.get(metric))
    base_v = _number((base or {}).get(metric))
    fp, proto = candidate.get("data_fingerprint"), candidate.get("protocol_id")
    common = {"metric": metric, "candidate": cand, "base": base_v, "data_fingerprint": fp,
              "protocol_id": proto}
    champ_v = _number(champion.get(metric)) if champion else None
    champ_ver = str(champion["version"]) if champion and champion.get("version") is not None else None
    champ_fp = champion.get("data_fingerprint") if champion else None
    same_protocol = champion is not None and champion.get("protocol_id") == proto
    comparable = None if champion is None else (champ_v is not None and fp is not None and champ_fp == fp
                                                and same_protocol)
    common |= {"champion": champ_v, "champion_version": champ_ver, "champion_comparable": comparable}

    def no(reason: str) -> Decision:
        return Decision(promote=False, alias=CHALLENGER, reason=reason, **common)

    def yes(reason: str) -> Decision:
        return Decision(promote=True, alias=CHAMPION, reason=reason, **common)

    if cand is None:
        return no(f"the new version has no {metric} (no evaluation report), so it cannot earn promotion")
    if base_v is None:
        return no(f"no base-model {metric} to compare with, so the gate cannot show the adapter helps")
    if not better(cand, base_v):
        return no(f"{metric} {cand:.4f} does not beat the base model's {base_v:.4f}")
    beats = f"{metric} {cand:.4f} beats the base model's {base_v:.4f}"
    if champion is None:
        return yes(f"{beats}; there is no current champion")
    if not comparable:
        why = _not_comparable(champion, candidate, metric)
        return yes(f"{beats}; the current champion v{champ_ver} {why}, so it is not comparable "
                   "and the base comparison alone decides")
    at_least, below = (">=", "below") if get_metric(metric).higher_is_better else ("<=", "above")
    if not better(champ_v, cand):
        return yes(f"{beats} and is {at_least} the current champion v{champ_ver}'s {champ_v:.4f}")
    return no(f"{beats} but is {below} the current champion v{champ_ver}'s {champ_v:.4f}")


def _not_comparable(champion: dict[str, Any], candidate: dict[str, Any], metric: str) -> str:
    """Why the champion's score cannot be compared with the candidate's (the first reason that holds)."""
    if _number(champion.get(metric)) is None:
        return f"has no {metric}"
    fp, champ_fp = candidate.get("data_fingerprint"), champion.get("data_fingerprint")
    if fp is None or champ_fp != fp:
        return f"was evaluated on other test data (data fingerprint {str(champ_fp)[:12]} vs {str(fp)[:12]})"
    return (f"was scored under another evaluation protocol ({champion.get('protocol') or 'unrecorded'} "
            f"{champion.get('protocol_id') or ''} vs {candidate.get('protocol') or 'unrecorded'} "
            f"{candidate.get('protocol_id') or ''})").replace(" )", ")")


@dataclass(frozen=True)
class VersionScore:
    """What the gate needs of one registered version, read from its tags."""

    version: str
    """Version number."""
    value: float | None
    """Its metric (None: not evaluated)."""
    base: float | None
    """The base model's metric on the same test data (None: unknown)."""
    data_fingerprint: str | None
    """Fingerprint of the test data it was scored on (None: unknown)."""
    demoted_from: tuple[str, ...] = ()
    """Aliases it was last demoted from by hand (`manual.last` tag), which it may not get back."""
    protocol_id: str | None = None
    """The evaluation protocol it was scored under (None: not recorded, as before protocols existed)."""
    higher_is_better: bool = True
    """The metric's direction (from the metric registry)."""
    protocol: str | None = None
    """The protocol's name, for reasons."""

    @classmethod
    def from_tags(cls, version: str | int, tags: dict[str, str], metric: str) -> VersionScore:
        """Read the metric (`rouge.<metric>` / `metric.<metric>`), the baseline's figure, the test-data
        fingerprint, the protocol and a manual demotion from a version's tags (strings)."""
        baseline = tags.get(c.TAG_EVAL_BASELINE)
        fp = tags.get(c.TAG_EVAL_DATA_FINGERPRINT)
        last = tags.get(c.TAG_MANUAL_LAST, "")
        demoted = (last.removeprefix(c.DEMOTED_FROM).split(":", 1)[0].strip(),) if last.startswith(
            c.DEMOTED_FROM) else ()
        return cls(str(version), _number(tags.get(metric_tag(metric))),
                   _number(tags.get(metric_tag(metric, baseline))) if baseline else None,
                   None if fp in (None, "", c.UNKNOWN) else fp, demoted, tags.get(c.TAG_EVAL_PROTOCOL_ID),
                   get_metric(metric).higher_is_better, tags.get(c.TAG_EVAL_PROTOCOL))

    def _key(self) -> float:
        """The metric as a number where larger is better."""
        return self.value if self.higher_is_better else -self.value

    @property
    def eligible(self) -> bool:
        """May hold `champion`: scored, strictly better than its base, not demoted from champion by hand."""
        if self.value is None or self.base is None or CHAMPION in self.demoted_from:
            return False
        return self.value > self.base if self.higher_is_better else self.value < self.base

    def as_champion(self, metric: str) -> dict[str, Any]:
        """The `champion` argument of `decide_promotion`."""
        return {metric: self.value, "data_fingerprint": self.data_fingerprint, "version": self.version,
                "protocol_id": self.protocol_id, "protocol": self.protocol}


def choose_champion(versions: list[VersionScore]) -> VersionScore | None:
    """The registry's champion: among eligible versions scored on the newest eligible version's
    test data under its protocol, the best metric (a tie: the newer version); None when none is eligible."""
    eligible = [v for v in versions if v.eligible]
    if not eligible:
        return None
    newest = max(eligible, key=lambda v: int(v.version))
    same_data = [v for v in eligible if newest.data_fingerprint is not None
                 and v.data_fingerprint == newest.data_fingerprint
                 and v.protocol_id == newest.protocol_id] or [newest]
    return max(same_data, key=lambda v: (v._key(), int(v.version)))


def choose_aliases(versions: list[VersionScore]) -> dict[str, str | None]:
    """{"champion": version or None, "challenger": the newest other version not demoted from it}."""
    champion = choose_champion(versions)
    others = [v for v in versions if (champion is None or v.version != champion.version)
              and CHALLENGER not in v.demoted_from]
    challenger = max(others, key=lambda v: int(v.version)) if others else None
    return {CHAMPION: champion and champion.version, CHALLENGER: challenger and challenger.version}


def decide_in_registry(versions: list[VersionScore], mine: str, candidate: dict[str, Any],
                       base: dict[str, Any] | None, metric: str) -> Decision:
    """The gate's decision for version `mine`, consistent with `choose_champion(versions)`.

    The reason compares `mine` with the champion the registry would have without it; when other
    versions registered meanwhile change the outcome, the reason names the winner instead.
    """
    without = choose_champion([v for v in versions if v.version != mine])
    decision = decide_promotion(candidate, base, without and without.as_champion(metric), metric)
    winner = choose_champion(versions)
    wins = winner is not None and winner.version == mine
    if wins == decision.promote:
        return decision
    if wins:
        reason = f"{decision.reason}; but v{mine} is the best eligible version in the registry"
    else:
        best = f"v{winner.version} ({metric} {winner.value:.4f})" if winner else "none"
        reason = (f"{decision.reason}; but the registry's best eligible version on the newest test "
                  f"data is {best}")
    alias = CHAMPION if wins else CHALLENGER
    return Decision(**{**decision.to_dict(), "promote": wins, "alias": alias, "reason": reason})
