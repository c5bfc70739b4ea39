"""The Lightning CLI of the training stage: `python -m lora_module fit|validate|test|predict --config X.yaml`.

    python -m lora_module fit --config deploy/configs/demo_summary_lora.yaml \\
        --data.prepared_dir .lora_pipeline/data/demo_summary-0123abcd4567 --model.output_dir runs/s1
    python -m lora_module fit --config deploy/configs/demo_summary_lora.yaml --print_config
    python -m lora_module fit ... --ckpt_path runs/s1/checkpoints/last.ckpt     # resume
    python -m lora_module validate --config ... --ckpt_path runs/s1/checkpoints/last.ckpt
    python -m lora_module fit ... --trainer.logger false                        # no MLflow

The configuration is checked completely before anything is built: jsonargparse rejects unknown keys
and wrong types/literals (e.g. `finetune: wrong`), and `check_config` runs the LoRA and data checks
(e.g. `r: 0`), all with a message naming the key. Training is logged to MLflow: the store and
experiment given as `--trainer.logger.init_args.tracking_uri` / `.experiment_name` (the flows pass
their pipeline home's store and the task's experiment `lora-<task>`), by default the store of
`PipelineHome.from_env()` ($MLFLOW_TRACKING_URI, else `<home>/mlflow.db`, artifacts in
`<home>/mlartifacts/<experiment>`) and experiment `lora_pipeline`; never the plain `./mlruns`
store that MLflow 3 refuses.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse import Namespace, lazy_instance
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

from lora_module.config import LoraConfig
from lora_module.training.datamodule import PreparedDataModule
from lora_module.errors import LoraConfigError
from lora_module.home import PipelineHome, artifact_location_for, ensure_store_folder
from lora_module.training.module import FineTuneModule

DEFAULT_EXPERIMENT = "lora_pipeline"


class PipelineMLFlowLogger(MLFlowLogger):
    """MLFlowLogger with the pipeline's tracking URI default (never the refused `./mlruns` file store)."""

    def __init__(
        self,
        experiment_name: str = DEFAULT_EXPERIMENT,
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, Any] | None = None,
        artifact_location: str | None = None,
    ):
        """
        Args:
            experiment_name: MLflow experiment (created if missing).
            run_name: Name of the MLflow run (MLflow picks one when None).
            tracking_uri: Tracking server or store; None: the store of `PipelineHome.from_env()`
                ($MLFLOW_TRACKING_URI, else the home's SQLite file).
            tags: Tags for the run.
            artifact_location: Artifact root of a newly created experiment; None: `mlartifacts/<experiment>`
                beside the SQLite file when the store is that file, else the server's default.
        """
        uri = ensure_store_folder(tracking_uri or PipelineHome.from_env().tracking_uri)
        if artifact_location is None:
            artifact_location = artifact_location_for(uri, experiment_name)
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=uri,
            tags=tags,
            artifact_location=artifact_location,
        )


class OutputDirConfig(SaveConfigCallback):
    """Writes the resolved config of a `fit` run to `<model.output_dir>/config.yaml` (rank 0 only)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        out = Path(pl_module.hparams.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, out / "config.yaml", skip_none=False, overwrite=True, multifile=False)


def check_config(config: Namespace) -> None:
    """Checks jsonargparse cannot do from types alone; raises ValueError naming the key."""
    model = config.get("model") or Namespace()
    lora = model.get("lora")
    if lora is not None:
        try:
            LoraConfig(**(lora.as_dict() if isinstance(lora, Namespace) else dict(lora)))
        except LoraConfigError as e:
            raise ValueError(f"model.lora: {e}") from e
        except TypeError as e:  # an unknown key given programmatically
            raise ValueError(f"model.lora: {e}; valid keys: {LoraConfig.field_names()}") from e
    data = config.get("data") or Namespace()
    for key in ("batch_size", "eval_batch_size"):
        value = data.get(key)
        if value is not None and value < 1:
            raise ValueError(f"data.{key} must be >= 1, got {value}")
    lr = model.get("learning_rate")
    if lr is not None and not lr > 0:
        raise ValueError(f"model.learning_rate must be > 0, got {lr}")


class LoraCLI(LightningCLI):
    """LightningCLI over FineTuneModule + PreparedDataModule with the pipeline's defaults."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs: Any):
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_callback", OutputDirConfig)
        kwargs.setdefault("save_config_kwargs", {"save_to_log_dir": False})
        super().__init__(
            FineTuneModule,
            PreparedDataModule,
            args=list(args) if args is not None else None,
            run=run,
            auto_configure_optimizers=False,
            **kwargs,
        )

    def _parse_ckpt_path(self) -> None:
        """Keep the given config as the source of truth when `--ckpt_path` is passed.

        Lightning would overwrite the model section with the checkpoint's hyperparameters, silently
        dropping command-line overrides such as `--model.output_dir` for `predict`. The checkpoint
        supplies weights and training state only; `FineTuneModule.on_load_checkpoint` rejects one
        whose finetune mode, LoRA layout or base model differ from the config.
        """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"trainer.logger": lazy_instance(PipelineMLFlowLogger)})

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        try:
            check_config(config)
        except ValueError as e:
            self.parser.error(f"invalid configuration: {e}")


class ConfigOnlyCLI(LoraCLI):
    """Parses and checks a configuration (args without subcommand); builds neither model nor data."""

    def instantiate_classes(self) -> None:
        """Nothing is built: the parsed, checked config is in `self.config`."""

    def _set_seed(self) -> None:
        """Parsing must not seed the caller's RNGs nor set PL_GLOBAL_SEED in its environment."""


def parse_config(args: Sequence[str]) -> Namespace:
    """The parsed, checked configuration for CLI `args` without subcommand, e.g. ["--config", "x.yaml"]."""
    with warnings.catch_warnings():
        # Lightning warns when a process that has its own sys.argv (pytest, a flow) passes args.
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        return ConfigOnlyCLI(args=args, run=False).config


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of `python -m lora_module`."""
    LoraCLI(args=args)
