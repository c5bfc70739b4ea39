"""Earlier registrations of the same adapter: the versions `register_adapter` completes or reuses.

A registration's identity (`contracts.registration_identity`: adapter checksum, training run,
registered model) is tagged on its run and its version from creation. `same_registration` lists the
versions carrying it, oldest first, with their runs' status; `register_adapter` completes one whose
run never finished, and, with `reuse_finished=True` (a flow that resumed a run folder whose
registration may already have gone through), returns the newest FINISHED one as it stands instead
of adding a version:

    from lora_module.registry.reuse import current_alias, finished_version, recorded_decision
    mv = finished_version(client, "summary-lora", identity)      # None: never fully registered
    current_alias(client, "summary-lora", mv.version), recorded_decision(mv.tags)
"""

from __future__ import annotations

from typing import Any

from mlflow import MlflowClient
from mlflow.entities import RunStatus

from lora_module import contracts as c
from lora_module.contracts import CHALLENGER, CHAMPION
from lora_module.registry.aliases import name_filter
from lora_module.registry.gate import PROMOTED

_FINISHED = RunStatus.to_string(RunStatus.FINISHED)


def same_registration(client: MlflowClient, name: str, identity: dict[str, str]) -> list[tuple[Any, str]]:
    """(version, status of its run) of each version of model `name` with this registration identity,
    oldest first."""
    sha = identity[c.TAG_ADAPTER_SHA256]
    found = client.search_model_versions(f"{name_filter(name)} and tags.{c.TAG_ADAPTER_SHA256} = '{sha}'")
    # The training run is compared here, not in the filter: a version without the tag counts as
    # "none" (no training run), which a registry filter cannot match.
    mine = [mv for mv in found
            if (mv.tags or {}).get(c.TAG_TRAINING_RUN_ID, c.NONE) == identity[c.TAG_TRAINING_RUN_ID]]
    mine.sort(key=lambda mv: int(mv.version))
    return [(mv, client.get_run(mv.run_id).info.status) for mv in mine]


def finished_version(client: MlflowClient, name: str, identity: dict[str, str]) -> Any | None:
    """The newest version of this registration whose run FINISHED (None: no complete registration)."""
    done = [mv for mv, status in same_registration(client, name, identity) if status == _FINISHED]
    return done[-1] if done else None


def unfinished_version(client: MlflowClient, name: str, identity: dict[str, str]) -> Any | None:
    """The oldest version of this registration whose run never finished (an interrupted attempt)."""
    return next((mv for mv, status in same_registration(client, name, identity) if status != _FINISHED), None)


def current_alias(client: MlflowClient, name: str, version: str) -> str:
    """The alias version `version` holds now: `champion` before `challenger` before any other (by
    name); "none" when a newer version took its alias."""
    aliases = set(client.get_model_version(name, version).aliases or ())
    ranked = [a for a in (CHAMPION, CHALLENGER) if a in aliases] + sorted(aliases - {CHAMPION, CHALLENGER})
    return ranked[0] if ranked else c.NONE


def recorded_decision(tags: dict[str, str]) -> dict[str, Any]:
    """The gate's decision as the version's tags record it (its full record is the run's lineage.json)."""
    return {"promote": tags.get(c.TAG_GATE_DECISION) == PROMOTED, "reason": tags.get(c.TAG_GATE_REASON)}
