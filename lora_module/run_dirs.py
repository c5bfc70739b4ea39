"""Run folders that a re-run with the same inputs resumes instead of starting over (flows use it).

    from lora_module.run_dirs import claim_run_dir, training_key
    key = training_key({"spec": spec.to_dict(), "base": base, "data": data_fingerprint},
                       [spec.lora_config, spec.full_config])
    with claim_run_dir(home.runs_dir("summary"), key, home.new_run_dir("summary", flow_id)) as claim:
        claim.path, claim.adopted          # the folder to train in; True: an interrupted run's folder
        ...                                # train (resuming from its checkpoints/last.ckpt), evaluate
        claim.finish()                     # done: a later run with these inputs gets a new folder

Each run folder holds `run.json` ({"key", "state": "running"|"done", ...}) and `run.lock`, which the
process working in the folder holds with `flock` for as long as it runs; the kernel drops the lock
when that process dies (SIGKILL included). A run folder of the same key that is not done and whose
lock is free was interrupted: the newest such folder is adopted (its training resumes from
`last.ckpt`), older ones of the same key are removed as superseded. Folders of other keys, finished
folders and folders in use by a live run are never touched. Standard library only.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from lora_module.contracts import RUN_LOCK_FILE, RUN_STATE_FILE
from lora_module.errors import PipelineError
from lora_module.files import sha256_file, sha256_json, write_json_atomic

RUNNING, DONE = "running", "done"


def training_key(inputs: dict[str, Any], files: Sequence[str | os.PathLike | None] = ()) -> str:
    """A key of everything a run's training depends on: `inputs` (JSON-able) and the contents of `files`."""
    contents = [sha256_file(f) if f and Path(f).is_file() else None for f in files]
    return sha256_json({"inputs": inputs, "files": contents})[:16]


class RunDirBusyError(PipelineError, RuntimeError):
    """The new run folder is held by another process (two runs started with one folder name)."""


@dataclass
class RunClaim:
    """A run folder held by this process: `path`, whether it was `adopted`, the folders `removed`."""

    path: Path
    key: str
    adopted: bool
    removed: list[Path] = field(default_factory=list)

    def finish(self) -> None:
        """Mark the run done: a later run with the same inputs starts a new folder."""
        _write_state(self.path, self.key, DONE)


def _write_state(folder: Path, key: str, state: str) -> None:
    write_json_atomic(folder / RUN_STATE_FILE, {"key": key, "state": state,
                                                "updated": datetime.now(UTC).isoformat(timespec="seconds")})


def _read_state(folder: Path) -> dict[str, Any]:
    try:
        state = json.loads((folder / RUN_STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _try_lock(folder: Path) -> IO[bytes] | None:
    """The folder's lock, held through the returned file; None when a live process holds it."""
    handle = open(folder / RUN_LOCK_FILE, "ab")  # noqa: SIM115 (held open until the claim ends)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _interrupted(runs_dir: Path, key: str) -> list[Path]:
    """Folders of `key` that are not done, newest first."""
    if not runs_dir.is_dir():
        return []
    found = [d for d in runs_dir.iterdir() if d.is_dir() and not d.is_symlink()
             and _read_state(d).get("key") == key and _read_state(d).get("state") != DONE]
    return sorted(found, key=lambda d: d.name, reverse=True)


def _adopt(runs_dir: Path, key: str) -> tuple[Path, IO[bytes], list[Path]] | None:
    """Lock the newest interrupted folder of `key`; remove older interrupted ones that nobody holds."""
    adopted: tuple[Path, IO[bytes]] | None = None
    removed = []
    for folder in _interrupted(runs_dir, key):
        try:
            lock = _try_lock(folder)
        except OSError:  # not ours to write (another user's, read-only): not adoptable
            continue
        if lock is None:  # a live run works there
            continue
        if _read_state(folder).get("state") == DONE:  # finished between the listing and the lock
            lock.close()
            continue
        if adopted is None:
            adopted = (folder, lock)
            continue
        shutil.rmtree(folder, ignore_errors=True)  # superseded by the adopted one (same inputs)
        lock.close()
        removed.append(folder)
    return None if adopted is None else (*adopted, removed)


@contextmanager
def claim_run_dir(runs_dir: str | os.PathLike, key: str, new_dir: str | os.PathLike) -> Iterator[RunClaim]:
    """The folder for a run of `key` (an interrupted one's, else `new_dir`), locked while the block runs."""
    runs_dir, new_dir = Path(runs_dir), Path(new_dir)
    found = _adopt(runs_dir, key)
    if found is None:
        new_dir.mkdir(parents=True, exist_ok=True)
        folder, lock, removed = new_dir, _try_lock(new_dir), []
        if lock is None:
            raise RunDirBusyError(f"run folder {new_dir} is in use by another process; start the run again")
        _write_state(folder, key, RUNNING)
    else:
        folder, lock, removed = found
    try:
        yield RunClaim(folder, key, adopted=found is not None, removed=removed)
    finally:
        lock.close()
