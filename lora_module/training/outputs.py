"""A training run's outputs appear whole or not at all: adapter/ (or model/), metrics.json, config.yaml.

    from lora_module.training.outputs import publish, current_outputs
    publish(out, write)            # write(folder) fills a fresh folder; then one atomic switch
    current_outputs(out)           # the folder holding the complete current export (read from it)

Layout of `<output_dir>` (POSIX):
  exports/<id>/   one complete export: adapter/ or model/, metrics.json, config.yaml
  current         symlink -> exports/<id>; replaced with os.replace, the only atomic switch
  adapter, model, metrics.json, config.yaml    fixed symlinks -> current/<name>, so the
                  documented paths keep working (a name the current export lacks dangles = absent)

Why: three separate renames cannot be atomic together, and a directory cannot be renamed over a
non-empty one; flipping one symlink can. A kill at any point leaves either the previous export or
the new one visible, never a mix. Readers that open several files resolve `current` once with
`current_outputs` so a concurrent publish cannot hand them two exports.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from lora_module import contracts as c

EXPORTS = "exports"
CURRENT = "current"
PUBLISHED = (c.ADAPTER_DIR, c.MODEL_DIR, c.METRICS_FILE, c.CONFIG_FILE)


def current_outputs(out: str | os.PathLike) -> Path:
    """The folder of the complete current export of `out`; `out` itself for a folder without one."""
    out = Path(out)
    link = out / CURRENT
    return link.resolve() if link.is_symlink() else out


def _symlink_atomically(target: str, link: Path) -> None:
    """Point `link` at `target` (relative); replaces an existing link or file in one step."""
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex}.tmp")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def publish(out: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run `write(folder)` on a fresh folder, then make it `out`'s current export in one atomic step.

    Returns the new export folder. Older exports are removed after the switch; a crash before the
    switch leaves the previous export visible and only a stray `exports/.<id>.tmp` behind.
    """
    out = Path(out)
    exports = out / EXPORTS
    exports.mkdir(parents=True, exist_ok=True)
    export_id = uuid.uuid4().hex[:12]
    tmp = exports / f".{export_id}.tmp"
    tmp.mkdir()
    write(tmp)
    folder = exports / export_id
    tmp.rename(folder)
    present = [name for name in PUBLISHED if (folder / name).exists()]
    for name in present:
        link = out / name
        if not (link.is_symlink() and os.readlink(link) == f"{CURRENT}/{name}"):
            _symlink_atomically(f"{CURRENT}/{name}", link)
    _symlink_atomically(f"{EXPORTS}/{export_id}", out / CURRENT)
    for name in set(PUBLISHED) - set(present):  # e.g. `model` after a LoRA run: no dangling links
        if (out / name).is_symlink():
            (out / name).unlink()
    for old in exports.iterdir():
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    return folder
