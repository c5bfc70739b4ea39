"""Checkpoints written atomically on any filesystem: the previous one stays until the new one is whole.

    from lora_module.training.checkpoint_io import AtomicCheckpointIO
    L.Trainer(plugins=[AtomicCheckpointIO()])     # what the `lora-pipeline fit` CLI builds (training.cli)

Lightning's TorchCheckpointIO saves through an fsspec transaction that writes a temporary file in
`$TMPDIR` and moves it onto `last.ckpt`. When the output folder is on another filesystem (shared
storage, a second mount), that move is a copy into the destination itself: a SIGKILL during it left
`last.ckpt` half written and the previous good checkpoint gone. Here the temporary file lives in the
destination's own folder, is flushed and fsynced, then renamed over the destination with
`os.replace` (atomic within one filesystem) and the folder entry is fsynced too. A kill at any moment
leaves either the previous checkpoint or the new one, plus at most a stray `.<name>.*.tmp` that the
next save of the same checkpoint removes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH

TMP_SUFFIX = ".tmp"


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory: the rename itself stays atomic
        pass
    finally:
        os.close(fd)


def stale_temporaries(path: Path) -> list[Path]:
    """Temporary files that a killed save of `path` left beside it."""
    return sorted(path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"))


def save_atomically(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """`torch.save` into a temporary file beside `path`, fsync, then rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporaries(path):
        stale.unlink(missing_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves go through `save_atomically`; remote paths keep Lightning's way."""

    @staticmethod
    def add_to(config: dict[str, Any]) -> dict[str, Any]:
        """Trainer arguments with this plugin added, unless they bring a CheckpointIO or a strategy of their
        own (an object, or DeepSpeed, which writes its checkpoints itself)."""
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        strategy = config.get("strategy", "auto")
        if any(isinstance(p, CheckpointIO) for p in plugins) or not isinstance(strategy, str) \
                or "deepspeed" in strategy:
            return config
        return {**config, "plugins": [*plugins, AtomicCheckpointIO()]}

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
                        ) -> None:
        protocol = get_filesystem(path).protocol
        protocols = protocol if isinstance(protocol, tuple) else (protocol,)
        if storage_options is not None or "file" not in protocols:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        save_atomically(checkpoint, path)
