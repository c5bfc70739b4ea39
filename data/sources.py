"""Where rows come from: local files, the Hugging Face Hub, or the generated demo corpus.

    from lora_pipeline.data.sources import source_identity, load_splits
    ident = source_identity(cfg)            # cheap: what the cache key needs, loads nothing
    splits = load_splits(cfg, cache_root)   # {"train": Dataset, ...} exactly as given (no cleaning)

Files go through `datasets`' json/csv/parquet builders. When a builder fails we find out why
ourselves (for JSON the line number and parser message), because its own error says only
"An error occurred while generating the dataset".
"""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import datasets

from lora_module.errors import InputNotFoundError, PipelineError
from lora_module.files import publish_dir, sha256_file, sha256_json
from lora_module.user_files import check_input_file
from lora_pipeline.data import demo_corpus
from lora_pipeline.data.config import FILE_FORMATS, SPLITS, DataConfig


class DataSourceError(PipelineError, ValueError):
    """A data source could not be read: names the file or Hub name, where, and why."""


def module_sha256(*modules: Any) -> str:
    """Hash of modules' source files: a code change must invalidate outputs the code produced."""
    h = hashlib.sha256()
    for m in modules:
        h.update(_source_sha256(m.__file__).encode())
    return h.hexdigest()


@functools.cache
def _source_sha256(path: str) -> str:
    # Cached per process: the code that runs is the code that was imported.
    return sha256_file(path)


def _demo_params(cfg: DataConfig) -> dict[str, Any]:
    return {
        "train": cfg.demo_train_size,
        "validation": cfg.demo_validation_size,
        "test": cfg.demo_test_size,
        "seed": cfg.demo_seed,
        "generator": module_sha256(demo_corpus),
    }


def _resolved_files(cfg: DataConfig) -> dict[str, Path]:
    out = {}
    for split, path in (cfg.files or {}).items():
        given = Path(path).expanduser()
        if not given.exists() and not given.is_symlink():
            raise DataSourceError(f"files[{split!r}]: file not found: {given.resolve()}")
        try:  # a folder, FIFO, symlink loop or unreadable file: each its own line
            p = check_input_file(given, f"files[{split!r}]: file").resolve()
        except InputNotFoundError as e:
            raise DataSourceError(str(e)) from None
        if FILE_FORMATS[p.suffix.lower()] == "json":
            _check_json_rows(split, p)
        out[split] = p
    return out


def _check_json_rows(split: str, path: Path) -> None:
    """A JSON file must hold one object per row: `datasets` would read bare values as a `text` column."""
    with open(path, "rb") as f:
        head = next((line.strip() for line in f if line.strip()), b"")
    if head.startswith(b"["):  # one JSON array: its rows are its items
        try:
            rows = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return  # reported with its line number when the file is read
        first = next((r for r in rows if not isinstance(r, dict)), None) if isinstance(rows, list) else rows
    else:  # JSON lines: the first row shows the layout
        try:
            first = json.loads(head)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return
    if first is not None and not isinstance(first, dict):
        raise DataSourceError(
            f"files[{split!r}]: {path} holds a JSON {type(first).__name__} ({str(first)[:40]!r}) where a row "
            'should be; write one object per row, e.g. {"dialogue": "...", "summary": "..."} '
            "(a JSON array of objects or one object per line)"
        )


def source_identity(cfg: DataConfig) -> dict[str, Any]:
    """What identifies the input data, for the fingerprint (file contents, Hub name+revision, demo params)."""
    if cfg.source == "files":
        return {
            "kind": "files",
            "files": {s: {"path": str(p), "sha256": sha256_file(p)} for s, p in _resolved_files(cfg).items()},
        }
    if cfg.source == "hub":
        return {"kind": "hub", "name": cfg.hub_name, "config": cfg.hub_config, "revision": cfg.hub_revision}
    return {"kind": "demo", **_demo_params(cfg)}


def write_demo_corpus(cfg: DataConfig, root: Path) -> dict[str, Path]:
    """Generate the demo corpus once per parameter set into `<root>/demo-corpus-<hash>/<split>.jsonl`."""
    params = _demo_params(cfg)
    key = sha256_json(params)[:12]
    final = root / f"demo-corpus-{key}"
    paths = {s: final / f"{s}.jsonl" for s in SPLITS}
    if all(p.is_file() for p in paths.values()):
        return paths
    sizes = [params[s] for s in SPLITS]
    rows = demo_corpus.generate(sum(sizes), params["seed"])
    # Written under a temporary name and renamed, so a crash never leaves a partial corpus.
    tmp = root / f".tmp-demo-corpus-{key}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    start = 0
    for split, n in zip(SPLITS, sizes, strict=True):
        with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows[start : start + n]:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        start += n
    publish_dir(tmp, final)  # another process may have finished the same corpus first: identical content
    return paths


def _utf8_error(data: bytes) -> str | None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return f"not UTF-8 text (line {line}, byte offset {e.start}: {e.reason})"
    return None


def _locate_json_error(path: Path) -> str | None:
    """Line and reason of the first JSON problem in `path` (a JSON document or JSON lines)."""
    data = path.read_bytes()
    if (bad := _utf8_error(data)) is not None:
        return bad
    text = data.decode("utf-8")
    if text.lstrip().startswith("["):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            return f"line {e.lineno}, column {e.colno}: {e.msg}"
        if not all(isinstance(r, dict) for r in doc):
            return "the JSON array must hold one object per row"
        return None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {lineno}, column {e.colno}: {e.msg}"
        if not isinstance(row, dict):
            return f"line {lineno}: expected a JSON object per line, got {type(row).__name__}"
    return None


def _root_cause(e: BaseException) -> BaseException:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return e


def load_file(split: str, path: Path, cache_dir: Path) -> datasets.Dataset:
    """One .json/.jsonl/.csv/.parquet file as a Dataset; a file that cannot be read is a DataSourceError
    naming the split, the file and why (for JSON the line and the parser's message)."""
    fmt = FILE_FORMATS[path.suffix.lower()]
    if fmt != "parquet":
        data = path.read_bytes()
        if not data.strip():
            raise DataSourceError(f"split {split!r} is empty: {path} has no rows")
        # pyarrow stores invalid UTF-8 without complaint and fails only when rows are read later.
        if (bad := _utf8_error(data)) is not None:
            raise DataSourceError(f"split {split!r}: cannot read {path} as {fmt}: {bad}")
    try:
        return datasets.load_dataset(
            fmt, data_files={split: str(path)}, split=split, cache_dir=str(cache_dir)
        )
    except Exception as e:  # the builders raise many types; all mean "cannot read this file"
        where = _locate_json_error(path) if fmt == "json" else None
        why = where or f"{type(_root_cause(e)).__name__}: {_root_cause(e)}"
        raise DataSourceError(f"split {split!r}: cannot read {path} as {fmt}: {why}") from e


def load_hub(name: str, config: str | None, revision: str | None) -> datasets.DatasetDict:
    """A Hub data set: its configuration (subset) `config` at `revision` (branch, tag or commit)."""
    try:
        return datasets.load_dataset(name, config, revision=revision)
    except Exception as e:  # network, unknown name/config/revision: all mean "cannot load it"
        raise DataSourceError(
            f"cannot load Hub data set hub_name={name!r} hub_config={config!r} "
            f"hub_revision={revision!r}: {type(e).__name__}: {e}"
        ) from e


def load_splits(cfg: DataConfig, root: Path) -> tuple[dict[str, datasets.Dataset], dict[str, str]]:
    """The splits as given by the source, and where each came from (path or Hub split)."""
    cache_dir = root / "hf_cache"
    if cfg.source == "hub":
        dd = load_hub(cfg.hub_name, cfg.hub_config, cfg.hub_revision)
        if "train" not in dd:
            raise DataSourceError(f"Hub data set {cfg.hub_name!r} has no 'train' split; it has {list(dd)}")
        splits = {s: dd[s] for s in SPLITS if s in dd}
        where = f"hub:{cfg.hub_name}" + (f":{cfg.hub_config}" if cfg.hub_config else "") + (
            f"@{cfg.hub_revision}" if cfg.hub_revision else "")
        return splits, {s: f"{where}[{s}]" for s in splits}
    paths = write_demo_corpus(cfg, root) if cfg.source == "demo" else _resolved_files(cfg)
    splits = {s: load_file(s, p, cache_dir) for s, p in paths.items()}
    return splits, {s: str(p) for s, p in paths.items()}
