"""The FineTuneModule settings that the CLI's types alone cannot check, and the learning-rate schedule.

    lora = check_hparams(finetune="lora", lora={"r": 8}, learning_rate=5e-3)   # SettingsError naming the key
    LambdaLR(optimizer, WarmupDecay(warmup=10, total=300, kind="cosine"))

`check_hparams` is the one place these values are checked: FineTuneModule runs it when built and the
training CLI runs it on a parsed config before it builds anything.
"""

from __future__ import annotations

import math

from lora_module.config import LoraConfig
from lora_module.errors import LoraConfigError, SettingsError


class WarmupDecay:
    """LR factor: linear warmup for `warmup` steps, then linear/cosine decay to 0 at `total`, or constant.

    A callable object (not a lambda) so LambdaLR saves it in checkpoints.
    """

    def __init__(self, warmup: int, total: int, kind: str = "linear"):
        self.warmup, self.total, self.kind = warmup, max(total, 1), kind

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress


# The FineTuneModule arguments `check_hparams` checks: what the CLI's types alone cannot.
CHECKED_HPARAMS = ("finetune", "lora", "learning_rate", "warmup_steps", "warmup_ratio",
                   "checkpoint_every_n_steps", "loraplus_lr_ratio")


def check_hparams(*, finetune: str | None = None, lora: LoraConfig | dict | None = None,
                  learning_rate: float | None = None, warmup_steps: int | None = None,
                  warmup_ratio: float | None = None, checkpoint_every_n_steps: int | None = None,
                  loraplus_lr_ratio: float | None = None) -> LoraConfig:
    """The LoRA config (from a dict, or the default) after checking the given values; None: not given.

    The one place these values are checked: FineTuneModule runs it when built, and the training CLI runs
    it on a parsed config before it builds anything. Raises SettingsError or LoraConfigError naming the key.
    """
    if finetune is not None and finetune not in ("lora", "qlora", "full"):
        raise SettingsError(f"model.finetune must be one of 'lora', 'qlora', 'full', got {finetune!r}")
    if learning_rate is not None and not learning_rate > 0:
        raise SettingsError(f"model.learning_rate must be > 0, got {learning_rate}")
    if warmup_steps is not None and warmup_steps < 0:
        raise SettingsError(f"model.warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_ratio is not None and not 0.0 <= warmup_ratio < 1.0:
        raise SettingsError(f"model.warmup_ratio must be in [0, 1), got {warmup_ratio}")
    if checkpoint_every_n_steps is not None and checkpoint_every_n_steps < 1:
        raise SettingsError(
            f"model.checkpoint_every_n_steps must be >= 1 or null, got {checkpoint_every_n_steps}"
        )
    _check_loraplus(loraplus_lr_ratio, finetune)
    if lora is None or isinstance(lora, LoraConfig):
        return lora if lora is not None else LoraConfig()
    try:
        return LoraConfig.from_dict(dict(lora))
    except LoraConfigError as e:
        raise LoraConfigError(f"model.lora: {e}") from e


def _check_loraplus(ratio: float | None, finetune: str | None) -> None:
    if ratio is None:
        return
    number = isinstance(ratio, int | float) and not isinstance(ratio, bool)
    if not (number and math.isfinite(ratio) and ratio > 0):
        raise SettingsError(f"model.loraplus_lr_ratio must be a number > 0 (or null: off), got {ratio!r}")
    if finetune == "full":
        raise SettingsError("model.loraplus_lr_ratio applies to LoRA's A/B matrices and finetune 'full' has"
                            " none: remove it, or set model.finetune to 'lora' or 'qlora'")
