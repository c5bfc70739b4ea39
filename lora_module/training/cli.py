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

Faults and trust: the Trainer saves checkpoints atomically beside their destination
(training.checkpoint_io); `--ckpt_path` must name a local file (a URL's pickle would run its code:
training.resume.check_local_checkpoint); config.yaml records URIs with their credentials masked.
"""

from __future__ import annotations

import math
import sys
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from jsonargparse import ArgumentError, Namespace, lazy_instance
from jsonargparse._common import debug_mode_active
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

from lora_module.errors import (
    BAD_INPUT_STATUS,
    PipelineError,
    SettingsError,
    check_output_dir,
    one_line,
    run_cli,
)
from lora_module.home import PipelineHome, artifact_location_for, ensure_store_folder, experiment_name_for
from lora_module.qlora import check_model_source
from lora_module.redact import MASK, no_links_with_credentials, redact_text, redact_uri
from lora_module.training.checkpoint_io import AtomicCheckpointIO
from lora_module.training.datamodule import (
    CHECKED_LOADER_SETTINGS,
    PreparedDataModule,
    check_loader_settings,
    check_prepared_dir,
)
from lora_module.training.early_stopping import check_early_stopping
from lora_module.training.hparams import CHECKED_HPARAMS, check_hparams
from lora_module.training.module import FineTuneModule
from lora_module.training.resume import CheckpointMismatchError, check_local_checkpoint
from lora_module.user_files import check_input_file, read_yaml_file

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
                ($MLFLOW_TRACKING_URI, else the home's SQLite file). A URI with masked credentials
                (`http://***@host`, as config.yaml records it) takes them from $MLFLOW_TRACKING_URI
                when that names the same store (what `run_fit` passes).
            tags: Tags for the run.
            artifact_location: Artifact root of a newly created experiment; None: `mlartifacts/<experiment>`
                beside the SQLite file when the store is that file, else the server's default.
            task: Task name: tags the run `task` and picks the experiment `lora-<task>` when
                `experiment_name` is not given (standalone `fit` then lands beside the flow's runs).
        """
        self.task = task
        experiment_name = experiment_name or (experiment_name_for(task) if task else DEFAULT_EXPERIMENT)
        uri = ensure_store_folder(with_credentials(tracking_uri) or PipelineHome.from_env().tracking_uri)
        no_links_with_credentials(uri)  # a standalone `fit` prints to the user's console
        if artifact_location is None:
            artifact_location = artifact_location_for(uri, experiment_name)
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=uri,
            tags=tags,
            artifact_location=artifact_location,
        )


def with_credentials(tracking_uri: str | None) -> str | None:
    """`tracking_uri` itself, or $MLFLOW_TRACKING_URI when `tracking_uri` is that URI with its credentials
    masked: credentials travel in the environment, never in arguments or recorded configs."""
    if not tracking_uri or MASK not in tracking_uri:
        return tracking_uri
    env = PipelineHome.from_env().tracking_uri
    return env if redact_uri(env) == tracking_uri else tracking_uri


class OutputDirConfig(SaveConfigCallback):
    """Hands the resolved config of a `fit` run to the module, which exports it as config.yaml.

    Not written at the start: a run into an existing output folder would otherwise put its new
    config beside the previous run's adapter and metrics until (or, if killed, forever) it ends.
    """

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":  # config.yaml is a record: URIs in it lose their credentials
            pl_module.resolved_config = redact_text(self.parser.dump(self.config, skip_none=False))


class CheckpointPathError(PipelineError, ValueError):
    """`--ckpt_path` names no checkpoint file."""


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str) -> str | None:
    """`last` -> `<output_dir>/checkpoints/last.ckpt`; raises CheckpointPathError if it is missing and
    RemoteCheckpointError for anything but a local file (a URL's pickle would run its code)."""
    if ckpt_path is None or ckpt_path in ("best", "hpc"):
        return ckpt_path
    check_local_checkpoint(ckpt_path)
    if ckpt_path == "last":
        last = Path(output_dir) / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise CheckpointPathError(
                f"--ckpt_path last: nothing to resume, {last} does not exist (model.output_dir={output_dir});"
                " drop --ckpt_path to train from the start"
            )
        return str(last)
    if not Path(ckpt_path).is_file():
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
    check_numbers(config)
    if model.get("output_dir"):
        check_output_dir(model.output_dir, "model.output_dir")


# Settings that must be >= 1, or that at 0 train nothing yet exit 0 without outputs; None or -1: no limit.
_COUNTS = {"trainer.accumulate_grad_batches": (), "trainer.check_val_every_n_epoch": (None,),
           "trainer.max_steps": (-1,), "trainer.max_epochs": (None, -1)}
# Lower bounds of model.* numbers that check_hparams does not check: (bound, strict).
_BOUNDS = {"model.adam_epsilon": (0.0, True), "model.weight_decay": (0.0, False)}


def check_numbers(config: Namespace) -> None:
    """No NaN or infinity in any setting; counts that would train nothing, and out-of-range optimizer
    settings, refused; raises SettingsError naming the key and what is valid."""
    for key in config.keys():
        value = config[key]
        if isinstance(value, float) and not math.isfinite(value):
            raise SettingsError(f"{key} must be a finite number, got {value}")
    for key, no_limit in _COUNTS.items():
        value = config.get(key)
        if key in config and value not in no_limit and (not isinstance(value, int) or value < 1):
            allowed = " or ".join(["an integer >= 1", *(str(v) for v in no_limit if v is not None)])
            raise SettingsError(f"{key} must be {allowed} (0 trains nothing), got {value!r}")
    limit = config.get("trainer.limit_train_batches")
    if isinstance(limit, int | float) and limit <= 0:
        raise SettingsError(f"trainer.limit_train_batches must be > 0 (a fraction <= 1 or a batch count; 0 "
                            f"trains nothing), got {limit!r}")
    for key, (bound, strict) in _BOUNDS.items():
        value = config.get(key)
        if isinstance(value, int | float) and (value <= bound if strict else value < bound):
            raise SettingsError(f"{key} must be {'>' if strict else '>='} {bound:g}, got {value!r}")


def check_accelerator(config: Namespace) -> None:
    """A GPU accelerator asked for on a machine without one: one line, not Lightning's traceback."""
    accelerator = config.get("trainer.accelerator")
    if accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise SettingsError(f"trainer.accelerator={accelerator!r} but this machine has no usable CUDA GPU "
                            "(torch.cuda.is_available() is False); use 'cpu' or 'auto'")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise SettingsError("trainer.accelerator='mps' but this machine has no usable Apple GPU; use 'cpu' "
                            "or 'auto'")


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
        check_rank_against_base(config)
    check_accelerator(config)


def check_rank_against_base(config: Namespace) -> None:
    """The adapter's rank fits every layer it targets (lora_module.config.check_rank_fits), checked on the
    base's architecture built on the meta device (no weights, no memory) before the real model is loaded:
    r 100000 would otherwise allocate and save a "low-rank" adapter larger than the model."""
    model = config.get("model") or Namespace()
    base = Path(str(model.get("model_name_or_path"))).expanduser()
    if model.get("finetune", "lora") not in ("lora", "qlora") or not (base / "config.json").is_file():
        return  # full fine-tuning has no rank; a Hub id is checked when the model is loaded
    lora = check_hparams(**_given(model, ("lora",)))
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from lora_module.config import check_rank_fits
    from lora_module.selection import resolve_targets

    try:
        arch = AutoConfig.from_pretrained(base)
        auto = AutoModelForSeq2SeqLM if arch.is_encoder_decoder else AutoModelForCausalLM
        with torch.device("meta"):
            skeleton = auto.from_config(arch)
    except (ValueError, OSError, KeyError):  # an architecture this cannot build: loading the model reports it
        return
    resolved, paths = resolve_targets(skeleton, lora)
    layers = {path: skeleton.get_submodule(path) for path in paths}
    check_rank_fits(resolved, {path: (m.in_features, m.out_features) for path, m in layers.items()})


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
                check_checkpoint_file(config.get("ckpt_path"))
                config.ckpt_path = resolve_ckpt_path(config.get("ckpt_path"), config.model.output_dir)
                check_checkpoint_file(config.ckpt_path)
        except PipelineError as e:
            self.parser.error(f"{INVALID}{e}")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        """The Trainer, saving checkpoints atomically beside their destination (training.checkpoint_io)."""
        return super()._instantiate_trainer(AtomicCheckpointIO.add_to(config), callbacks)

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
            check_config_files(args)
            return ConfigOnlyCLI(args=args, run=False).config
        try:
            check_config_files(args)
            return ConfigOnlyCLI(args=args, run=False, parser_kwargs={"exit_on_error": False}).config
        except (ArgumentError, PipelineError) as e:
            raise ConfigParseError(one_line(str(e))) from None


def check_config_files(args: Sequence[str]) -> None:
    """Each `--config FILE` that names something on disk is a readable UTF-8 YAML file with settings in it:
    jsonargparse reads a folder, a FIFO, a symlink loop or a non-UTF-8 file with a traceback (or blocks),
    and an empty file as "every default". A value that names nothing is left to it (it may be inline YAML).
    """
    for i, arg in enumerate(args):
        value = args[i + 1] if arg in ("-c", "--config") and i + 1 < len(args) else (
            arg.removeprefix("--config=") if arg.startswith("--config=") else None)
        if value is not None and (Path(value).exists() or Path(value).is_symlink()):
            read_yaml_file(value, "--config", ConfigParseError)


def check_checkpoint_file(ckpt_path: str | None) -> None:
    """A local `--ckpt_path` that is there must be a regular file written by torch.save (a zip archive):
    a folder, a FIFO, a text file or a truncated checkpoint is one line, not a PytorchStreamReader
    traceback. Keywords, URLs and missing files are resolve_ckpt_path's to judge."""
    if ckpt_path is None or ckpt_path in ("best", "hpc", "last") or "://" in ckpt_path:
        return
    path = Path(ckpt_path)
    if path.exists() or path.is_symlink():
        check_input_file(path, "--ckpt_path")
        if not zipfile.is_zipfile(path):
            raise CheckpointPathError(f"--ckpt_path {path} is not a checkpoint (not a torch.save archive: "
                                      "another kind of file, or truncated); pass a .ckpt written by fit")


def _run(args: list[str]) -> None:
    check_config_files(args)
    try:
        LoraCLI(args=args)
    except MisconfigurationException as e:  # e.g. more devices than the machine has: one line
        raise SettingsError(f"trainer settings: {e}") from None


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
