"""Writing files so readers never see half of one, and hashing files and folders: the one copy.

    from lora_module.files import write_atomic, write_json_atomic, publish_dir, sha256_file
    write_json_atomic(out / "report.json", report)      # temp file + rename, mode 0666 & ~umask
    publish_dir(tmp_folder, final_folder)               # a finished folder appears at once, or not at all
    sha256_file(path), sha256_files(paths), sha256_json(obj)

Standard library only, so every layer (data, training, evaluation, registry, flows) can use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def _process_umask() -> int:
    """The process umask, read without changing it where Linux shows it (`/proc/self/status`).

    `os.umask` can only be read by setting it; between the two calls another thread's new file
    would get the stand-in value, so that fallback runs once, at import.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# What a plain `open(..., "w")` gives (mkstemp alone gives 0600): 0644 under the usual umask 022,
# 0600 under 077, so a user who keeps predictions private gets private files.
FILE_MODE = 0o666 & ~_process_umask()


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename.

    A crash leaves the old file (or none), never a truncated one; the file gets mode FILE_MODE.
    """
    return write_with(path, lambda tmp: tmp.write_bytes(data.encode() if isinstance(data, str) else data))


def write_json_atomic(path: str | os.PathLike, payload: Any, *, indent: int = 2) -> Path:
    """`payload` as JSON (values JSON cannot hold written with `str`), atomically."""
    return write_atomic(path, json.dumps(payload, indent=indent, default=str) + "\n")


def write_with(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Let `write(tmp_path)` produce the file (e.g. a library's save function), then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def publish_dir(tmp: Path, final: Path) -> bool:
    """Rename a finished temporary folder to `final`; if a complete copy got there first, drop ours.

    For content-addressed folders (same name, same content). Returns True when ours was published.
    """
    try:
        os.rename(tmp, final)
        return True
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def move_aside(path: Path) -> Path:
    """Rename an incomplete folder to `<name>.incomplete-<unix time>` (kept, not deleted); returns it."""
    aside = path.with_name(f"{path.name}.incomplete-{int(time.time())}")
    os.rename(path, aside)
    return aside


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: Iterable[str | os.PathLike]) -> str:
    """One hash over several files' names and contents (order given by the caller)."""
    return sha256_json([[Path(p).name, sha256_file(p)] for p in paths])


def sha256_dir(folder: str | os.PathLike, suffixes: tuple[str, ...] | None = None) -> str:
    """Hash of the files directly in `folder` (only those ending in `suffixes`, if given), by name."""
    files = sorted(f for f in Path(folder).iterdir()
                   if f.is_file() and (suffixes is None or f.suffix in suffixes))
    return sha256_files(files)


def sha256_json(obj: Any) -> str:
    """Hash of `obj` as canonical JSON (sorted keys; other values as `str`)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
