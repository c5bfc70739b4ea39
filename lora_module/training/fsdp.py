"""What FineTuneModule does differently under FSDP (`--trainer.strategy fsdp`, CUDA GPUs).

FSDP shards every tensor over the ranks (Lightning's default `use_orig_params=True` keeps the LoRA and
the frozen tensors in the same flat parameters). Outside a forward pass each rank then sees only its
shard, so what reads whole tensors must take care:

    if is_fsdp(module): prepare_for_sharding(module)     # in setup(): counts, fingerprint, refusals
    with gathered_parameters(module):                     # every rank: full tensors on rank 0 inside
        if module.trainer.is_global_zero: export(...)
    clip_grad_norm(module, 1.0)                           # the norm over every rank's shard

Checkpoints go through FSDP's full state dict, whose keys are the model's own names (the unwrapped
ones: `unwrapped_name`); FineTuneModule keeps only the adapter's in `on_save_checkpoint`.
tests/test_fsdp.py checks that an FSDP fit (interrupted and resumed) exports the DDP run's adapter.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch.strategies import FSDPStrategy

from lora_module.errors import SettingsError

# Name parts that torch's FSDP and activation-checkpoint wrappers insert between a module and its children.
WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def is_fsdp(module: Any) -> bool:
    """Whether `module` (a LightningModule attached to a Trainer) trains under an FSDP strategy."""
    trainer = getattr(module, "_trainer", None)
    return trainer is not None and isinstance(trainer.strategy, FSDPStrategy)


def unwrapped_name(name: str) -> str:
    """`name` without the parts FSDP / activation-checkpoint wrappers add: the model's own name."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_PARTS)


def prepare_for_sharding(module: Any) -> None:
    """Before the strategy shards the tensors (afterwards each rank sees only its shard): refuse what
    does not work under FSDP yet; cache the parameter counts and the base fingerprint."""
    if module.finetune == "qlora":  # FSDP flattens each unit's tensors into one: a single dtype
        raise SettingsError("model.finetune 'qlora' does not work with trainer.strategy fsdp (FSDP cannot"
                            " shard 4-bit weights together with float ones): use ddp, or finetune 'lora'")
    if module.early_stopping is not None:
        raise SettingsError("model.early_stopping does not work with trainer.strategy fsdp yet (its best"
                            " checkpoint is restored unsharded): set it to null, or use ddp")
    module.parameter_counts()
    module.base_fingerprint()


def clip_grad_norm(module: Any, max_norm: float) -> None:
    """Clip the gradients' global norm: Lightning refuses norm clipping under FSDP, and FSDP's own
    computes the norm over every rank's shard (as DDP's would over the whole, averaged, gradients)."""
    module.trainer.strategy.model.clip_grad_norm_(max_norm)


@contextmanager
def gathered_parameters(module: Any) -> Iterator[None]:
    """Inside: the full (unsharded) parameters of an FSDP-trained module on global rank 0 (on the CPU
    when training on a GPU; writes are not synced back). Every rank must enter it: it gathers.
    Without FSDP: nothing to do."""
    if not is_fsdp(module):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = module.trainer.strategy.model
    # On a CPU there is nothing to offload (and FSDP's offloading frees the storage the gathered views use).
    offload = module.device.type != "cpu"
    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False, rank0_only=True,
                                                     offload_to_cpu=offload):
        yield
