"""LightningDataModule over a prepared-data folder (written by `data.prepare`).

    dm = PreparedDataModule(prepared_dir=".lora_pipeline/data/demo_summary-0123abcd4567", batch_size=16)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))  # input_ids, attention_mask, labels, num_tokens

Batches are padded to the longest row of the batch (dynamic padding): `input_ids` with the pad id
of the prepared tokenizer, `attention_mask` with 0 and `labels` with -100 (ignored by the loss).
Training batches are padded on the right for both seq2seq and causal models; only generation
(`predict_dataloader`, causal prompts) pads on the left. A causal prompt is everything before the
row's last labelled span (`prompt_length`), so multi-turn chat rows generate their last reply.

The training sampler is always a seeded `DistributedSampler` subclass, so:
- the order depends only on (seed, epoch), and a run resumed from a checkpoint sees the same
  batches as an uninterrupted one (the loader is *stateful*: mid-epoch resumes skip the batches
  already trained);
- under DDP Lightning keeps it (it only replaces samplers that are not `DistributedSampler`s) and
  each rank reads its own interleaved share, so length grouping survives distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lora_module.contracts import MANIFEST_FILE
from lora_module.errors import InputNotFoundError, SettingsError
from lora_pipeline.data import load_prepared, load_tokenizer

MODEL_COLUMNS = ("input_ids", "attention_mask", "labels")
IGNORE_INDEX = -100


def check_prepared_dir(prepared_dir: str | Path) -> Path:
    """The folder as a Path if data preparation wrote it (it has manifest.json), else InputNotFoundError."""
    path = Path(prepared_dir)
    if not (path / MANIFEST_FILE).is_file():
        raise InputNotFoundError(
            f"data.prepared_dir={str(prepared_dir)!r} is not a prepared-data folder (no {MANIFEST_FILE});"
            " run `lora-pipeline prepare` first and pass the folder it prints"
        )
    return path


# The PreparedDataModule arguments `check_loader_settings` checks.
CHECKED_LOADER_SETTINGS = ("batch_size", "eval_batch_size", "num_workers")


def check_loader_settings(*, batch_size: int | None = None, eval_batch_size: int | None = None,
                          num_workers: int | None = None) -> None:
    """The one check of the data loader settings (None: not given): PreparedDataModule runs it when built,
    and the training CLI on a parsed config before it builds anything. Raises SettingsError naming the key."""
    for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if value is not None and value < 1:
            raise SettingsError(f"data.{name} must be >= 1, got {value}")
    if num_workers is not None and num_workers < 0:
        raise SettingsError(f"data.num_workers must be >= 0, got {num_workers}")


def prompt_length(labels: Sequence[int]) -> int:
    """Tokens of a causal row's prompt: everything before its last labelled span (the reply to generate).
    A plain-template row is prompt + target; a chat row may also label earlier assistant turns, which
    then belong to the prompt."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start if end else len(labels)


class PaddingCollator:
    """Pads a list of tokenized rows into tensors; adds `num_tokens` (non-pad tokens, for tokens/s)."""

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def _pad(self, rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        out = torch.full((len(rows), width), value, dtype=torch.long)  # [B, T]
        for i, r in enumerate(rows):
            if not len(r):
                continue
            if self.padding_side == "right":
                out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
            else:
                out[i, width - len(r) :] = torch.as_tensor(r, dtype=torch.long)
        return out

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "input_ids": self._pad([f["input_ids"] for f in features], self.pad_token_id),
            "attention_mask": self._pad([f["attention_mask"] for f in features], 0),
        }
        num_tokens = int(batch["attention_mask"].sum())
        if "labels" in features[0]:
            batch["labels"] = self._pad([f["labels"] for f in features], IGNORE_INDEX)
            # Seq2seq decoders also process the target tokens; causal labels overlap input_ids.
            if len(features[0]["labels"]) != len(features[0]["input_ids"]):
                num_tokens += int((batch["labels"] != IGNORE_INDEX).sum())
        # A plain int: Lightning moves tensors to the device and leaves ints alone.
        batch["num_tokens"] = num_tokens
        return batch


class EpochSampler(DistributedSampler):
    """Seeded shuffling per epoch, optionally grouped by length, split across ranks, resumable.

    With `group_by_length`, the shuffled indices are cut into mega-batches of
    `batch_size * num_replicas * mega_batch_mult` rows and each is sorted by length (longest
    first), so a batch holds rows of similar length (less padding) while the order of
    mega-batches stays random. Rank r takes positions r, r + R, r + 2R, ... of that list, so
    consecutive rows of one rank still have similar lengths.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        group_by_length: bool = False,
        mega_batch_mult: int = 50,
    ):
        super().__init__(
            range(len(lengths)),
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=False,
        )
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.group_by_length = group_by_length
        self.mega_batch_mult = mega_batch_mult
        self.skip = 0  # rows of this rank to skip once (mid-epoch resume)

    def global_order(self) -> list[int]:
        """The order of all rows for the current epoch, before splitting across ranks."""
        n = len(self.lengths)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if self.group_by_length:
            mega = self.batch_size * self.num_replicas * self.mega_batch_mult
            chunks = [order[i : i + mega] for i in range(0, n, mega)]
            order = [i for c in chunks for i in sorted(c, key=lambda j: -self.lengths[j])]
        # Pad by wrapping around so every rank gets the same number of rows (DistributedSampler rule).
        while len(order) < self.total_size:
            order += order[: self.total_size - len(order)]
        return order

    def __iter__(self) -> Iterator[int]:
        mine = self.global_order()[self.rank : self.total_size : self.num_replicas]
        skip, self.skip = self.skip, 0
        return iter(mine[skip:])


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position Lightning saves in checkpoints (`state_dict`/`load_state_dict`).

    `progress` returns (epoch, batches of this epoch already trained); it is read from the trainer
    when a checkpoint is written, because the loader itself runs ahead (prefetching).
    """

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, int]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._progress = progress

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self._progress()
        return {"epoch": epoch, "batches_done": batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        assert isinstance(sampler, EpochSampler)
        done = state["batches_done"]
        if done >= len(self):  # an epoch-end checkpoint: the next epoch starts from its beginning
            sampler.set_epoch(state["epoch"] + 1)
            sampler.skip = 0
        else:
            sampler.set_epoch(state["epoch"])
            sampler.skip = done * self.batch_size


class PreparedDataModule(L.LightningDataModule):
    """Train/validation/test loaders over `data.prepare`'s output folder, with dynamic padding."""

    def __init__(
        self,
        prepared_dir: str,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        group_by_length: bool = False,
        pad_to_multiple_of: int | None = None,
        seed: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
    ):
        """
        Args:
            prepared_dir: Folder written by `data.prepare` (holds dataset/, tokenizer/, manifest.json).
            batch_size: Rows per training batch (per device).
            eval_batch_size: Rows per validation/test/predict batch; defaults to `batch_size`.
            num_workers: DataLoader worker processes (0 = load in the main process).
            group_by_length: Batch rows of similar length together (less padding, faster steps).
            pad_to_multiple_of: Round padded lengths up to a multiple of this (8 helps tensor cores).
            seed: Seed of the per-epoch shuffle (the order depends only on seed and epoch).
            max_train_samples: Use only the first N training rows (smoke runs).
            max_eval_samples: Use only the first N validation/test rows.
        """
        super().__init__()
        check_loader_settings(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers)
        self.save_hyperparameters()
        self.prepared_dir = check_prepared_dir(prepared_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.group_by_length = group_by_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.seed = seed
        self.max_train_samples = max_train_samples
        self.max_eval_samples = max_eval_samples
        self.dataset = None
        self.manifest: dict = {}
        self.tokenizer = None

    @property
    def model_type(self) -> str:
        """The model type the data was prepared for, from the manifest: "seq2seq" or "causal"."""
        return self.manifest["model_type"]

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        dataset, self.manifest = load_prepared(self.prepared_dir)
        self.tokenizer = load_tokenizer(self.prepared_dir)
        if self.tokenizer.pad_token_id is None:
            raise InputNotFoundError(
                f"the tokenizer in {self.prepared_dir}/tokenizer has no pad token; prepare the data again "
                "with a tokenizer that has a pad or an eos token"
            )
        limits = {"train": self.max_train_samples}
        for split in dataset:
            n = limits.get(split, self.max_eval_samples)
            if n is not None and n < len(dataset[split]):
                dataset[split] = dataset[split].select(range(n))
        self.dataset = dataset

    def _split(self, name: str):
        if self.dataset is None:
            self.setup()
        if name not in self.dataset or len(self.dataset[name]) == 0:
            raise InputNotFoundError(
                f"prepared data {self.prepared_dir} has no rows in split {name!r}; splits: "
                + ", ".join(f"{k}={len(v)}" for k, v in self.dataset.items())
            )
        return self.dataset[name]

    def _collator(self, padding_side: str = "right") -> PaddingCollator:
        return PaddingCollator(self.tokenizer.pad_token_id, padding_side, self.pad_to_multiple_of)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _progress(self) -> tuple[int, int]:
        trainer = self.trainer
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> DataLoader:
        ds = self._split("train").select_columns(list(MODEL_COLUMNS))
        world, rank = self._world()
        sampler = EpochSampler(
            [len(x) for x in ds["input_ids"]],
            self.batch_size,
            num_replicas=world,
            rank=rank,
            seed=self.seed,
            group_by_length=self.group_by_length,
        )
        return ResumableDataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self._collator(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            progress=self._progress,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        ds = self._split(split).select_columns(list(MODEL_COLUMNS))
        return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self._collator(),
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Test prompts only (no targets), left-padded for causal generation; keeps prompt and references."""
        ds = self._split("test")
        causal = self.model_type == "causal"
        collate = self._collator("left" if causal else "right")

        def to_prompt(row: dict) -> dict:
            ids, mask = row["input_ids"], row["attention_mask"]
            if causal:
                n = prompt_length(row["labels"])
                ids, mask = ids[:n], mask[:n]
            return {
                "input_ids": ids,
                "attention_mask": mask,
                "prompt": row["prompt"],
                "references": row["references"],
            }

        def collate_prompts(rows: list[dict]) -> dict:
            batch = collate(
                [{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"]} for r in rows]
            )
            batch["prompt"] = [r["prompt"] for r in rows]
            batch["references"] = [r["references"] for r in rows]
            return batch

        rows = [to_prompt(r) for r in ds]
        return DataLoader(rows, batch_size=self.eval_batch_size, shuffle=False, collate_fn=collate_prompts)
