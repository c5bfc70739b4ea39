"""Lightning's FSDPStrategy on CPU processes (gloo), for tests: `--trainer.strategy '{"class_path":
"fsdp_cpu.CpuFSDPStrategy"}'` with `tests/` on PYTHONPATH (the training CLI imports it by name).

Lightning refuses `strategy="fsdp"` without a GPU (its check is `type(strategy) is FSDPStrategy`, so a
subclass passes), and two of its calls do not work on a CPU, which these classes replace:
- FSDP needs `device_id=torch.device("cpu")` on a CPU (Lightning passes the device index, None there);
- Lightning gathers and scatters full checkpoints with `offload_to_cpu=True`, which on a CPU works on
  storage FSDP then frees or drops (saving: a segmentation fault; loading: the restored weights stop
  training): on a CPU there is nothing to offload, so these classes turn it off.
Everything else (sharding, `use_orig_params`, the state-dict hooks, training, the export) is Lightning's
and torch's own code, as on a GPU.

`CpuFSDPBlocks` also wraps every T5 block in its own FSDP unit (`auto_wrap_policy`), which puts
`_fsdp_wrapped_module` into the module paths, as real multi-GPU configurations do. `FailAtStep` (a
callback) ends a fit with an error on every rank once a step is reached: an interrupted run to resume.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import torch
from lightning.fabric.strategies import model_parallel
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies import fsdp as lightning_fsdp
from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.api import FullOptimStateDictConfig


def _full_state_without_offload(module: torch.nn.Module, world_size: int, rank0_only: bool = True) -> Any:
    """Lightning's `_get_full_state_dict_context` with `offload_to_cpu=False`."""
    return FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                                FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))


@contextmanager
def _no_offload() -> Iterator[None]:
    with (mock.patch.object(lightning_fsdp, "_get_full_state_dict_context", _full_state_without_offload),
          mock.patch.object(model_parallel, "_get_full_state_dict_context", _full_state_without_offload)):
        yield


class CpuFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy with the two CPU fixes above."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = FSDP(module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                     sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    def lightning_module_state_dict(self) -> dict[str, Any]:
        with _no_offload():
            return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        with _no_offload():
            return super().optimizer_state(optimizer)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        with _no_offload():
            return super().load_checkpoint(checkpoint_path, weights_only)


class CpuFSDPBlocks(CpuFSDPStrategy):
    """CpuFSDPStrategy with one FSDP unit per T5 block (nested wrapping)."""

    def __init__(self, **kwargs: Any):
        from transformers.models.t5.modeling_t5 import T5Block

        super().__init__(auto_wrap_policy={T5Block}, **kwargs)


class FailAtStep(Callback):
    """Raises on every rank before training step `step` (0-based global step): the fit ends there."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"FailAtStep: stopped before step {self.step}")
