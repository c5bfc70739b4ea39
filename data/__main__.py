"""Command line for the data stage.

    python -m data prepare --config deploy/configs/data_demo_summary.yaml [--set demo_train_size=500] [--json]
    python -m data demo-corpus --out runs/demo_corpus --n 200 --seed 0

`prepare` prints a summary of the manifest (or the whole manifest with --json); `demo-corpus`
writes the generated dialogues as `<out>/demo.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from data import demo_corpus
from data.config import DataConfig, DataConfigError
from data.prepare import PreparedData, prepare
from data.sources import DataSourceError
from data.validate import DataValidationError


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise DataConfigError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def summary(p: PreparedData) -> str:
    """A few human-readable lines describing a prepared folder."""
    m = p.manifest
    lines = [
        f"prepared {m['name']} -> {p.path}",
        f"  reused: {'yes' if p.reused else 'no'}   fingerprint: {p.fingerprint[:12]}   "
        f"model_type: {m['model_type']}   tokenizer: {m['tokenizer']}",
        "  rows: " + "  ".join(f"{s}={n}" for s, n in m["rows"].items()),
    ]
    for split, drops in m["drops"].items():
        if drops:
            lines.append(f"  dropped from {split}: " + ", ".join(f"{k}={v}" for k, v in drops.items()))
    if m["sources"].get("carved_from_train"):
        lines.append(
            "  carved from train: "
            + ", ".join(f"{k}={v}" for k, v in m["sources"]["carved_from_train"].items())
        )
    lines.append("  tokens     source p50/p90/p99/max (cut)    target p50/p90/p99/max (cut)")
    for split, st in m["lengths"].items():
        cut = m["truncation"][split]
        fmt = "{p50:.0f}/{p90:.0f}/{p99:.0f}/{max}"
        lines.append(
            f"  {split:<10} {fmt.format(**st['source']):>16} ({cut['source']:>4})"
            f"    {fmt.format(**st['target']):>16} ({cut['target']:>4})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="prepare (or reuse) the data described by a YAML config")
    prep.add_argument("--config", required=True, help="YAML file with DataConfig fields")
    prep.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    prep.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    demo = sub.add_parser("demo-corpus", help="write generated demo dialogues to <out>/demo.jsonl")
    demo.add_argument("--out", required=True)
    demo.add_argument("--n", type=int, default=3600)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        if args.command == "prepare":
            cfg = DataConfig.from_yaml(args.config, overrides=_overrides(args.set))
            prepared = prepare(cfg)
            print(json.dumps(prepared.manifest, indent=2) if args.json else summary(prepared))
        else:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            path = out / "demo.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for row in demo_corpus.generate(args.n, args.seed):
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            print(f"wrote {args.n} dialogues (seed {args.seed}) to {path}")
    except (DataConfigError, DataSourceError, DataValidationError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
