"""`lora-pipeline sweep`: the rank sweep (flows/sweep.py) or the variant sweep (flows/variant_sweep.py)
on the demo's settings.

    lora-pipeline sweep                                   # task summary, r in 1..64, both layer sets
    lora-pipeline sweep --task topic --rank 4 --rank 16 --targets attention --home /tmp/lp
    lora-pipeline sweep --task chat_summary                # the chat task on the causal demo base (Llama)
    lora-pipeline sweep --variant lora --variant dora --variant loraplus --lr-multiplier 1 2 4 --seeds 3

Any of --variant, --lr-multiplier, --seeds, --loraplus-ratio picks the variant sweep (the rank sweep's
--rank, --targets, --scaling and --no-register are then refused); the others default to every
variant, multipliers 1 2 4 of the task config's learning rate and 3 seeds.

The layer sets are presets resolved on the task's base (lora_module.selection): "attention" is T5's
q, k, v, o or Llama's q_proj, k_proj, v_proj, o_proj, "all-linear" every linear layer but the head.

A module of its own because Prefect reads its settings when it is imported: the environment (offline,
no telemetry, Prefect's database in the pipeline home) is set here first, as the demo does.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from lora_module.errors import ArgumentParser
from lora_module.home import PipelineHome

RANKS = (1, 2, 4, 8, 16, 32, 64)
TARGETS = ("attention", "all-linear")  # lora_module.selection.TARGET_PRESETS (not imported: torch would load)
VARIANTS = ("lora", "dora", "loraplus")  # flows/variant_sweep.VARIANTS (not imported: Prefect would load)
# The sweep trains 14 adapters, so each gets fewer steps than the demo's: the question is how the
# score moves with the rank at a fixed budget, and 14 trainings must fit in 10 minutes on 2 cores.
SWEEP_STEPS = ["--trainer.max_steps", "100"]
# (The variant sweep keeps the demo's 200 steps: its scores are set against full fine-tuning's at 200.)
VARIANT_OPTIONS = ("variants", "lr_multipliers", "seeds", "loraplus_ratio")
RANK_OPTIONS = {"ranks": "--rank", "targets": "--targets", "scaling": "--scaling",
                "no_register": "--no-register"}


def _positive(kind: type) -> type:
    def parse(text: str) -> float:
        value = kind(text)
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> ArgumentParser:
    """The command's options: the shared ones, the rank sweep's and the variant sweep's."""
    parser = ArgumentParser(prog="lora-pipeline sweep", description="LoRA rank or variant sweep of one task.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--task", default="summary", help="task name (a spec in deploy/tasks/) or spec file")
    parser.add_argument("--home", type=Path,
                        help="pipeline home (None: $LORA_PIPELINE_HOME, else ./.lora_pipeline)")
    parser.add_argument("--max-concurrency", type=int, help="trainings at a time (None: the CPU count)")
    rank = parser.add_argument_group("rank sweep (the default)")
    rank.add_argument("--rank", type=int, action="append", dest="ranks", help=f"repeatable (None: {RANKS})")
    rank.add_argument("--targets", action="append", choices=TARGETS,
                      help="layer set, repeatable (None: both)")
    rank.add_argument("--no-register", action="store_true", help="recommend only; register nothing")
    rank.add_argument("--scaling", choices=("rslora", "constant"),
                      help="lora_alpha per rank, the task config's rank keeping its scale alpha/r "
                           "(None: rslora): rslora = alpha'/sqrt(r) (one learning rate suits every rank), "
                           "constant = the same alpha/r at every rank")
    variant = parser.add_argument_group("variant sweep (any of these options picks it)")
    variant.add_argument("--variant", action="append", choices=VARIANTS, dest="variants",
                         help=f"repeatable (None: {' '.join(VARIANTS)})")
    variant.add_argument("--lr-multiplier", type=_positive(float), nargs="+", dest="lr_multipliers",
                         help="learning rates as multiples of the task config's (None: 1 2 4)")
    variant.add_argument("--seeds", type=_positive(int), help="seeds 0..N-1 per point (None: 3)")
    variant.add_argument("--loraplus-ratio", type=_positive(float),
                         help="LoRA+: B's learning rate over A's (None: 16)")
    return parser


def _run_variants(args: argparse.Namespace, ph: PipelineHome) -> str:
    from lora_pipeline.flows import demo
    from lora_pipeline.flows.variant_sweep import LORAPLUS_RATIO, render, variant_sweep

    base_model, demo_base = demo.demo_base_for(args.task)
    result = variant_sweep(task=args.task, variants=args.variants, lr_multipliers=args.lr_multipliers,
                           seeds=args.seeds or 3, home=str(ph.root), tracking_uri=ph.tracking_uri,
                           data_overrides=demo.demo_data_for(args.task), train_overrides=demo.DEMO_TRAIN,
                           max_concurrency=args.max_concurrency, demo_base=demo_base, base_model=base_model,
                           loraplus_ratio=args.loraplus_ratio or LORAPLUS_RATIO)
    return render(result)


def _run_ranks(args: argparse.Namespace, ph: PipelineHome) -> str:
    from lora_pipeline.flows import demo
    from lora_pipeline.flows.sweep import rank_sweep, render

    base_model, demo_base = demo.demo_base_for(args.task)
    result = rank_sweep(task=args.task, ranks=args.ranks, targets=args.targets, home=str(ph.root),
                        tracking_uri=ph.tracking_uri, data_overrides=demo.demo_data_for(args.task),
                        train_overrides=[*demo.DEMO_TRAIN, *SWEEP_STEPS], base_model=base_model,
                        max_concurrency=args.max_concurrency, demo_base=demo_base,
                        register_best=not args.no_register, scaling=args.scaling or "rslora")
    return render(result)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line, with `variant_mode` set; mixing the two sweeps' options is a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.variant_mode = any(getattr(args, k) is not None for k in VARIANT_OPTIONS)
    mixed = [flag for key, flag in RANK_OPTIONS.items() if args.variant_mode and getattr(args, key)]
    if mixed:
        parser.error(f"the rank sweep's {', '.join(mixed)} and the variant sweep's --variant, "
                     "--lr-multiplier, --seeds, --loraplus-ratio do not mix: use one sweep's options")
    return args


def main(argv: list[str] | None = None) -> int:
    """`lora-pipeline sweep [options]`; prints the sweep's table."""
    args = parse_args(argv)
    from lora_pipeline.flows import demo

    ph = PipelineHome.from_env(args.home)
    ph.create()
    demo.configure_environment(ph)
    # Prefect reads the environment on import: the flows are imported after it is set.
    text = _run_variants(args, ph) if args.variant_mode else _run_ranks(args, ph)
    print(text, flush=True)
    return 0
