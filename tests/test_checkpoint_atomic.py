"""Checkpoints survive a SIGKILL during their write on any filesystem (#27, "Checkpoint lost across
filesystems").

Lightning wrote a checkpoint to `$TMPDIR` and moved it onto `last.ckpt`; with the output folder on another
filesystem the move is a copy into `last.ckpt` itself, and a kill during it left half a file and no good
checkpoint. The output folder here is a tmpfs mounted for the test (we run as root in CI; without the
right to mount, the tests skip and say so), `$TMPDIR` stays on the root filesystem.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_training import prepare_tiny

from lora_module.training.checkpoint_io import AtomicCheckpointIO, stale_temporaries
from lora_module.training.cli import LoraCLI

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "deploy" / "configs" / "demo_summary_lora.yaml"
N_FLOATS = 1 << 24  # 64 MiB per checkpoint: its write lasts long enough to be caught in the middle

# Saves checkpoint versions 1, 2, 3, ... onto one path until killed, each a tensor full of its version.
_WRITER = """
import sys, torch
from lora_module.training.checkpoint_io import AtomicCheckpointIO
io, path, n = AtomicCheckpointIO(), sys.argv[1], int(sys.argv[2])
for v in range(1, 1000):
    io.save_checkpoint({"version": v, "w": torch.full((n,), float(v))}, path)
"""


@pytest.fixture
def other_fs(tmp_path) -> Iterator[Path]:
    """A tmpfs mounted under tmp_path: another filesystem than the one $TMPDIR is on."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the cross-filesystem case (needs root): {done.stderr.strip()}")
    try:
        assert os.stat(mnt).st_dev != os.stat(tmp_path).st_dev
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _partial_file(folder: Path, full: int) -> Path | None:
    """A file in `folder` that is being written (between empty and the full size), if any."""
    for entry in os.scandir(folder):
        try:
            size = entry.stat().st_size
        except FileNotFoundError:  # renamed away between listing and stat
            continue
        if 0 < size < full:
            return Path(entry.path)
    return None


def test_sigkill_during_a_cross_filesystem_write_keeps_the_previous_checkpoint(other_fs, tmp_path):
    last = other_fs / "checkpoints" / "last.ckpt"
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(last), str(N_FLOATS)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not last.exists():  # version 1 complete
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.01)
        full = last.stat().st_size
        while (partial := _partial_file(last.parent, full)) is None:  # catch a later version mid-write
            assert proc.poll() is None and time.monotonic() < deadline, "never saw a write in progress"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert partial != last, "the kill caught last.ckpt itself half written"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["version"] >= 1 and torch.equal(ckpt["w"], torch.full((N_FLOATS,), float(ckpt["version"])))
    assert not list(tmp_path.glob("tmp*")), "nothing may be staged in $TMPDIR"
    AtomicCheckpointIO().save_checkpoint({"version": 0}, last)  # clears the killed save's temp file
    assert stale_temporaries(last) == [] and torch.load(last, weights_only=True) == {"version": 0}


def test_the_cli_trainer_writes_checkpoints_beside_their_destination(other_fs, tmp_path, tiny_t5_dir,
                                                                     seq2seq_tokenizer_dir, monkeypatch):
    from lightning.fabric.utilities import cloud_io

    def via_tmpdir(*a, **k):
        raise AssertionError("Lightning's $TMPDIR transaction was used")

    monkeypatch.setattr(cloud_io, "_atomic_save", via_tmpdir)
    monkeypatch.setattr("lightning.fabric.plugins.io.torch_io._atomic_save", via_tmpdir)
    prepared = prepare_tiny(seq2seq_tokenizer_dir, "seq2seq", tmp_path / "prepared")
    out = other_fs / "run"
    cli = LoraCLI(args=["fit", "--config", str(DEMO_CONFIG), "--model.model_name_or_path", str(tiny_t5_dir),
                        "--data.prepared_dir", str(prepared), "--model.output_dir", str(out),
                        "--model.checkpoint_every_n_steps", "1", "--trainer.max_steps", "2",
                        "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                        "--trainer.enable_progress_bar", "false", "--data.batch_size", "4"])
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    last = out / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2
    assert stale_temporaries(last) == [] and (out / "adapter").is_dir()
