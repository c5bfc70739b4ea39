"""One champion per registered model, even with several machines registering into one server.

MLflow has no compare-and-set on aliases, so two registrations that each read "the champion" and
then move it can leave the worse version on top. Two measures, used by `register_adapter`:

- `converge_aliases` recomputes `champion` / `challenger` from the registry's full state (every
  version's metric tags, `gate.choose_aliases`), sets what differs, and reads the state again
  until a read finds nothing to change. Every writer's last read follows its own writes and its
  own new version, so the last read of all sees every version and every write: whatever the
  interleaving, the aliases end on the gate's choice.
- `registration_lock` serialises that step: an flock under the pipeline home (threads and
  processes of one machine) and, when a Prefect API is configured, a Prefect global concurrency
  limit `lora-registry-<model>` of 1 held by the Prefect server (every machine of a deployment).
  The lock only saves needless alias flips; correctness comes from converging.

    from lora_module.registry.aliases import converge_aliases, registration_lock
    with registration_lock("summary-lora", home.locks_dir):
        scores = converge_aliases(client, "summary-lora", "rougeL", call)
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lora_module.names import InvalidNameError
from lora_module.registry.gate import VersionScore, choose_aliases

logger = logging.getLogger(__name__)

LIMIT_PREFIX = "lora-registry-"
_ROUNDS = 10


def name_filter(name: str) -> str:
    """`name='<name>'` for MLflow's search filters; double quotes for a name holding a single
    quote (a model left from before names were checked), so listing it still works."""
    if "'" not in name:
        return f"name='{name}'"
    if '"' not in name:
        return f'name="{name}"'
    raise InvalidNameError(
        f"registered model name {name!r} holds both quote characters: MLflow cannot search it")


def read_state(client: Any, name: str, metric: str, call: Callable[..., Any]
               ) -> tuple[list[VersionScore], dict[str, str]]:
    """Every version of `name` as the gate sees it, and the current aliases {alias: version}."""
    versions = call(lambda: client.search_model_versions(name_filter(name)), f"read versions of {name}")
    model = call(lambda: client.get_registered_model(name), f"read aliases of {name}")
    scores = [VersionScore.from_tags(mv.version, mv.tags or {}, metric) for mv in versions]
    return scores, {alias: str(v) for alias, v in (model.aliases or {}).items()}


def converge_aliases(client: Any, name: str, metric: str, call: Callable[..., Any]) -> list[VersionScore]:
    """Set `champion` / `challenger` of `name` to the gate's choice until a fresh read agrees; returns
    the versions of that last read. An alias with no choice (no eligible version) is left alone."""
    for _ in range(_ROUNDS):
        scores, aliases = read_state(client, name, metric, call)
        stale = {a: v for a, v in choose_aliases(scores).items() if v is not None and aliases.get(a) != v}
        if not stale:
            return scores
        for alias, version in stale.items():
            call(lambda a=alias, v=version: client.set_registered_model_alias(name, a, v),
                 f"set alias {alias} on {name} v{version}")
    # Only endless concurrent registrations get here; each of them converges again when it ends.
    logger.warning("aliases of %s still changing after %d rounds; the next registration settles them",
                   name, _ROUNDS)
    return scores


@contextlib.contextmanager
def _file_lock(name: str, lock_dir: Path) -> Iterator[None]:
    """flock on `<lock_dir>/<name>.lock`: threads and processes of this machine (each `open` is its
    own lock owner). Names are checked by `check_name`, so they are safe file names."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prefect_api_url() -> str | None:
    """The Prefect API this process talks to: the settings of a Prefect already imported (a flow
    run), else `$PREFECT_API_URL`; None without one. Prefect is not imported just to ask (3 s)."""
    if "prefect" not in sys.modules:
        return os.environ.get("PREFECT_API_URL") or None
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def _prefect_limit(name: str, timeout: float) -> contextlib.AbstractContextManager:
    """Prefect's global concurrency limit `lora-registry-<name>` (limit 1, created if missing), or
    a no-op without a Prefect API or when it cannot be reached (converging still holds)."""
    url = prefect_api_url()
    if not url:
        return contextlib.nullcontext()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    limit = f"{LIMIT_PREFIX}{name}"
    try:
        with get_client(sync_client=True) as client:
            # Read first: creating one that exists is refused, but the server logs its UNIQUE error.
            try:
                client.read_global_concurrency_limit_by_name(limit)
            except ObjectNotFound:
                with contextlib.suppress(ObjectAlreadyExists):  # another machine created it meanwhile
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
    except Exception as e:  # an unreachable Prefect must not block a registration
        logger.warning("Prefect API %s not usable (%s: %s); aliases of %s are converged without its lock",
                       url, type(e).__name__, str(e)[:200], name)
        return contextlib.nullcontext()
    # A lease, renewed while held, so a machine that dies holding the slot frees it when it lapses.
    return concurrency(limit, occupy=1, timeout_seconds=timeout, strict=True, lease_duration=60,
                       raise_on_lease_renewal_failure=False)


@contextlib.contextmanager
def registration_lock(name: str, lock_dir: Path, timeout: float = 900.0) -> Iterator[None]:
    """Hold the alias step of registered model `name`: this machine's file lock, then (with a
    Prefect API) the Prefect server's limit shared by every machine; `timeout` seconds to get it."""
    with _file_lock(name, lock_dir), _prefect_limit(name, timeout):
        yield
