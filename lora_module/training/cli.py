"""The Lightning CLI of the training stage: `lora-pipeline fit|validate|test|predict-ckpt --config X.yaml`.

    lora-pipeline fit --config deploy/configs/demo_summary_lora.yaml \\
        --data.prepared_dir .lora_pipeline/data/demo_summary-0123abcd4567 --model.output_dir runs/s1
    lora-pipeline fit --help                                                  # every option, its default
    lora-pipeline fit --config deploy/configs/demo_summary_lora.yaml --print_config
    lora-pipeline fit ... --ckpt_path runs/s1/checkpoints/last.ckpt          # resume
    lora-pipeline validate --config ... --ckpt_path runs/s1/checkpoints/last.ckpt
    lora-pipeline predict-ckpt --config ... --ckpt_path ...   # Lightning `predict`: predictions.jsonl
    lora-pipeline fit ... --trainer.logger.init_args.task summary   # MLflow experiment lora-summary
    lora-pipeline fit ... --trainer.logger false                             # no MLflow

`run_fit` (lora_module.training.launcher) starts the same CLI as `python -m lora_module.training fit`.

The configuration is checked completely before anything is built: jsonargparse rejects unknown keys
and wrong types/literals (e.g. `finetune: wrong`), and `check_config` runs the LoRA and data checks
(e.g. `r: 0`), all with a message naming the key. Training is logged to MLflow: the store and
experiment given as `--trainer.logger.init_args.tracking_uri` / `.experiment_name` (the flows pass
their pipeline home's store and the task's experiment `lora-<task>`), by default the store of
`PipelineHome.from_env()` ($MLFLOW_TRACKING_URI, else `<home>/mlflow.db`, artifacts in
`<home>/mlartifacts/<experiment>`) and experiment `lora_pipeline`, or `lora-<task>` with
`--trainer.logger.init_args.task <task>`; never the plain `./mlruns` store that MLflow 3 refuses.
Each run is named `<task>-<method>-r<rank>-<UTC time>-<run id[:6]>` and tagged with its task, data and base
fingerprints and git commit (lora_module.training.run_lineage).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import ArgumentError, Namespace, lazy_instance
from jsonargparse._common import debug_mode_active
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

from lora_module.errors import BAD_INPUT_STATUS, PipelineError, check_output_dir, one_line, run_cli
from lora_module.home import PipelineHome, artifact_location_for, ensure_store_folder, experiment_name_for
from lora_module.qlora import check_model_source
from lora_module.training.datamodule import (
    CHECKED_LOADER_SETTINGS,
    PreparedDataModule,
    check_loader_settings,
    check_prepared_dir,
)
from lora_module.training.early_stopping import check_early_stopping
from lora_module.training.module import CHECKED_HPARAMS, FineTuneModule, check_hparams
from lora_module.training.resume import CheckpointMismatchError

DEFAULT_EXPERIMENT = "lora_pipeline"
INVALID = "invalid configuration: "  # the start of the errors of check_config and check_inputs


class PipelineMLFlowLogger(MLFlowLogger):
    """MLFlowLogger with the pipeline's tracking URI default (never the refused `./mlruns` file store)."""

    def __init__(
        self,
        experiment_name: str | None = None,
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, Any] | None = None,
        artifact_location: str | None = None,
        task: str | None = None,
    ):
        """
        Args:
            experiment_name: MLflow experiment (created if missing); None: the task's `lora-<task>`
                when `task` is given, else `lora_pipeline`.
            run_name: Name of the MLflow run; None: `<task>-<method>-r<rank>-<UTC time>-<id>`, set when
                training starts (lora_module.training.run_lineage).
            tracking_uri: Tracking server or store; None: the store of `PipelineHome.from_env()`
                ($MLFLOW_TRACKING_URI, else the home's SQLite file).
            tags: Tags for the run.
            artifact_location: Artifact root of a newly created experiment; None: `mlartifacts/<experiment>`
                beside the SQLite file when the store is that file, else the server's default.
            task: Task name: tags the run `task` and picks the experiment `lora-<task>` when
                `experiment_name` is not given (standalone `fit` then lands beside the flow's runs).
        """
        self.task = task
        experiment_name = experiment_name or (experiment_name_for(task) if task else DEFAULT_EXPERIMENT)
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
    """Hands the resolved config of a `fit` run to the module, which exports it as config.yaml.

    Not written at the start: a run into an existing output folder would otherwise put its new
    config beside the previous run's adapter and metrics until (or, if killed, forever) it ends.
    """

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            pl_module.resolved_config = self.parser.dump(self.config, skip_none=False)


class CheckpointPathError(PipelineError, ValueError):
    """`--ckpt_path` names no checkpoint file."""


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str) -> str | None:
    """`last` -> `<output_dir>/checkpoints/last.ckpt`; raises CheckpointPathError if it is missing."""
    if ckpt_path is None or ckpt_path in ("best", "hpc") or ckpt_path.startswith("registry"):
        return ckpt_path
    if ckpt_path == "last":
        last = Path(output_dir) / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise CheckpointPathError(
                f"--ckpt_path last: nothing to resume, {last} does not exist (model.output_dir={output_dir});"
                " drop --ckpt_path to train from the start"
            )
        return str(last)
    if "://" not in ckpt_path and not Path(ckpt_path).is_file():  # remote URLs: Lightning's fsspec
        raise CheckpointPathError(
            f"--ckpt_path {ckpt_path} does not exist; pass a checkpoint file such as"
            f" {Path(output_dir) / 'checkpoints' / 'last.ckpt'}, or 'last'"
        )
    return ckpt_path


def _given(section: Namespace, keys: tuple[str, ...]) -> dict[str, Any]:
    """The values of `keys` set in a config section, nested sections as dicts."""
    values = {k: section.get(k) for k in keys if section.get(k) is not None}
    return {k: v.as_dict() if isinstance(v, Namespace) else v for k, v in values.items()}


def check_config(config: Namespace) -> None:
    """Checks jsonargparse cannot do from types alone: the module's and the data module's own checks, run
    before either is built; raises a PipelineError naming the key."""
    model = config.get("model") or Namespace()
    check_hparams(**_given(model, CHECKED_HPARAMS))
    limit_val_batches = (config.get("trainer") or Namespace()).get("limit_val_batches")
    check_early_stopping(**_given(model, ("early_stopping",)), limit_val_batches=limit_val_batches)
    check_loader_settings(**_given(config.get("data") or Namespace(), CHECKED_LOADER_SETTINGS))
    if model.get("output_dir"):
        check_output_dir(model.output_dir, "model.output_dir")


def check_inputs(config: Namespace) -> None:
    """File checks of a run about to start, before anything is built or written: the prepared data and a
    local base model exist. (Not part of check_config: a config checked ahead of a flow names folders that
    the flow has yet to make.)"""
    prepared = (config.get("data") or Namespace()).get("prepared_dir")
    if prepared is not None:
        check_prepared_dir(prepared)
    base = (config.get("model") or Namespace()).get("model_name_or_path")
    if base:
        check_model_source(base, "model.model_name_or_path")


class OneLineErrorParser(LightningArgumentParser):
    """A parser whose usage errors print one `error:` line, not jsonargparse's ~80 lines of usage first."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or debug_mode_active():  # nested parsing, or JSONARGPARSE_DEBUG: raise
            super().error(message, ex)
        if not message.startswith(INVALID):  # our own checks name what is valid; parser errors do not
            message += f" (`{self.prog.replace(' [options]', '')} --help` lists the valid options)"
        sys.stderr.write(f"error: {one_line(message)}\n")
        self.exit(BAD_INPUT_STATUS)


class LoraCLI(LightningCLI):
    """LightningCLI over FineTuneModule + PreparedDataModule with the pipeline's defaults."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs: Any):
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("parser_class", OneLineErrorParser)
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
            if self.subcommand:
                check_inputs(config)
                # `last` is resolved here, not by Lightning: it looks only among the Trainer's own
                # checkpoint callbacks (ours comes from the module), and finding none it trains from
                # scratch with a warning, overwriting last.ckpt.
                config.ckpt_path = resolve_ckpt_path(config.get("ckpt_path"), config.model.output_dir)
        except PipelineError as e:
            self.parser.error(f"{INVALID}{e}")

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; the error of a checkpoint that does not fit the configured model names the file."""
        try:
            super()._run_subcommand(subcommand)
        except CheckpointMismatchError as e:
            raise CheckpointMismatchError(f"--ckpt_path {self.config[subcommand].ckpt_path}: {e}") from None


class ConfigOnlyCLI(LoraCLI):
    """Parses and checks a configuration (args without subcommand); builds neither model nor data."""

    def instantiate_classes(self) -> None:
        """Nothing is built: the parsed, checked config is in `self.config`."""

    def _set_seed(self) -> None:
        """Parsing must not seed the caller's RNGs nor set PL_GLOBAL_SEED in its environment."""


class ConfigParseError(PipelineError, ValueError):
    """A training configuration that does not parse or check (the parser's one-line message)."""


def parse_config(args: Sequence[str], quiet: bool = False) -> Namespace:
    """The parsed, checked configuration for CLI `args` without subcommand, e.g. ["--config", "x.yaml"].

    A bad configuration prints one `error:` line and exits with status 2, like the command; with
    `quiet` it raises ConfigParseError holding that line instead (for callers that list problems).
    """
    with warnings.catch_warnings():
        # Lightning warns when a process that has its own sys.argv (pytest, a flow) passes args.
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        if not quiet:
            return ConfigOnlyCLI(args=args, run=False).config
        try:
            return ConfigOnlyCLI(args=args, run=False, parser_kwargs={"exit_on_error": False}).config
        except ArgumentError as e:
            raise ConfigParseError(one_line(str(e))) from None


def _run(args: list[str]) -> None:
    LoraCLI(args=args)


def main(args: Sequence[str] | None = None) -> None:
    """Run the CLI on `args` (None: sys.argv), which start with fit, validate, test or predict.

    The entry of `lora-pipeline fit|validate|test|predict-ckpt` and of `python -m lora_module.training`,
    so it is a process edge of its own: bad input found while building or running (a PipelineError) goes
    through `run_cli`, one `error:` line and exit status 2.
    """
    with warnings.catch_warnings():
        # The `lora-pipeline` command passes its own argv on (as args): not the mistake warned about.
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        status = run_cli(_run, sys.argv[1:] if args is None else args)
    if status:
        raise SystemExit(status)
