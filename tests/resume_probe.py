"""A callback the resume tests load into a real `lora-pipeline fit` subprocess (through a config file).

It logs a hash of every trained batch with its step, so a test can check that a resumed run
trained exactly the batches the interrupted one had not; with `pause_at` it stops the process in
the middle of the step after that one (forward and backward done, update not applied) and waits
there, so the test can kill it with SIGKILL at a known point.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class BatchLog(Callback):
    """Appends `<global step> <sha256 of input_ids>` per trained batch to `path`; optionally pauses."""

    def __init__(self, path: str, pause_at: int | None = None):
        """
        Args:
            path: File the lines are appended to.
            pause_at: Pause inside the step that follows checkpointed step `pause_at` (None: never),
                after touching `<path>.paused`.
        """
        self.path = Path(path)
        self.pause_at = pause_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        digest = hashlib.sha256(batch["input_ids"].numpy().tobytes()).hexdigest()[:16]
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {digest}\n")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.pause_at is not None and trainer.global_step == self.pause_at:
            Path(f"{self.path}.paused").touch()
            time.sleep(300)  # killed by the test long before
