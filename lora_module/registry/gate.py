"""The promotion gate and the retry policy of the MLflow registry (MLflow imported only to classify errors).

The gate is a plain function of numbers so it can be read, tested and argued about on its own:

    from lora_module.registry.gate import decide_promotion
    d = decide_promotion({"rougeL": 0.31, "data_fingerprint": "abc"}, {"rougeL": 0.22},
                         {"rougeL": 0.30, "data_fingerprint": "abc", "version": "3"}, "rougeL")
    d.promote, d.alias, d.reason   # True, "champion", "... >= champion v3 ..."

Rule: a candidate becomes `champion` only if its metric is strictly above the base model's and
at least the current champion's, both measured on the same test data (same data fingerprint).
A champion evaluated on other test data (or without the metric) is not comparable: the candidate
is then promoted on the base comparison alone, and the reason says so. Anything else: `challenger`.

Because MLflow has no compare-and-set on aliases, the registry does not apply that rule to "the
champion it read a moment ago" but to the whole registry (`choose_aliases`): of the versions that
are eligible (metric present, strictly above their base, not demoted by hand), those scored on the
newest eligible version's test data compete, and the highest metric wins (a tie: the newer
version). `challenger` is the newest other version. Every registration recomputes that choice from
all versions, so whatever the interleaving, the last writer leaves the gate's choice.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from lora_module.errors import PipelineError

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
T = TypeVar("T")


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def as_tags(self) -> dict[str, str]:
        """Model-version tags (strings) recording the decision."""
        def show(v: Any) -> str:
            return "none" if v is None else (f"{v:.6f}" if isinstance(v, float) else str(v))

        return {
            "gate.decision": "promoted" if self.promote else "not_promoted",
            "gate.alias": self.alias,
            "gate.reason": self.reason,
            "gate.metric": self.metric,
            "gate.candidate": show(self.candidate),
            "gate.base": show(self.base),
            "gate.champion": show(self.champion),
            "gate.champion_version": show(self.champion_version),
            "gate.champion_comparable": show(self.champion_comparable),
            "gate.json": json.dumps(self.to_dict(), sort_keys=True),
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
    `data_fingerprint` (the test data they were scored on) and `champion` its `version`."""
    cand = _number(candidate.get(metric))
    base_v = _number((base or {}).get(metric))
    fp = candidate.get("data_fingerprint")
    common = {"metric": metric, "candidate": cand, "base": base_v, "data_fingerprint": fp}
    champ_v = _number(champion.get(metric)) if champion else None
    champ_ver = str(champion["version"]) if champion and champion.get("version") is not None else None
    champ_fp = champion.get("data_fingerprint") if champion else None
    comparable = None if champion is None else (champ_v is not None and fp is not None and champ_fp == fp)
    common |= {"champion": champ_v, "champion_version": champ_ver, "champion_comparable": comparable}

    def no(reason: str) -> Decision:
        return Decision(promote=False, alias=CHALLENGER, reason=reason, **common)

    def yes(reason: str) -> Decision:
        return Decision(promote=True, alias=CHAMPION, reason=reason, **common)

    if cand is None:
        return no(f"the new version has no {metric} (no evaluation report), so it cannot earn promotion")
    if base_v is None:
        return no(f"no base-model {metric} to compare with, so the gate cannot show the adapter helps")
    if not cand > base_v:
        return no(f"{metric} {cand:.4f} does not beat the base model's {base_v:.4f}")
    beats = f"{metric} {cand:.4f} beats the base model's {base_v:.4f}"
    if champion is None:
        return yes(f"{beats}; there is no current champion")
    if not comparable:
        why = (
            f"has no {metric}" if champ_v is None
            else f"was evaluated on other test data (data fingerprint {str(champ_fp)[:12]} vs {str(fp)[:12]})"
        )
        return yes(f"{beats}; the current champion v{champ_ver} {why}, so it is not comparable "
                   "and the base comparison alone decides")
    if cand >= champ_v:
        return yes(f"{beats} and is >= the current champion v{champ_ver}'s {champ_v:.4f}")
    return no(f"{beats} but is below the current champion v{champ_ver}'s {champ_v:.4f}")


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

    @classmethod
    def from_tags(cls, version: str | int, tags: dict[str, str], metric: str) -> VersionScore:
        """Read `rouge.<metric>`, the baseline's `rouge.<eval.baseline>.<metric>`, the test-data
        fingerprint and a manual demotion from a version's tags (strings)."""
        baseline = tags.get("eval.baseline")
        fp = tags.get("eval_data_fingerprint")
        last = tags.get("manual.last", "")
        demoted = (last.removeprefix("demoted from ").split(":", 1)[0].strip(),) if last.startswith(
            "demoted from ") else ()
        return cls(str(version), _number(tags.get(f"rouge.{metric}")),
                   _number(tags.get(f"rouge.{baseline}.{metric}")) if baseline else None,
                   None if fp in (None, "", "unknown") else fp, demoted)

    @property
    def eligible(self) -> bool:
        """May hold `champion`: scored, strictly above its base, not demoted from champion by hand."""
        return (self.value is not None and self.base is not None and self.value > self.base
                and CHAMPION not in self.demoted_from)

    def as_champion(self, metric: str) -> dict[str, Any]:
        """The `champion` argument of `decide_promotion`."""
        return {metric: self.value, "data_fingerprint": self.data_fingerprint, "version": self.version}


def choose_champion(versions: list[VersionScore]) -> VersionScore | None:
    """The registry's champion: among eligible versions scored on the newest eligible version's
    test data, the highest metric (a tie: the newer version); None when none is eligible."""
    eligible = [v for v in versions if v.eligible]
    if not eligible:
        return None
    newest = max(eligible, key=lambda v: int(v.version))
    same_data = [v for v in eligible if newest.data_fingerprint is not None
                 and v.data_fingerprint == newest.data_fingerprint] or [newest]
    return max(same_data, key=lambda v: (v.value, int(v.version)))


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


class RegistryUnavailableError(PipelineError, RuntimeError):
    """The MLflow tracking server / registry could not be reached after all retries."""


# How SQL stores (sqlite, PostgreSQL, MySQL) word a unique-constraint conflict.
WRITE_CONFLICTS = ("UNIQUE constraint failed", "duplicate key value", "Duplicate entry")


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: the registry is down, overloaded or its database briefly locked."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, requests.HTTPError):
        return exc.response is None or exc.response.status_code >= 500 or exc.response.status_code == 429
    if isinstance(exc, MlflowException):
        # Transport failures surface as INTERNAL_ERROR ("API request to ... failed with exception").
        if exc.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
            return True
        # Two machines writing the same row at once (e.g. setting one alias): the store's unique
        # constraint rejects the second insert as BAD_REQUEST. Our writes are idempotent, and the
        # alias step re-reads after writing, so trying again is right.
        return any(m in str(exc) for m in WRITE_CONFLICTS)
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """How registry calls are retried: capped exponential backoff between attempts."""

    retries: int = 10
    """Extra attempts after the first one (0: fail at once)."""
    backoff: float = 1.0
    """Seconds before the first retry; doubled for each further retry."""
    max_backoff: float = 10.0
    """Cap on one wait, in seconds (short enough to notice a server soon after it is back)."""

    def __post_init__(self) -> None:
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"RetryPolicy.retries must be an integer >= 0, got {self.retries!r}")
        for name in ("backoff", "max_backoff"):
            value = getattr(self, name)
            if _number(value) is None or value < 0:
                raise ValueError(f"RetryPolicy.{name} must be a number >= 0 seconds, got {value!r}")

    @property
    def total_wait(self) -> float:
        """Seconds slept before giving up (without jitter): the defaults wait 1+2+4+8+10*6 = 75 s,
        so a registration outlives a tracking server that is down for 30 s and then takes its
        usual 8-30 s to start."""
        return sum(min(self.max_backoff, self.backoff * 2**a) for a in range(self.retries))

    def wait(self, attempt: int) -> float:
        """Seconds to sleep after failed attempt number `attempt` (0-based), with 10% jitter so
        concurrent registrations do not retry in lockstep."""
        base = min(self.max_backoff, self.backoff * (2**attempt))
        return base * (1.0 + 0.1 * random.random())

    def call(self, fn: Callable[[], T], what: str, uri: str) -> T:
        """Run `fn`, retrying transient failures; then raise RegistryUnavailableError naming `uri`."""
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as e:
                if not is_transient(e):
                    raise
                if attempt == self.retries:
                    raise RegistryUnavailableError(
                        f"MLflow registry at {uri} unreachable: {what} failed {attempt + 1} time(s); "
                        f"last error: {type(e).__name__}: {str(e)[:300]}"
                    ) from e
                delay = self.wait(attempt)
                logger.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(e).__name__,
                               str(e)[:120], attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises
