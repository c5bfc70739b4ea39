"""A callback the flow-resume test loads into the flow's training subprocess (through a config file).

`PauseOnce` stops the training process inside the step after checkpointed step `at_step` (forward and
backward done, update not applied) and waits there, touching `marker` first so the test knows when to
kill; when `marker` already exists it does nothing, so a re-run with the very same inputs trains through.
"""

from __future__ import annotations

import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class PauseOnce(Callback):
    """Pause (once per marker file) at optimizer step `at_step` for the test to kill the process."""

    def __init__(self, marker: str, at_step: int):
        self.marker = Path(marker)
        self.at_step = at_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.at_step and not self.marker.exists():
            self.marker.touch()
            time.sleep(300)  # killed by the test long before
