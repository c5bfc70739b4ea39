"""Validation and cleaning of loaded splits: nothing is changed without being counted.

    from lora_pipeline.data.validate import validate_splits
    clean = validate_splits(raw_splits, cfg, origins)   # origins: split -> file (named in errors)
    clean.rows["train"]    # {"input", "prompt", "parts", "target", "references"}: lists, one item per row
    clean.drops["train"]   # {"empty:summary": 3, "duplicate": 2, "in_test": 1}

Each split reads its own columns (`DataConfig.columns_for`: split_columns overrides the top-level
names); the split's input column fills the template's input placeholder. `parts` holds the
template's text around the input (`input.join(parts) == prompt`), so encoding can cut the input
alone. Missing columns and empty splits are errors naming the split, its file, the column and the
columns the file has. Rows whose template or target columns hold null,
non-string or empty/whitespace-only values are dropped and counted as "<reason>:<column>";
exact duplicate (prompt, references) rows are dropped ("duplicate"); train rows whose input also
occurs in test are removed ("in_test"). Missing validation/test splits are carved out of train.

prompt_format chat adds a `messages` column: the conversation to render with the tokenizer's chat
template, ending with the assistant turn to learn, whose last user turn holds the raw input of
`parts`. With `messages_column` each row's conversation (role/content, or ShareGPT's from/value) is
checked (`lora_module.prompt.validate_messages`: a bad one is an error naming split, row and turn);
its last assistant turn is the target and only reference, and the turns before it stand for
`input` and `prompt` in the duplicate and leakage checks. Without it the input column is the user
turn and the target the assistant turn.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import datasets

from lora_module.errors import PipelineError
from lora_module.prompt import normalize_messages, template_parts, validate_messages
from lora_pipeline.data.config import SPLITS, DataConfig

Rows = dict[str, list[Any]]  # columns "input", "prompt", "parts", "target", "references"


class DataValidationError(PipelineError, ValueError):
    """The data cannot be prepared as configured (missing column, empty split, bad split sizes)."""


@dataclass
class CleanSplits:
    rows: dict[str, Rows]
    drops: dict[str, dict[str, int]]
    leakage: dict[str, Any]
    carved: dict[str, int] = field(default_factory=dict)


def _bad_reason(value: Any) -> str | None:
    if value is None:
        return "null"
    if not isinstance(value, str):
        return "non_string"
    if not value.strip():
        return "empty"
    return None


def _needed_columns(cfg: DataConfig, split: str) -> dict[str, str]:
    """column -> role, in the order problems are reported."""
    if cfg.messages_column:
        return {cfg.messages_column: "messages_column"}
    own = (cfg.split_columns or {}).get(split, {})
    input_col, label_cols = cfg.columns_for(split)
    needed = {c: "prompt_template placeholder" for c in cfg.template_columns if c != cfg.input_column}
    needed[input_col] = f"split_columns[{split!r}].input_column" if "input_column" in own else "input_column"
    role = "reference_columns" if split == "test" else "target_column"
    role = f"split_columns[{split!r}].{role}" if role in own else role
    needed.update({c: role for c in label_cols})
    return needed


def clean_split(
    ds: datasets.Dataset, split: str, cfg: DataConfig, origin: str | None = None
) -> tuple[Rows, Counter]:
    """Check columns, drop bad and duplicate rows, render prompts; returns rows and drop counts."""
    needed = _needed_columns(cfg, split)
    where = f"split {split!r}" + (f" ({origin})" if origin else "")
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        roles = ", ".join(f"{c!r} ({needed[c]})" for c in missing)
        raise DataValidationError(
            f"{where} has no column {roles}; its columns are {ds.column_names} "
            "(name other columns per split with split_columns)"
        )
    if ds.num_rows == 0:
        raise DataValidationError(f"{where} is empty (0 rows)")
    if cfg.messages_column:
        return _conversation_rows(ds.select_columns([cfg.messages_column]).to_dict()[cfg.messages_column],
                                  where, cfg)

    cols = ds.select_columns(list(needed)).to_dict()
    input_col, ref_cols = cfg.columns_for(split)
    others = [c for c in cfg.template_columns if c != cfg.input_column]
    drops: Counter = Counter()
    seen: set[tuple[str, tuple[str, ...]]] = set()
    rows: Rows = {"input": [], "prompt": [], "parts": [], "target": [], "references": []}
    for i in range(ds.num_rows):
        reason = next(
            (f"{r}:{c}" for c in needed if (r := _bad_reason(cols[c][i])) is not None),
            None,
        )
        if reason:
            drops[reason] += 1
            continue
        template = cfg.prompt_template or "{" + cfg.input_column + "}"  # chat: the input is the user turn
        parts = template_parts(template, {c: cols[c][i] for c in others}, cfg.input_column)
        prompt = cols[input_col][i].join(parts)
        refs = tuple(cols[c][i] for c in ref_cols)
        if (prompt, refs) in seen:
            drops["duplicate"] += 1
            continue
        seen.add((prompt, refs))
        rows["input"].append(cols[input_col][i])
        rows["prompt"].append(prompt)
        rows["parts"].append(parts)
        rows["target"].append(refs[0])
        rows["references"].append(list(refs))
        if cfg.prompt_format == "chat":
            rows.setdefault("messages", []).append(
                [{"role": "user", "content": cols[input_col][i]}, {"role": "assistant", "content": refs[0]}])
    if split == "test" and cfg.group_test_references:
        rows = _group_references(rows, drops)
    if not rows["prompt"]:
        raise DataValidationError(f"{where} has no valid rows left after dropping {dict(drops)}")
    return rows, drops


def _group_references(rows: Rows, drops: Counter) -> Rows:
    """Merge rows that share one prompt into one row whose references are all their targets."""
    order: dict[str, int] = {}
    out: Rows = {k: [] for k in rows}
    for i, prompt in enumerate(rows["prompt"]):
        if prompt in order:
            out["references"][order[prompt]].extend(rows["references"][i])
            drops["merged_into_references"] += 1
            continue
        order[prompt] = len(out["prompt"])
        for k in rows:
            out[k].append(list(rows[k][i]) if k in ("references", "parts", "messages") else rows[k][i])
    return out


def _conversation(value: Any, where: str) -> list[dict[str, str]] | None:
    """One row's conversation as role/content turns ending with an assistant turn; None when null."""
    if value is None:
        return None
    if isinstance(value, str):  # a CSV cell holds the conversation as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataValidationError(f"{where}: not a JSON list of turns ({e.msg}); give "
                                      "[{role, content}, ...] or ShareGPT [{from, value}, ...]") from e
    messages = normalize_messages(value)
    validate_messages(messages, where, last="assistant")
    return messages


def _conversation_rows(values: list[Any], where: str, cfg: DataConfig) -> tuple[Rows, Counter]:
    """Rows of a messages column: every conversation checked, null ones dropped, duplicates dropped."""
    drops: Counter = Counter()
    seen: set[str] = set()
    rows: Rows = {"input": [], "prompt": [], "parts": [], "target": [], "references": [], "messages": []}
    for i, value in enumerate(values):
        messages = _conversation(value, f"{where}, row {i} ({cfg.messages_column})")
        if messages is None:
            drops[f"null:{cfg.messages_column}"] += 1
            continue
        key = json.dumps(messages, ensure_ascii=False)
        if key in seen:
            drops["duplicate"] += 1
            continue
        seen.add(key)
        context = json.dumps(messages[:-1], ensure_ascii=False)
        for k, v in (("input", context), ("prompt", context), ("parts", ["", ""]),
                     ("target", messages[-1]["content"]), ("references", [messages[-1]["content"]]),
                     ("messages", messages)):
            rows[k].append(v)
    if not rows["prompt"]:
        raise DataValidationError(f"{where} has no valid rows left after dropping {dict(drops)}")
    return rows, drops


def _take(rows: Rows, idx: list[int]) -> Rows:
    return {k: [v[i] for i in idx] for k, v in rows.items()}


def _count(size: float, n: int) -> int:
    return round(size * n) if size < 1 else int(size)


def carve_splits(train: Rows, missing: list[str], cfg: DataConfig) -> tuple[Rows, dict[str, Rows]]:
    """Take the missing validation/test splits out of train, seeded; train keeps its order."""
    n = len(train["prompt"])
    sizes = {s: max(1, _count(getattr(cfg, f"{s}_size"), n)) for s in missing}
    if sum(sizes.values()) >= n:
        asked = ", ".join(f"{s}_size={getattr(cfg, f'{s}_size')!r} -> {k} rows" for s, k in sizes.items())
        raise DataValidationError(
            f"cannot carve {asked} out of a train split of {n} valid rows: no training rows would be left"
        )
    perm = list(range(n))
    random.Random(cfg.seed).shuffle(perm)
    carved, start = {}, 0
    for s in ("test", "validation"):  # fixed order so a given seed always gives the same carve
        if s in sizes:
            carved[s] = _take(train, sorted(perm[start : start + sizes[s]]))
            start += sizes[s]
    return _take(train, sorted(perm[start:])), carved


def validate_splits(
    raw: dict[str, datasets.Dataset], cfg: DataConfig, origins: dict[str, str] | None = None
) -> CleanSplits:
    """Clean every given split, carve missing ones from train, and remove test inputs from train.
    `origins` (split -> file or Hub split) only makes error messages name where a split came from."""
    rows, drops = {}, {}
    for split in SPLITS:
        if split in raw:
            rows[split], drops[split] = clean_split(raw[split], split, cfg, (origins or {}).get(split))
    missing = [s for s in ("validation", "test") if s not in rows]
    carved: dict[str, int] = {}
    if missing:
        rows["train"], extra = carve_splits(rows["train"], missing, cfg)
        for s, r in extra.items():
            rows[s], drops[s] = r, Counter()
            carved[s] = len(r["prompt"])

    test_inputs = set(rows["test"]["input"])
    keep = [i for i, x in enumerate(rows["train"]["input"]) if x not in test_inputs]
    leaked = [x for x in rows["train"]["input"] if x in test_inputs]
    if leaked:
        drops["train"]["in_test"] += len(leaked)
        rows["train"] = _take(rows["train"], keep)
        if not keep:
            raise DataValidationError("split 'train' has no rows left: every train input also occurs in test")
    val_in_test = sum(x in test_inputs for x in rows["validation"]["input"])
    leakage = {
        "test_inputs_in_train": len(leaked),
        "removed_from_train": len(leaked),
        "validation_inputs_in_test": val_in_test,
        "examples": [x[:80] for x in leaked[:3]],
    }
    drops_sorted = {s: dict(sorted(drops[s].items())) for s in SPLITS}
    return CleanSplits({s: rows[s] for s in SPLITS}, drops_sorted, leakage, carved)
