"""`lora-pipeline inspect`: what a data file or Hub data set holds, and a DataConfig to start from.

    lora-pipeline inspect data/train.csv                        # columns, rows, token lengths, suggested YAML
    lora-pipeline inspect data/test.parquet --tokenizer google/flan-t5-base
    lora-pipeline inspect knkarthick/dialogsum --split train --split test [--hub_config C --hub_revision R]
    lora-pipeline inspect .lora_pipeline/data/chat-0123abcd4567 [--split test] [--examples 2]   # prepared

    from lora_pipeline.data.inspection import inspect_source, suggest_config
    report = inspect_source("data/train.csv", tokenizer="demo")

A path ending in .json/.jsonl/.csv/.parquet is read as a file (one split, named "train"); anything
else is a Hub data set name. Lengths are in tokens of `--tokenizer`: "demo" (the default) trains the
demo byte-level BPE on the inspected rows' text, which is what `prepare` would do with the default
config. The suggested config guesses the input column (long text named like dialogue/text/...), the
target column (shorter text named like summary/abstract/...) and several reference columns: columns
that differ only by a numbered or lettered suffix (summary1, summary2, ...; ref_a, ref_b, ...) become
`reference_columns`, the first of them also the target; review it before use.

Chat data: a column of conversations (lists of {role, content} or ShareGPT {from, value} turns) is
suggested as `messages_column` with `prompt_format: chat`; given a `--tokenizer` with a chat template,
the report shows the first conversation as that template renders it, the tokens training learns
marked `[[...]]` (every assistant turn). A prepared folder (it has manifest.json) shows its rows
exactly as training sees them: the decoded input ids with the labelled tokens marked the same way.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lora_module.contracts import MANIFEST_FILE
from lora_module.prompt import chat_template_of, normalize_messages
from lora_pipeline.data import sources
from lora_pipeline.data.config import DEMO_TOKENIZER, FILE_FORMATS, SUMMARY_TEMPLATE, DataConfig

INPUT_NAMES = ("dialogue", "conversation", "dialog", "text", "document", "article", "input", "source",
               "context", "content", "body", "prompt", "question")
TARGET_NAMES = ("summary", "abstract", "target", "output", "label", "answer", "response", "headline",
                "highlights", "title", "topic")
# Several references of one row: a column name's stem is one of these, or shared by its siblings.
REFERENCE_NAMES = ("ref", "reference", "references", "gold", "human", "annotation", "annotator")
# A name ending in a number (summary2, ref_10) or a single letter after a separator (ref_c, gold-b).
_VARIANT = re.compile(r"(?P<stem>.+?)(?:[_\-\s]?(?P<num>\d+)|[_\-\s](?P<letter>[A-Za-z]))")
# Token lengths are measured on at most this many rows per split (counts always use every row).
SAMPLE_ROWS = 5000


@dataclass
class ColumnInfo:
    """One column of one split: its type, how many rows hold text, and token-length percentiles."""

    name: str
    dtype: str
    non_empty: int
    tokens: dict[str, float] = field(default_factory=dict)


@dataclass
class SplitInfo:
    """One split: where it came from, its row count and its columns."""

    name: str
    origin: str
    rows: int
    columns: list[ColumnInfo]


def _is_file(target: str) -> bool:
    return Path(target).suffix.lower() in FILE_FORMATS


def load_for_inspection(target: str, cache: Path, splits: list[str] | None = None,
                        hub_config: str | None = None, hub_revision: str | None = None) -> dict[str, Any]:
    """{split: Dataset}: a file as split "train", or the chosen splits of a Hub data set (all by default)."""
    if _is_file(target):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise sources.DataSourceError(f"file not found: {path}")
        return {"train": sources.load_file("train", path, cache)}
    dd = sources.load_hub(target, hub_config, hub_revision)
    unknown = sorted(set(splits or []) - set(dd))
    if unknown:
        raise sources.DataSourceError(f"Hub data set {target!r} has no split {unknown}; it has {list(dd)}")
    return {s: dd[s] for s in (splits or list(dd))}


def _load_tokenizer(name: str, loaded: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    from lora_pipeline.data.tokenizer import train_tokenizer

    if name != DEMO_TOKENIZER:
        tok = AutoTokenizer.from_pretrained(name)
    else:
        texts = [v for ds in loaded.values() for c in _text_columns(ds)
                 for v in ds.select(range(min(ds.num_rows, SAMPLE_ROWS)))[c] if isinstance(v, str)]
        with tempfile.TemporaryDirectory(prefix="lora-inspect-tok-") as tmp:
            tok = AutoTokenizer.from_pretrained(train_tokenizer(texts, tmp, DataConfig.tokenizer_vocab_size))
    # Only counting here: no "longer than the model's maximum length" warning for long texts.
    tok.model_max_length = 1 << 40
    return tok


def _text_columns(ds: Any) -> list[str]:
    return [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]


def _percentiles(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    p50, p90, p99 = np.percentile(np.asarray(lengths), [50, 90, 99])
    return {"p50": round(float(p50), 1), "p90": round(float(p90), 1), "p99": round(float(p99), 1),
            "max": int(max(lengths))}


def describe_split(name: str, origin: str, ds: Any, tokenizer: Any) -> SplitInfo:
    """Row count, and per column its type, non-empty rows and token-length percentiles (text columns)."""
    text = set(_text_columns(ds))
    sample = ds.select(range(min(ds.num_rows, SAMPLE_ROWS)))
    columns = []
    for col, feature in ds.features.items():
        values = ds[col]
        non_empty = sum(v is not None and (not isinstance(v, str) or bool(v.strip())) for v in values)
        info = ColumnInfo(col, getattr(feature, "dtype", type(feature).__name__), non_empty)
        if col in text:
            kept = [v for v in sample[col] if isinstance(v, str) and v.strip()]
            ids = tokenizer(kept, add_special_tokens=False)["input_ids"] if kept else []
            info.tokens = _percentiles([len(x) for x in ids])
            if info.tokens:
                info.tokens["mean_chars"] = round(sum(map(len, kept)) / len(kept), 1)
        columns.append(info)
    return SplitInfo(name, origin, ds.num_rows, columns)


def _named(cols: list[ColumnInfo], names: tuple[str, ...]) -> list[ColumnInfo]:
    """Columns whose name (lower-case, digits and separators dropped) is one of `names`, in that order."""
    def stem(c: ColumnInfo) -> str:
        return re.sub(r"[\d_\-\s]+$", "", c.name.lower())

    return sorted((c for c in cols if stem(c) in names), key=lambda c: names.index(stem(c)))


def _variant(name: str) -> tuple[str, str] | None:
    """(stem, suffix) of a name ending in a number or a separated letter (`summary2`, `ref_c`), else None."""
    match = _VARIANT.fullmatch(name)
    return (match["stem"].lower(), (match["num"] or match["letter"]).lower()) if match else None


def _natural(suffix: str) -> tuple[int, str]:
    return (int(suffix), "") if suffix.isdigit() else (-1, suffix)


def reference_groups(cols: list[ColumnInfo]) -> list[list[str]]:
    """Sets of two or more columns that differ only by a numbered or lettered suffix (summary1 ..
    summary3, ref_a .. ref_c): several references of one row. Groups named like a target or a
    reference come first, then larger groups; columns in suffix order."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for c in cols:
        variant = _variant(c.name)
        if variant is not None:
            groups.setdefault(variant[0], []).append((variant[1], c.name))
    found = [(stem, sorted(members, key=lambda m: _natural(m[0])))
             for stem, members in groups.items() if len(members) > 1]
    found.sort(key=lambda g: (g[0] not in TARGET_NAMES + REFERENCE_NAMES, -len(g[1])))
    return [[name for _, name in members] for _, members in found]


def guess_columns(split: SplitInfo) -> dict[str, Any]:
    """{"input_column", "target_column" or "reference_columns"} guessed by name, then by length."""
    text = [c for c in split.columns if c.tokens]
    if not text:
        return {}
    by_len = sorted(text, key=lambda c: -c.tokens["mean_chars"])
    source = (_named(text, INPUT_NAMES) or by_len)[0]
    rest = [c for c in text if c is not source]
    if not rest:
        return {"input_column": source.name}
    groups = reference_groups(rest)
    named = _named(rest, TARGET_NAMES)
    if groups and (not named or _variant(named[0].name) is not None):
        return {"input_column": source.name, "reference_columns": groups[0]}
    labels = named or sorted(rest, key=lambda c: c.tokens["mean_chars"])
    return {"input_column": source.name, "target_column": labels[0].name}


def _round_up(tokens: float, step: int = 64) -> int:
    return max(step, int(math.ceil(tokens / step)) * step)


def suggest_config(target: str, infos: list[SplitInfo], tokenizer: str, hub_config: str | None = None,
                   hub_revision: str | None = None, messages_column: str | None = None) -> dict[str, Any]:
    """A DataConfig mapping for `target` (it passes DataConfig.from_dict); review the guesses.
    With `messages_column` (a column of conversations): a chat config reading it."""
    first = infos[0]
    guess = guess_columns(first)
    stem = re.sub(r"[^\w-]+", "_", Path(target).stem if _is_file(target) else target.split("/")[-1])
    cfg: dict[str, Any] = {"name": stem or "my_task"}
    if _is_file(target):
        cfg |= {"source": "files", "files": {"train": target}}
    else:
        cfg |= {"source": "hub", "hub_name": target, "hub_config": hub_config, "hub_revision": hub_revision}
    if messages_column:
        return cfg | {"prompt_format": "chat", "messages_column": messages_column, "model_type": "causal",
                      "tokenizer": tokenizer}
    source = guess.get("input_column", "text")
    label_cols = guess.get("reference_columns") or [guess.get("target_column", "summary")]
    cfg["input_column"] = source
    cfg["target_column"] = label_cols[0]
    if "reference_columns" in guess:
        cfg["reference_columns"] = label_cols
    cfg["prompt_template"] = SUMMARY_TEMPLATE.replace("{dialogue}", "{" + source + "}")
    tokens = {c.name: c.tokens for c in first.columns if c.tokens}
    template_tokens = 16  # the instruction's words, roughly
    if source in tokens:
        cfg["max_source_length"] = _round_up(tokens[source]["p99"] + template_tokens)
    if label_cols[0] in tokens:
        cfg["max_target_length"] = _round_up(tokens[label_cols[0]]["p99"] + 1, 32)
    cfg["tokenizer"] = tokenizer
    return cfg


class _Dumper(yaml.SafeDumper):
    """Writes a text with line breaks in one double-quoted line ("...\\n\\n{dialogue}..."), as configs do."""


_Dumper.add_representer(str, lambda d, v: d.represent_scalar(
    "tag:yaml.org,2002:str", v, style='"' if "\n" in v else None))


def to_yaml(config: dict[str, Any]) -> str:
    """`config` as YAML, keys in order, templates on one line."""
    return yaml.dump(config, Dumper=_Dumper, sort_keys=False, width=1000).rstrip()


def format_report(target: str, infos: list[SplitInfo], tokenizer: str, config: dict[str, Any]) -> str:
    """The printed report: per split its rows and columns (type, non-empty, token lengths), then the YAML."""
    lines = [f"inspect {target}   (lengths in tokens of {tokenizer!r}"
             + (", trained on these rows" if tokenizer == DEMO_TOKENIZER else "") + ")"]
    for info in infos:
        lines += [f"split {info.name}: {info.rows} rows from {info.origin}",
                  f"  {'column':<24} {'type':<12} {'non-empty':>9}   tokens p50/p90/p99/max"]
        for c in info.columns:
            t = c.tokens
            lengths = f"{t['p50']:.0f}/{t['p90']:.0f}/{t['p99']:.0f}/{t['max']}" if t else "-"
            lines.append(f"  {c.name:<24} {c.dtype:<12} {c.non_empty:>9}   {lengths}")
    lines += ["", "suggested DataConfig (save as data_<name>.yaml, check the columns, then "
              "`lora-pipeline prepare --config FILE`):", to_yaml(config)]
    return "\n".join(lines)


MARK_OPEN, MARK_CLOSE = "[[", "]]"


def mark_trained(tokenizer: Any, input_ids: list[int], labels: list[int]) -> str:
    """The decoded ids (special tokens shown) with every run of labelled tokens put in [[...]]."""
    runs: list[tuple[bool, list[int]]] = []
    for tok, label in zip(input_ids, labels, strict=True):
        trained = label != -100
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(tok)
        else:
            runs.append((trained, [tok]))
    text = [tokenizer.decode(ids, skip_special_tokens=False) for _, ids in runs]
    return "".join(f"{MARK_OPEN}{t}{MARK_CLOSE}" if trained else t for (trained, _), t in zip(runs, text,
                                                                                              strict=True))


def _conversation_column(ds: Any) -> str | None:
    """The first column whose first non-null value looks like a conversation (a list of turn mappings)."""
    for col in ds.column_names:
        value = next((v for v in ds.select(range(min(ds.num_rows, 20)))[col] if v is not None), None)
        if isinstance(value, list) and value and all(
                isinstance(t, dict) and ({"role", "content"} <= set(t) or {"from", "value"} <= set(t))
                for t in value):
            return col
    return None


def _chat_example(tok: Any, ds: Any, column: str) -> list[str]:
    """Report lines: the first conversation as the tokenizer's chat template renders it, trained tokens
    marked."""
    from lora_pipeline.data.chat import assistant_labels

    messages = normalize_messages(ds[0][column])
    if chat_template_of(tok) is None:
        return ["", f"(the tokenizer has no chat template: give --tokenizer of the chat model to see "
                    f"{column!r} rendered)"]
    ids, labels = assistant_labels(tok, messages)
    return ["", f"first conversation of {column!r} as the chat template renders it; trained tokens "
                f"{MARK_OPEN}marked{MARK_CLOSE} ({sum(x != -100 for x in labels)} of {len(ids)}):",
            mark_trained(tok, ids, labels)]


def inspect_prepared(path: str | Path, split: str = "train", examples: int = 1) -> str:
    """A prepared folder's rows as training sees them: decoded input ids, labelled tokens [[marked]]."""
    from lora_pipeline.data.prepare import load_prepared, load_tokenizer

    dataset, manifest = load_prepared(path)
    if split not in dataset:
        raise sources.DataSourceError(
            f"prepared folder {path} has no split {split!r}; it has {list(dataset)}")
    tok = load_tokenizer(path)
    config = manifest.get("config") or {}
    lines = [f"inspect prepared {manifest.get('name')} ({path}): model_type {manifest.get('model_type')}, "
             f"prompt_format {config.get('prompt_format', 'template')}, split {split} "
             f"({dataset[split].num_rows} rows); trained tokens {MARK_OPEN}marked{MARK_CLOSE}"]
    for i, row in enumerate(dataset[split].select(range(min(examples, dataset[split].num_rows)))):
        trained = sum(x != -100 for x in row["labels"])
        if len(row["labels"]) != len(row["input_ids"]):  # seq2seq: the labels are the decoder's own ids
            lines += ["", f"row {i}: input", tok.decode(row["input_ids"], skip_special_tokens=False),
                      f"row {i}: labels (all {trained} trained)",
                      tok.decode([x for x in row["labels"] if x != -100], skip_special_tokens=False)]
            continue
        lines += ["", f"row {i} ({trained} of {len(row['input_ids'])} tokens trained):",
                  mark_trained(tok, row["input_ids"], row["labels"])]
    return "\n".join(lines)


def _is_prepared(target: str) -> bool:
    return (Path(target).expanduser() / MANIFEST_FILE).is_file()


def inspect_source(target: str, tokenizer: str = DEMO_TOKENIZER, splits: list[str] | None = None,
                   hub_config: str | None = None, hub_revision: str | None = None, examples: int = 1) -> str:
    """The whole report for a file, Hub data set or prepared folder (see the module docstring)."""
    if _is_prepared(target):
        return inspect_prepared(target, (splits or ["train"])[0], examples)
    with tempfile.TemporaryDirectory(prefix="lora-inspect-") as tmp:
        loaded = load_for_inspection(target, Path(tmp), splits, hub_config, hub_revision)
        tok = _load_tokenizer(tokenizer, loaded)
        origin = str(Path(target).expanduser().resolve()) if _is_file(target) else f"hub:{target}"
        infos = [describe_split(s, origin if _is_file(target) else f"{origin}[{s}]", ds, tok)
                 for s, ds in loaded.items()]
        first = next(iter(loaded.values()))
        chat_column = _conversation_column(first)
        example = _chat_example(tok, first, chat_column) if chat_column else []
    config = suggest_config(target, infos, tokenizer, hub_config, hub_revision, chat_column)
    return format_report(target, infos, tokenizer, config) + "\n".join(["", *example] if example else [])
