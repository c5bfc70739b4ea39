"""The data stage's commands: `lora-pipeline prepare`, `inspect` and `demo-corpus`.

    lora-pipeline prepare --config deploy/configs/data_demo_summary.yaml [--demo_train_size 500] [--json]
    lora-pipeline prepare --name tiny --demo_train_size 120           # no YAML: the DataConfig defaults
    lora-pipeline inspect my_data/train.csv [--tokenizer google/flan-t5-base]   # columns, lengths, a config
    lora-pipeline demo-corpus --out runs/demo_corpus --n 200 --seed 0

`prepare` takes every DataConfig field as an option named like its YAML key (`--max_source_length
256`); a given option overrides the YAML's value. Values are read as YAML (`--files '{train:
a.jsonl}'`, `--reference_columns '[a, b]'`, `--num_proc null`), text fields as written. It prints a
summary of the manifest (with --json: the prepared folder's `path`, `reused` and the whole
manifest). `demo-corpus` writes the generated dialogues as `<out>/demo.jsonl`. A relative
`--config` that does not exist under the working directory is looked up among the shipped files
(`deploy/configs/...` of the installed package).
`inspect` prints a file's or Hub data set's columns, row counts, token-length percentiles and a
suggested DataConfig YAML (`lora_pipeline.data.inspection`); given a prepared folder, its rows as
training sees them, the trained tokens marked [[...]] (chat data: the assistant turns). README
"Bring your own data" walks through local files with renamed columns and several references;
"Chat models" through conversation data.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import textwrap
from collections.abc import Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import yaml

from lora_module.errors import ArgumentParser, check_output_dir
from lora_pipeline.data import demo_corpus
from lora_pipeline.data.config import DataConfig, DataConfigError
from lora_pipeline.data.prepare import PreparedData, prepare
from lora_pipeline.deploy import SHIPPED_ROOT


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstrings written under a dataclass's fields (`name: T = v` then `\"\"\"doc\"\"\"`)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _field_value(annotation: str):
    """argparse `type` for a field: text fields as written (`null` for an optional one), others as YAML."""
    if annotation.startswith("str"):
        optional = "None" in annotation
        return lambda text: None if optional and text in ("null", "None") else text

    def from_yaml(text: str) -> Any:
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise argparse.ArgumentTypeError(f"not a YAML value: {text!r} ({e})") from e

    return from_yaml


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One `--<field>` option per DataConfig field, its help the field's docstring and default."""
    group = parser.add_argument_group(
        "DataConfig fields (the YAML keys; a given option overrides the YAML's value)")
    docs = field_docs(DataConfig)
    for f in fields(DataConfig):
        doc = docs[f.name]
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        if "default" not in doc.lower():
            doc += f" (default: {default!r})"
        group.add_argument(f"--{f.name}", type=_field_value(str(f.type)), default=argparse.SUPPRESS,
                           help=doc.replace("%", "%%"))


def _config_path(value: str) -> Path:
    path = Path(value)
    if not path.is_file() and not path.is_absolute() and (SHIPPED_ROOT / path).is_file():
        return SHIPPED_ROOT / path
    return path


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
    lines.append(f"  inputs cut to fit max_source_length={m['config']['max_source_length']} "
                 "(the template's text is kept):")
    for split, cut in m["truncation"].items():
        by = cut.get("input_tokens_cut", {})
        by_text = f", by {by['mean']:.1f} tokens on average (max {by['max']})" if cut["source"] else ""
        lines.append(f"    {split:<10} {cut['source']}/{cut['rows']}{by_text}")
    if any("turns_dropped" in cut for cut in m["truncation"].values()):
        lines.append("  conversations that lost their oldest turns to fit (the generation prompt is kept):")
        for split, cut in m["truncation"].items():
            dropped = cut.get("turns_dropped", {})
            rows, turns = dropped.get("rows", 0), dropped.get("turns", 0)
            lines.append(f"    {split:<10} {rows}/{cut['rows']}, {turns} turns")
    return "\n".join(lines)


def as_json(p: PreparedData) -> dict[str, Any]:
    """What `prepare --json` prints: the folder (`path`, what `fit --data.prepared_dir` takes), whether
    it was reused, then the manifest's own keys."""
    return {"path": str(p.path), "reused": p.reused, **p.manifest}


def build_parser() -> argparse.ArgumentParser:
    """The parser of the data commands (`prepare`, `inspect`, `demo-corpus`)."""
    parser = ArgumentParser(prog="lora-pipeline", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", description=__doc__.split("\n\n", 1)[1],
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          help="prepare (or reuse) the data described by a YAML config and options")
    prep.add_argument("--config", type=_config_path, default=None,
                      help="YAML file of DataConfig fields, optionally under a top-level `data:` key "
                           "(default: none, every field from its default or option)")
    prep.add_argument("--json", action="store_true",
                      help="print the prepared folder (`path`), `reused` and the whole manifest as JSON "
                           "instead of a summary (default: off)")
    add_config_options(prep)
    _add_inspect(sub)
    demo = sub.add_parser("demo-corpus", help="write generated demo dialogues to <out>/demo.jsonl",
                          description="Write the demo corpus (generated dialogues with a summary and a "
                          "topic each; the same seed gives the same rows) to <out>/demo.jsonl.",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--out", required=True, help="folder to write demo.jsonl into (created if missing)")
    demo.add_argument("--n", type=int, default=3600, help="number of dialogues (>= 1)")
    demo.add_argument("--seed", type=int, default=0, help="generator seed (same seed, same dialogues)")
    return parser


def _add_inspect(sub: Any) -> None:
    insp = sub.add_parser("inspect", help="columns, row counts, token lengths and a suggested config of a "
                          "data file or Hub data set", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                          description="Print a data file's or Hub data set's columns (type, non-empty rows, "
                          "token-length percentiles) and a suggested DataConfig YAML: the input column, and "
                          "the target column or, for several references (summary1, summary2, ...; ref_a, "
                          "ref_b, ...), reference_columns. Review the guess, then `lora-pipeline prepare "
                          "--config FILE`.")
    insp.add_argument("target", metavar="PATH_OR_HUB_NAME",
                      help="a .json/.jsonl/.csv/.parquet file, a Hub data set name, or a prepared folder "
                           "(its rows as training sees them, trained tokens [[marked]])")
    insp.add_argument("--tokenizer", default=DataConfig.tokenizer,
                      help="tokenizer for the lengths: a name, a folder, or 'demo' (trained on these rows)")
    insp.add_argument("--split", action="append", default=None,
                      help="Hub split to inspect (repeatable; none given: every split)")
    insp.add_argument("--hub_config", default=None, help="Hub data set configuration (subset) name")
    insp.add_argument("--hub_revision", default=None, help="Hub revision (branch, tag or commit)")
    insp.add_argument("--examples", type=int, default=1,
                      help="a prepared folder: rows to show with their trained tokens [[marked]]")


def _inspect(args: argparse.Namespace) -> None:
    from lora_pipeline.data.inspection import inspect_source

    print(inspect_source(args.target, args.tokenizer, args.split, args.hub_config, args.hub_revision,
                         args.examples))


def _prepare(args: argparse.Namespace) -> None:
    given = {f: getattr(args, f) for f in DataConfig.field_names() if hasattr(args, f)}
    cfg = DataConfig.from_yaml(args.config, overrides=given) if args.config else DataConfig.from_dict(given)
    if cfg.output_root is None:  # the edge: default to the pipeline home's data folder
        from lora_module.home import PipelineHome

        cfg = dataclasses.replace(cfg, output_root=str(PipelineHome.from_env().data_dir))
    prepared = prepare(cfg)
    print(json.dumps(as_json(prepared), indent=2) if args.json else summary(prepared))


def _demo_corpus(args: argparse.Namespace) -> None:
    out = check_output_dir(args.out, "--out")
    if args.n == 0:  # generate(0) is a valid empty corpus; as a command it would write an empty file, exit 0
        raise DataConfigError("demo-corpus --n 0 writes no dialogues; give --n >= 1")
    rows = demo_corpus.generate(args.n, args.seed)  # a bad --n fails before anything is written
    out.mkdir(parents=True, exist_ok=True)
    path = out / "demo.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {args.n} dialogues (seed {args.seed}) to {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """`prepare ...`, `inspect ...` or `demo-corpus ...`; returns 0. Bad input raises a PipelineError (a
    usage error too), which `lora-pipeline` (`run_cli`) prints as one `error:` line with exit status 2."""
    args = build_parser().parse_args(argv)
    {"prepare": _prepare, "inspect": _inspect, "demo-corpus": _demo_corpus}[args.command](args)
    return 0
