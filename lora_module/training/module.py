"""FineTuneModule: one LightningModule that trains LoRA, QLoRA (LoRA over an NF4 base) or the whole model.

    lora-pipeline fit --config deploy/configs/demo_summary_lora.yaml      # through the CLI
    module = FineTuneModule("path/to/t5", finetune="lora", lora=LoraConfig(r=8), output_dir="runs/x")
    L.Trainer(max_steps=100).fit(module, datamodule=PreparedDataModule("prepared/dir"))

What a fit leaves in `output_dir` (written by global rank 0 only):
  adapter/        PEFT-format adapter (lora, qlora)   or   model/  save_pretrained model + tokenizer (full)
  metrics.json    finetune, trainable/total params, train/val loss, steps, tokens/s, adapter bytes, ...
  config.yaml     the resolved configuration (from the CLI; the hyperparameters otherwise)
  checkpoints/    last.ckpt (lora/qlora: trainable tensors + optimizer state only), best.ckpt (early stopping)
The first three are links into exports/<id>/ and appear together or not at all (training.outputs).
Under FSDP (`--trainer.strategy fsdp`) they are the same: rank 0 gathers the sharded adapter before the
export (training.fsdp), and checkpoints keep only its tensors (on_save_checkpoint).

A run resumed from a mid-epoch checkpoint ends with the adapter of the uninterrupted run: the
loader skips the trained batches (its position is restored) and dropout is seeded per step.

A non-finite training loss raises `NonFiniteLossError` before the optimizer applies that update,
so the checkpoints on disk are all from good steps.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_info

from lora_module import LoraConfig, get_lora_model, load_base_model
from lora_module.config import torch_dtype
from lora_module.device import enable_cuda_fast_paths
from lora_module.errors import PipelineError, SettingsError
from lora_module.evaluation.generation import DEFAULT_MAX_NEW_TOKENS
from lora_module.prompt import PromptSettings
from lora_module.training import fsdp
from lora_module.training.early_stopping import (
    EarlyStoppingConfig,
    check_early_stopping,
    early_stopping_callbacks,
    restore_best,
)
from lora_module.training.export import export_outputs
from lora_module.training.hparams import CHECKED_HPARAMS, WarmupDecay, check_hparams
from lora_module.training.optim import build_optimizer, param_groups
from lora_module.training.resume import (
    CheckpointMismatchError,
    check_lora_layout,
    check_saved_settings,
    step_seed,
    total_optimizer_steps,
)
from lora_module.training.run_lineage import tag_training_run

MODEL_INPUTS = ("input_ids", "attention_mask", "labels")


class NonFiniteLossError(PipelineError, RuntimeError):
    """The training loss became NaN or infinite; training stopped before applying that update."""


class FineTuneModule(L.LightningModule):
    """Loss, optimizer, schedule, logging, adapter-only checkpoints and the final export."""

    def __init__(
        self,
        model_name_or_path: str,
        finetune: Literal["lora", "qlora", "full"] = "lora",
        lora: LoraConfig | None = None,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        adam_epsilon: float = 1e-8,
        warmup_steps: int = 0,
        warmup_ratio: float = 0.0,
        scheduler: Literal["linear", "cosine", "constant"] = "linear",
        gradient_checkpointing: bool = False,
        torch_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        double_quant: bool = True,
        trust_remote_code: bool = False,
        checkpoint_every_n_steps: int | None = None,
        max_new_tokens: int | None = None,
        loraplus_lr_ratio: float | None = None,
        optimizer: Literal["adamw", "paged_adamw_8bit"] = "adamw",
        early_stopping: EarlyStoppingConfig | None = None,
        output_dir: str = ".lora_pipeline/runs/default",
    ):
        """
        Args:
            model_name_or_path: Base model: a Hub name or a local `save_pretrained` folder.
            finetune: "lora" (frozen base + adapters), "qlora" (adapters over an NF4 base) or "full".
            lora: Adapter settings: r, lora_alpha, lora_dropout, target_modules, use_rslora (not for "full").
            learning_rate: Peak AdamW learning rate.
            weight_decay: AdamW weight decay on matrices (biases and norms get none).
            adam_epsilon: AdamW epsilon.
            warmup_steps: Linear warmup steps; when 0, `warmup_ratio` of the total steps is used.
            warmup_ratio: Fraction of the optimizer steps spent warming up (used when warmup_steps is 0).
            scheduler: Decay after warmup: "linear" or "cosine" to 0, or "constant".
            gradient_checkpointing: Recompute activations in the backward pass (less memory, ~30% slower).
            torch_dtype: Dtype to load the base weights in; None keeps the checkpoint's (fp32 for T5).
            double_quant: QLoRA: also quantize the NF4 scales (saves ~0.4 bit per weight).
            trust_remote_code: Allow model code from the Hub repository (only for models you trust).
            checkpoint_every_n_steps: Write checkpoints/last.ckpt every N optimizer steps (None: at each
                validation and epoch end).
            max_new_tokens: Generation length for the `predict` subcommand (None: the prepared data's
                max_target_length).
            loraplus_lr_ratio: LoRA+ (Hayou et al. 2024): the B matrices learn at learning_rate * this
                ratio, the A matrices at learning_rate (PEFT's groups; 16 is the paper's usual value).
                None: off. lora and qlora only.
            optimizer: "adamw" or "paged_adamw_8bit" (bitsandbytes' paged 8-bit AdamW; CUDA only).
            early_stopping: Stop on val/loss, export the best checkpoint (training.early_stopping); null: off.
            output_dir: This run's outputs: adapter/ or model/, metrics.json, config.yaml, checkpoints/.
        """
        super().__init__()
        lora = check_hparams(**{k: v for k, v in locals().items() if k in CHECKED_HPARAMS})  # these args
        self.early_stopping = es = check_early_stopping(early_stopping)
        self.save_hyperparameters(ignore=["lora", "early_stopping"])
        self.hparams.update(lora=lora.to_dict(), early_stopping=None if es is None else asdict(es))
        self.finetune, self.lora_config = finetune, lora
        # The trainable state is small for LoRA: checkpoints hold only it, so loading them is not strict.
        self.strict_loading = finetune == "full"
        self.model = self._build_model()
        self._check_trainable()
        self._reset_counters()

    def _build_model(self) -> torch.nn.Module:
        """The base (NF4 for qlora) with LoRA injected, or the whole model trainable; in train mode."""
        hp = self.hparams
        base = load_base_model(
            hp.model_name_or_path,
            quantize="nf4" if self.finetune == "qlora" else None,
            double_quant=hp.double_quant,
            torch_dtype=torch_dtype(hp.torch_dtype),
            trust_remote_code=hp.trust_remote_code,
        )
        self.is_encoder_decoder = bool(base.config.is_encoder_decoder)
        if hp.gradient_checkpointing:
            # Non-reentrant checkpointing back-propagates into LoRA layers even though the
            # (frozen) embeddings' outputs do not require grad.
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.config.use_cache = False
        if self.finetune == "full":
            for p in base.parameters():
                p.requires_grad_(True)
            model = base
        else:
            model = get_lora_model(base, self.lora_config)
        # from_pretrained returns eval mode; Lightning keeps submodule modes, so switch explicitly.
        model.train()
        return model

    def _reset_counters(self) -> None:
        """Per-run state: fingerprint cache, loss sums, throughput, predictions, resume bookkeeping."""
        self._base_fingerprint: str | None = None
        self._param_counts: tuple[int, int] | None = None
        self._nonfinite = torch.zeros((), dtype=torch.bool)
        self._epoch_loss_sum = torch.zeros(())
        self._epoch_loss_n = 0
        self._tokens_total = 0
        self._train_seconds = 0.0
        self._last_tick: float | None = None
        self._predictions: list[dict] = []
        # Dropout seed of every step derives from this (see _step_rng); restored from checkpoints.
        self._rng_base_seed: int | None = None
        self._resumed_epoch: int | None = None  # epoch a checkpoint interrupted (keeps its loss sums)
        self.resolved_config: str | None = None  # the CLI's resolved config (YAML), exported as config.yaml

    # ---- parameters -------------------------------------------------------------------------

    def _check_trainable(self) -> None:
        trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if not trainable:
            raise RuntimeError(f"finetune={self.finetune!r}: the model has no trainable parameters")
        if self.finetune != "full":
            # modules_to_save copies train in full beside the adapter, as in PEFT.
            stray = [n for n in trainable if "lora_" not in n and ".modules_to_save." not in n]
            if stray:
                raise RuntimeError(
                    f"finetune={self.finetune!r} must train only LoRA tensors, but {len(stray)} base"
                    f" parameters require grad, e.g. {stray[:3]}"
                )

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; for QLoRA the total counts unpacked 4-bit weights.

        Cached from the first call (`setup` makes it before FSDP shards the tensors)."""
        if self._param_counts is None:
            if self.finetune != "full":
                self._param_counts = self.model.trainable_parameters()
            else:
                n = sum(p.numel() for p in self.model.parameters())
                self._param_counts = n, n
        return self._param_counts

    def base_fingerprint(self) -> str | None:
        """Fingerprint of the frozen base (lora/qlora), computed once: it cannot change while training."""
        if self.finetune == "full":
            return None
        if self._base_fingerprint is None:
            self._base_fingerprint = self.model.base_fingerprint()
        return self._base_fingerprint

    # ---- steps --------------------------------------------------------------------------------

    def forward(self, **batch: Any) -> Any:
        return self.model(**{k: batch[k] for k in MODEL_INPUTS if k in batch})

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        on_gpu = self.device.type != "cpu"
        devices = [self.device.index or 0] if on_gpu else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type if on_gpu else "cuda"):
            # Same dropout masks with or without a resume in between (training.resume).
            if self._rng_base_seed is None:
                self._rng_base_seed = torch.initial_seed()
            step = (self.global_step, self.current_epoch, batch_idx, self.global_rank)
            torch.manual_seed(step_seed(self._rng_base_seed, *step))
            loss = self(**batch).loss
        detached = loss.detach()
        # Checked once per optimizer step (on_before_optimizer_step): no GPU sync per micro-batch.
        self._nonfinite = self._nonfinite.to(detached.device) | ~torch.isfinite(detached)
        self._epoch_loss_sum = self._epoch_loss_sum.to(detached.device) + detached.float()
        self._epoch_loss_n += 1
        self.log(
            "train/loss",
            detached,
            prog_bar=True,
            on_step=True,
            on_epoch=False,
            batch_size=batch["input_ids"].shape[0],
        )
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        bad = self.trainer.strategy.reduce_boolean_decision(bool(self._nonfinite), all=False)
        if bad:
            last = Path(self.hparams.output_dir) / "checkpoints" / "last.ckpt"
            raise NonFiniteLossError(
                f"non-finite training loss at global step {self.global_step} (epoch {self.current_epoch});"
                f" stopped before applying this update. Last good checkpoint: "
                f"{last if last.exists() else 'none written yet'}. Try a lower model.learning_rate,"
                " gradient clipping (trainer.gradient_clip_val) or precision 32-true / bf16-mixed."
            )

    def on_train_epoch_start(self) -> None:
        if self._resumed_epoch != self.current_epoch:  # a mid-epoch resume keeps the restored sums
            self._epoch_loss_sum = torch.zeros((), device=self.device)
            self._epoch_loss_n = 0
        self._resumed_epoch = None
        self._last_tick = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        now = time.perf_counter()
        # Wall time since the previous batch ended: data loading + forward + backward + optimizer.
        dt = now - (self._last_tick or now)
        self._last_tick = now
        tokens = int(batch.get("num_tokens", batch["attention_mask"].numel()))
        self._tokens_total += tokens
        self._train_seconds += dt
        if dt > 0:
            self.log("train/tokens_per_sec", tokens / dt, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)

    def on_validation_end(self) -> None:
        # Validation time is not training throughput: restart the clock after it.
        self._last_tick = time.perf_counter()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self(**batch).loss
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self(**batch).loss
        self.log("test/loss", loss, sync_dist=True, batch_size=batch["input_ids"].shape[0])

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict]:
        tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
        if tokenizer is None:
            raise RuntimeError("predict needs the datamodule's tokenizer (run it through PreparedDataModule)")
        generated = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=self._max_new_tokens(),
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
        )  # [B, T_out]; causal outputs start with the prompt
        if not self.is_encoder_decoder:
            generated = generated[:, batch["input_ids"].shape[1] :]
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        return [
            {"prompt": p, "prediction": t.strip(), "references": r}
            for p, t, r in zip(batch["prompt"], texts, batch["references"], strict=True)
        ]

    def _max_new_tokens(self) -> int:
        """model.max_new_tokens, else the prepared data's max_target_length, else evaluation's default."""
        settings = PromptSettings.from_manifest(getattr(self.trainer.datamodule, "manifest", None) or {})
        value = settings.resolve("max_target_length", self.hparams.max_new_tokens, "model.max_new_tokens")
        return value or DEFAULT_MAX_NEW_TOKENS

    def on_predict_batch_end(
        self, outputs: list[dict], batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._predictions.extend(outputs)

    def on_predict_end(self) -> None:
        out = Path(self.hparams.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        world = self.trainer.world_size
        name = "predictions.jsonl" if world == 1 else f"predictions.rank{self.global_rank}.jsonl"
        with open(out / name, "w") as f:
            for row in self._predictions:
                f.write(json.dumps(row) + "\n")
        rank_zero_info(f"predictions written to {out / name}")

    # ---- optimizer ----------------------------------------------------------------------------

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        groups = param_groups(self, learning_rate=hp.learning_rate, weight_decay=hp.weight_decay,
                              loraplus_lr_ratio=hp.get("loraplus_lr_ratio"))
        optimizer = build_optimizer(hp.get("optimizer", "adamw"), groups, lr=hp.learning_rate,
                                    eps=hp.adam_epsilon, device=self.device)
        enable_cuda_fast_paths(self.device)  # TF32 matmuls for what runs in fp32 on a GPU; no-op on CPU
        total = total_optimizer_steps(self.trainer)  # not estimated_stepping_batches: see resume.py
        if not math.isfinite(total):
            raise SettingsError(
                "set trainer.max_steps or trainer.max_epochs: the LR schedule needs a finite length"
            )
        warmup = hp.warmup_steps or math.ceil(hp.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupDecay(warmup, int(total), hp.scheduler)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        if fsdp.is_fsdp(self) and gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            fsdp.clip_grad_norm(self, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_callbacks(self) -> list:
        # Checkpoints live with the run's outputs; this replaces any ModelCheckpoint given to the Trainer.
        checkpoints = Path(self.hparams.output_dir) / "checkpoints"
        return early_stopping_callbacks(self.early_stopping, checkpoints, self.trainer.callbacks) + [
            ModelCheckpoint(
                dirpath=checkpoints,
                save_last=True,
                save_top_k=0,
                every_n_train_steps=self.hparams.checkpoint_every_n_steps,
            )
        ]

    # ---- checkpoints --------------------------------------------------------------------------

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Full finetuning: everything. LoRA/QLoRA: only the trainable (adapter) tensors."""
        state = super().state_dict(*args, **kwargs)
        if self.finetune == "full" or fsdp.is_fsdp(self):
            return state  # FSDP's gathering hook needs every key: on_save_checkpoint drops the frozen ones
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        keep = {prefix + n for n, p in self.named_parameters() if p.requires_grad}
        for key in [k for k in state if k not in keep]:
            del state[key]
        return state

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.finetune != "full":
            keep = {fsdp.unwrapped_name(n) for n, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["lora_pipeline"] = {
            "finetune": self.finetune,
            "loraplus_lr_ratio": self.hparams.loraplus_lr_ratio,
            "optimizer": self.hparams.optimizer,
            "base_fingerprint": self.base_fingerprint(),
            "lora_r": None if self.finetune == "full" else self.lora_config.r,
            # What a resume needs to continue exactly: dropout seeds and the metrics' running sums.
            "rng_base_seed": self._rng_base_seed,
            "epoch": self.current_epoch,
            "epoch_loss_sum": float(self._epoch_loss_sum),
            "epoch_loss_n": self._epoch_loss_n,
            "tokens_total": self._tokens_total,
            "train_seconds": self._train_seconds,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("lora_pipeline", {})
        hp = self.hparams  # settings the optimizer's saved state depends on
        check_saved_settings(saved, {"finetune": self.finetune, "loraplus_lr_ratio": hp.loraplus_lr_ratio,
                                     "optimizer": hp.optimizer})
        if self.finetune != "full":
            if "state_dict" in checkpoint:  # FSDP has loaded (and shape-checked) the weights itself
                own = {n: p.shape for n, p in self.named_parameters() if p.requires_grad}
                check_lora_layout(own, checkpoint["state_dict"], saved.get("lora_r"), self.lora_config.r)
            want = saved.get("base_fingerprint")
            if want and want != self.base_fingerprint():
                raise CheckpointMismatchError(
                    f"checkpoint was trained on another base model (fingerprint {want[:12]}, this base"
                    f" {self.base_fingerprint()[:12]}); check model.model_name_or_path"
                )
        self._rng_base_seed = saved.get("rng_base_seed", self._rng_base_seed)
        self._resumed_epoch = saved.get("epoch")
        self._epoch_loss_sum = torch.tensor(saved.get("epoch_loss_sum", 0.0))
        self._epoch_loss_n = saved.get("epoch_loss_n", 0)
        self._tokens_total = saved.get("tokens_total", 0)
        self._train_seconds = saved.get("train_seconds", 0.0)

    # ---- end of fit -----------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if fsdp.is_fsdp(self):
            fsdp.prepare_for_sharding(self)
        tokenizer = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
        embeddings = self.model.get_input_embeddings().num_embeddings
        if tokenizer is not None and len(tokenizer) > embeddings:
            # Token ids past the embedding table would fail deep inside the model (or on a GPU, assert).
            raise SettingsError(
                f"the prepared data's tokenizer has {len(tokenizer)} tokens but"
                f" {self.hparams.model_name_or_path} has {embeddings} embeddings:"
                " prepare the data with this model's tokenizer"
            )

    def on_fit_start(self) -> None:
        trainable, total = self.parameter_counts()
        rank_zero_info(
            f"finetune={self.finetune}: trainable params {trainable:,} / {total:,}"
            f" ({100 * trainable / total:.3f}%)"
        )
        for logger in self.loggers:
            logger.log_hyperparams({"trainable_params": trainable, "total_params": total})
        manifest = getattr(getattr(self.trainer, "datamodule", None), "manifest", None) or {}
        r = None if self.finetune == "full" else self.lora_config.r
        for logger in self.loggers:
            if isinstance(logger, MLFlowLogger) and self.trainer.is_global_zero:
                tag_training_run(logger, self.finetune, r, manifest, self.base_fingerprint())

    def on_train_end(self) -> None:
        best = restore_best(self)  # with early stopping: the best checkpoint's weights, on every rank
        # Collectives first (every rank takes part), then rank 0 alone writes the outputs.
        strategy = self.trainer.strategy
        loss_sum = strategy.reduce(self._epoch_loss_sum.detach().float().clone(), reduce_op="sum")
        n = strategy.reduce(torch.tensor(float(self._epoch_loss_n), device=self.device), reduce_op="sum")
        tokens = strategy.reduce(torch.tensor(float(self._tokens_total), device=self.device), reduce_op="sum")
        seconds = strategy.reduce(torch.tensor(self._train_seconds, device=self.device), reduce_op="max")
        train_loss = float(loss_sum / n) if float(n) > 0 else None
        tokens_per_sec = float(tokens / seconds) if float(seconds) > 0 else None
        with fsdp.gathered_parameters(self):  # FSDP: every rank takes part in the gathering
            if self.trainer.is_global_zero:
                export_outputs(self, train_loss, tokens_per_sec, float(seconds), int(tokens),
                               early_stopping=best)
        strategy.barrier("lora_pipeline_export")
