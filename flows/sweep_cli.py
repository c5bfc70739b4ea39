"""`lora-pipeline sweep`: the rank sweep flow (flows/sweep.py) on the demo's settings.

    lora-pipeline sweep                                   # task summary, r in 1..64, both layer sets
    lora-pipeline sweep --task topic --rank 4 --rank 16 --targets attention --home /tmp/lp

A module of its own because Prefect reads its settings when it is imported: the environment (offline,
no telemetry, Prefect's database in the pipeline home) is set here first, as the demo does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_module.errors import ArgumentParser
from lora_module.home import PipelineHome

RANKS = (1, 2, 4, 8, 16, 32, 64)
TARGETS = ("attention", "all-linear")
# The sweep trains 14 adapters, so each gets fewer steps than the demo's: the question is how the
# score moves with the rank at a fixed budget, and 14 trainings must fit in 10 minutes on 2 cores.
SWEEP_STEPS = ["--trainer.max_steps", "100"]


def main(argv: list[str] | None = None) -> int:
    """`lora-pipeline sweep [--task T] [--rank R ...] [--targets SET ...]`; prints the sweep's table."""
    parser = ArgumentParser(prog="lora-pipeline sweep", description="LoRA rank sweep of one task.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--task", default="summary", help="task name (a spec in deploy/tasks/) or spec file")
    parser.add_argument("--rank", type=int, action="append", dest="ranks", help=f"repeatable (None: {RANKS})")
    parser.add_argument("--targets", action="append", choices=TARGETS,
                        help="layer set, repeatable (None: both)")
    parser.add_argument("--home", type=Path,
                        help="pipeline home (None: $LORA_PIPELINE_HOME, else ./.lora_pipeline)")
    parser.add_argument("--max-concurrency", type=int, help="trainings at a time (None: the CPU count)")
    parser.add_argument("--no-register", action="store_true", help="recommend only; register nothing")
    parser.add_argument("--scaling", choices=("rslora", "constant"), default="rslora",
                        help="lora_alpha per rank, the task config's rank keeping its scale alpha/r: "
                             "rslora = alpha'/sqrt(r) (one learning rate suits every rank), constant = the "
                             "same alpha/r at every rank")
    args = parser.parse_args(argv)
    from lora_pipeline.flows import demo

    ph = PipelineHome.from_env(args.home)
    ph.create()
    demo.configure_environment(ph)
    from lora_pipeline.flows.sweep import (  # after the environment: Prefect reads it on import
        rank_sweep,
        render,
    )

    result = rank_sweep(task=args.task, ranks=args.ranks, targets=args.targets, home=str(ph.root),
                        tracking_uri=ph.tracking_uri, data_overrides=demo.DEMO_DATA,
                        train_overrides=[*demo.DEMO_TRAIN, *SWEEP_STEPS],
                        max_concurrency=args.max_concurrency, demo_base=demo.DEMO_BASE,
                        register_best=not args.no_register, scaling=args.scaling)
    print(render(result), flush=True)
    return 0
