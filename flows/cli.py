"""`lora-pipeline`: the one command line of the project, a map from command name to the stage function.

    lora-pipeline --help                     # every command, one line each
    lora-pipeline COMMAND --help             # every option of COMMAND, with its meaning and default
    lora-pipeline prepare --config deploy/configs/data_demo_summary.yaml
    lora-pipeline fit --config deploy/configs/demo_summary_lora.yaml --data.prepared_dir P ...
    lora-pipeline run --task summary

Each command's own parser lives in its stage module (data, training, evaluation, registry, flows,
deploy, benchmarks); this file only maps names to those functions. They are imported when their
command runs, so `lora-pipeline --help` does not import torch, Lightning, MLflow or Prefect.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from lora_module.errors import PipelineError, run_cli


class Command(NamedTuple):
    """Where a command's code is: `main(argv)` of `module`, with `args` put before the user's."""

    module: str
    summary: str
    args: tuple[str, ...] = ()


TRAINING = "lora_module.training.cli"
REGISTRY = "lora_module.registry.cli"
SERVING = "lora_module.serving.cli"
COMMANDS: dict[str, Command] = {
    "prepare": Command("lora_pipeline.data.cli", "prepare (or reuse) a data set: validate, template, "
                       "tokenize, cache", ("prepare",)),
    "inspect": Command("lora_pipeline.data.cli", "columns, lengths and a suggested config of a data file "
                       "or Hub data set", ("inspect",)),
    "demo-corpus": Command("lora_pipeline.data.cli", "write generated demo dialogues to <out>/demo.jsonl",
                           ("demo-corpus",)),
    "demo-base": Command("lora_module.training.demo_base", "build (or reuse) the demo base T5 model"),
    "fit": Command(TRAINING, "train a LoRA/QLoRA adapter or a full fine-tune (Lightning CLI)", ("fit",)),
    "validate": Command(TRAINING, "validation loss of a checkpoint (Lightning CLI)", ("validate",)),
    "test": Command(TRAINING, "test loss of a checkpoint (Lightning CLI)", ("test",)),
    "predict-ckpt": Command(TRAINING, "a checkpoint's outputs for the test split -> predictions.jsonl "
                            "(Lightning CLI predict)", ("predict",)),
    "evaluate": Command("lora_module.evaluation.evaluate", "ROUGE of base / LoRA / full models and "
                        "their comparison report"),
    "register": Command(REGISTRY, "register an adapter as a new version of its task's model "
                        "(promotion gate)", ("register",)),
    "promote": Command(REGISTRY, "give a registered version an alias by hand", ("promote",)),
    "demote": Command(REGISTRY, "remove an alias (default @champion) by hand", ("demote",)),
    "list": Command(REGISTRY, "registered tasks with their versions, aliases and ROUGE", ("list",)),
    "show": Command(REGISTRY, "one registered version: tags, lineage, gate decision", ("show",)),
    "predict": Command(SERVING, "generate with a task's registered adapter (default @champion)",
                       ("predict",)),
    "register-multitask": Command("lora_module.registry.multitask", "register one model serving several "
                                  "tasks' champions on one base"),
    "serve-model": Command(SERVING, "serve a registered model over HTTP (/invocations, OpenAI's "
                           "/v1/chat/completions and /v1/models)",
                           ("serve-model",)),
    "run": Command("lora_pipeline.flows.pipeline", "run the pipeline flow for one or more tasks"),
    "demo": Command("lora_pipeline.flows.demo", "the offline demo: both demo tasks end to end"),
    "sweep": Command("lora_pipeline.flows.sweep_cli", "LoRA rank sweep of a task on the demo settings "
                     "(chart, recommended rank, registered), or with --variant a LoRA/DoRA/LoRA+ "
                     "learning-rate sweep over seeds"),
    "stack": Command("lora_pipeline.deploy.stack", "start, stop or show the production stack on this "
                     "machine: PostgreSQL, S3, MLflow, Prefect, workers"),
    "serve": Command("lora_pipeline.deploy.serve", "serve the deployments of prefect.yaml from one "
                     "process"),
    "bench": Command("lora_pipeline.benchmarks.suite", "run the benchmarks, write RESULTS.md + .json"),
}


def usage() -> str:
    """The top-level help: every command with its one-line summary."""
    width = max(map(len, COMMANDS))
    lines = ["usage: lora-pipeline COMMAND [options]   (lora-pipeline COMMAND --help for its options)",
             "", "LoRA fine-tuning pipeline: data, training, evaluation, registry, flows.", "", "commands:"]
    lines += [f"  {name:<{width}}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `lora-pipeline COMMAND ...`; returns the command's exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lora-pipeline: unknown command {name!r}; valid commands: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    command = COMMANDS[name]
    prefect_defaults()
    # Bad input anywhere in a stage (a PipelineError) ends as one `error:` line and exit status 2.
    return run_cli(prefect_start_in_one_line(importlib.import_module(command.module).main),
                   [*command.args, *rest])


# Prefect's temporary server gets 20 s to start by default: too little on a loaded machine, where `run`
# then died with a 30-line traceback. Read by Prefect when it is imported, so set before any command is.
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
STARTUP_TIMEOUT_DEFAULT = "180"


class PrefectStartError(PipelineError, RuntimeError):
    """Prefect's temporary server did not start in time."""


def prefect_defaults() -> None:
    """A longer start-up timeout for Prefect's temporary server, unless the user set one."""
    os.environ.setdefault(STARTUP_TIMEOUT_ENV, STARTUP_TIMEOUT_DEFAULT)


def prefect_start_in_one_line(main: Callable[[list[str]], int | None]) -> Callable[[list[str]], int | None]:
    """`main`, with Prefect's start-up timeout (raised deep in its engine) as one line saying what to do."""

    def run(argv: list[str]) -> int | None:
        try:
            return main(argv)
        except Exception as e:
            chain = [e, e.__cause__, e.__context__]
            if not any("attempting to connect to ephemeral Prefect API server" in str(x) for x in chain if x):
                raise
            from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as timeout

            raise PrefectStartError(
                f"Prefect's temporary server did not start within {timeout.value()} s "
                f"({STARTUP_TIMEOUT_ENV}); raise it, or start a server (prefect server start) and set "
                "PREFECT_API_URL") from None

    return run
