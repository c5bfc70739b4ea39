"""Retrying MLflow registry calls: which failures are transient, and a capped exponential backoff.

    from lora_module.registry.retry import RetryPolicy
    policy = RetryPolicy(retries=10, backoff=1.0)           # the defaults outlast a server restart
    versions = policy.call(lambda: client.search_model_versions(f), "list versions", uri)

Registration, the registry commands and serving (reading a registered version) all retry through
this module; it imports neither registration nor the promotion gate. MLflow and requests are
imported only to classify an error.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from lora_module.errors import PipelineError
from lora_module.redact import redact_text, redact_uri

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How SQL stores (sqlite, PostgreSQL, MySQL) word a unique-constraint conflict.
WRITE_CONFLICTS = ("UNIQUE constraint failed", "duplicate key value", "Duplicate entry")


class RegistryUnavailableError(PipelineError, RuntimeError):
    """The MLflow tracking server / registry could not be reached after all retries."""


class RetrySettingError(PipelineError, ValueError):
    """A retry setting (retries, backoff, max_backoff) is negative or not a number."""


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


def _seconds(value: object) -> bool:
    """Whether `value` is a finite number of seconds >= 0."""
    return (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            and value >= 0)


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
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or self.retries < 0:
            raise RetrySettingError(f"RetryPolicy.retries must be an integer >= 0, got {self.retries!r}")
        for name in ("backoff", "max_backoff"):
            value = getattr(self, name)
            if not _seconds(value):
                raise RetrySettingError(f"RetryPolicy.{name} must be a number >= 0 seconds, got {value!r}")

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
                        f"MLflow registry at {redact_uri(uri)} unreachable: {what} failed {attempt + 1} "
                        f"time(s); last error: {type(e).__name__}: {redact_text(str(e))[:300]}"
                    ) from e
                delay = self.wait(attempt)
                logger.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(e).__name__,
                               redact_text(str(e))[:120], attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises
