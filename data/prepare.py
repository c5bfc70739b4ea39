"""The data stage: load, validate, template, tokenize and save once; later calls reuse the folder.

    from lora_pipeline.data import DataConfig, prepare, load_prepared, load_tokenizer
    prepared = prepare(DataConfig(name="demo_summary"))  # PreparedData(path, fingerprint, manifest, reused)
    dataset, manifest = load_prepared(prepared.path)
    tokenizer = load_tokenizer(prepared.path)

The folder `<output_root>/<name>-<fingerprint[:12]>/` holds `dataset/` (save_to_disk), `tokenizer/`
and `manifest.json`. The fingerprint hashes the source data (file contents, Hub name+revision or demo
parameters), every config field that changes the output, the tokenizer (its files' contents or its
name) and the code that builds it (every project file this module imports, lora_module.prompt's
truncation among them). The folder is built under a temporary name and renamed when complete, so a
crash never leaves a folder that looks finished.

Before any work `prepare` settles the model type (`model_type.resolve_model_type`: the base's, and a
declared one that disagrees with it is an error) and, for prompt_format chat, loads the tokenizer to
check it has a chat template; that template's text is part of the tokenizer's identity in the
fingerprint (also for a Hub name), so a changed template prepares the data again.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import datasets
from transformers import AutoTokenizer

from lora_module.code_identity import code_fingerprint
from lora_module.contracts import MANIFEST_FILE, PREPARED_TOKENIZER_DIR, TOKENIZER_FILES
from lora_module.errors import InputNotFoundError
from lora_module.files import move_aside, publish_dir, sha256_file, sha256_json, write_json_atomic
from lora_module.prompt import chat_template_of, check_chat_tokenizer
from lora_pipeline.data import encode, sources, validate
from lora_pipeline.data import tokenizer as demo_tokenizer
from lora_pipeline.data.config import DEFAULT_TEMPLATES, DEMO_TOKENIZER, DataConfig, DataConfigError
from lora_pipeline.data.model_type import resolve_model_type

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# The code whose import closure the fingerprint hashes: this module and all it runs (sources, validation,
# encoding, lora_module.prompt's templating and truncation, ...).
DATA_CODE = ("lora_pipeline.data.prepare",)
# Files worth hashing in a local tokenizer folder: the tokenizer's and the model config beside them
# (model weights are skipped on purpose).
_TOKENIZER_FILES = (*TOKENIZER_FILES, "config.json", "chat_template.jinja", "chat_template.json")


@dataclass
class PreparedData:
    """A prepared folder: where it is, its fingerprint, its manifest, and whether it was reused."""

    path: Path
    fingerprint: str
    manifest: dict
    reused: bool

    def load(self) -> datasets.DatasetDict:
        return load_prepared(self.path)[0]

    def tokenizer(self) -> Any:
        return load_tokenizer(self.path)


def tokenizer_identity(cfg: DataConfig) -> dict[str, Any]:
    """What identifies the tokenizer: the demo recipe, a local folder's file hashes, or a Hub name."""
    style = cfg.model_type
    if cfg.tokenizer == DEMO_TOKENIZER:
        return {
            "kind": "demo",
            "vocab_size": cfg.tokenizer_vocab_size,
            "style": style,
            "code": sources.module_sha256(demo_tokenizer),
        }
    p = Path(cfg.tokenizer).expanduser()
    if p.is_dir():
        files = {f.name: sha256_file(f) for f in sorted(p.iterdir()) if f.name in _TOKENIZER_FILES}
        if not files:
            raise DataConfigError(
                f"tokenizer={cfg.tokenizer!r}: folder has none of {list(_TOKENIZER_FILES)}; give a folder "
                "written by save_pretrained, a Hub name or 'demo'"
            )
        return {"kind": "local", "files": files}
    return {"kind": "hub", "name": cfg.tokenizer}


def fingerprint(cfg: DataConfig, chat_template: str | None = None) -> tuple[str, dict[str, Any]]:
    """(hex fingerprint, source identity) for `cfg` (and the chat template it renders with, if any);
    computing it loads no data."""
    source = sources.source_identity(cfg)
    key = {
        "format": FORMAT_VERSION,
        "code": code_fingerprint(DATA_CODE),
        "source": source,
        "config": cfg.hash_dict(),
        "tokenizer": tokenizer_identity(cfg),
    }
    if chat_template is not None:
        key["chat_template"] = chat_template
    return sha256_json(key), source


def _chat_template(cfg: DataConfig) -> str | None:
    """prompt_format chat: the tokenizer's chat template (an error before any work when it has none)."""
    if cfg.prompt_format != "chat":
        return None
    if cfg.tokenizer == DEMO_TOKENIZER:
        raise DataConfigError("prompt_format='chat' needs a tokenizer with a chat template; tokenizer='demo' "
                              "has none: give the chat model's folder or Hub name (flows pass the base's)")
    tokenizer = _load_named_tokenizer(cfg)
    check_chat_tokenizer(tokenizer, f"tokenizer={cfg.tokenizer!r}")
    return chat_template_of(tokenizer)


def _demo_tokenizer_texts(cfg: DataConfig, train: datasets.Dataset) -> list[str]:
    """Train-split texts for the demo tokenizer: all text columns the tasks use, plus the templates."""
    train_input, train_labels = cfg.columns_for("train")
    columns = {cfg.input_column, cfg.target_column, *cfg.reference_columns, *cfg.template_columns,
               train_input, *train_labels}
    if cfg.source == "demo":  # one tokenizer for both demo tasks, so one base model serves both
        columns |= {"summary", "topic"}
    texts = []
    for c in sorted(columns & set(train.column_names)):
        texts.extend(v for v in train[c] if isinstance(v, str) and v.strip())
    # The fixed template words should become whole tokens; repeating the literal gives them weight.
    for template in sorted({cfg.prompt_template, *DEFAULT_TEMPLATES.values()}):
        texts.extend([template.format_map(_Blank())] * 50)
    return texts


class _Blank(dict):
    """format_map mapping that renders every placeholder as an empty string."""

    def __missing__(self, key: str) -> str:
        return ""


def _load_named_tokenizer(cfg: DataConfig) -> Any:
    """The tokenizer `cfg.tokenizer` names (a folder or Hub name); one-line error when it cannot load."""
    try:
        return AutoTokenizer.from_pretrained(cfg.tokenizer)
    except Exception as e:
        raise DataConfigError(f"tokenizer={cfg.tokenizer!r}: cannot load it: {type(e).__name__}: {e}") from e


def _build_tokenizer(cfg: DataConfig, train: datasets.Dataset, root: Path) -> tuple[Any, str]:
    """Load the configured tokenizer, or train (once, cached under root/tokenizers) the demo one."""
    if cfg.tokenizer != DEMO_TOKENIZER:
        return _load_named_tokenizer(cfg), cfg.tokenizer
    texts = _demo_tokenizer_texts(cfg, train)
    recipe = [cfg.tokenizer_vocab_size, cfg.model_type, sources.module_sha256(demo_tokenizer), texts]
    key = sha256_json(recipe)[:12]
    cached = root / "tokenizers" / f"demo-{cfg.model_type}-{key}"
    if not (cached / "tokenizer.json").is_file():
        tmp = cached.with_name(f".tmp-{cached.name}-{uuid.uuid4().hex[:8]}")
        demo_tokenizer.train_tokenizer(texts, tmp, cfg.tokenizer_vocab_size, cfg.model_type)
        publish_dir(tmp, cached)  # a complete copy made meanwhile wins
    return AutoTokenizer.from_pretrained(cached), str(cached)


def read_manifest(path: str | Path) -> dict | None:
    """The manifest of a complete prepared folder, else None."""
    p = Path(path)
    try:
        manifest = json.loads((p / MANIFEST_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    complete = (p / "dataset" / "dataset_dict.json").is_file() and (p / PREPARED_TOKENIZER_DIR).is_dir()
    return manifest if complete and manifest.get("complete") else None


def _versions() -> dict[str, str | None]:
    out = {}
    for lib in ("datasets", "transformers", "tokenizers"):
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def prepare(config: DataConfig | dict | str | Path) -> PreparedData:
    """Prepare `config`'s data (or reuse the folder with the same fingerprint) and describe it.

    `config` may also be a dict of DataConfig fields or the path of a YAML file holding them.
    """
    if isinstance(config, dict):
        config = DataConfig.from_dict(config)
    elif isinstance(config, str | Path):
        config = DataConfig.from_yaml(config)
    config.check_paths()  # a missing tokenizer folder or an output root under a file: fail before any work
    config = resolve_model_type(config)
    root = config.output_dir_root
    fp, source = fingerprint(config, _chat_template(config))
    final = root / f"{config.name}-{fp[:12]}"
    manifest = read_manifest(final)
    if manifest is not None and manifest.get("fingerprint") == fp:
        return PreparedData(final, fp, manifest, reused=True)
    if final.exists():
        # Not ours to delete (maybe someone's half copy): keep it aside and build a fresh one.
        aside = move_aside(final)
        log.warning("prepared folder %s was incomplete; moved it to %s and rebuilding", final, aside)
    manifest = _build(config, root, fp, source, final)
    return PreparedData(final, fp, read_manifest(final) or manifest, reused=False)


def _padded_tokenizer(cfg: DataConfig, train: datasets.Dataset, root: Path) -> tuple[Any, str, list[str]]:
    """(tokenizer, where it came from, notes): `_build_tokenizer`'s, given a pad token if it had none."""
    tok, tok_path = _build_tokenizer(cfg, train, root)
    notes = []
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        notes.append(f"tokenizer had no pad token; set pad_token = eos_token ({tok.eos_token!r})")
    return tok, tok_path, notes


def _build(config: DataConfig, root: Path, fp: str, source: dict[str, Any], final: Path) -> dict[str, Any]:
    """Load, validate, tokenize and save into a temporary folder, then publish it as `final`; the manifest."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(stage: str) -> None:
        timings[stage] = round(time.perf_counter() - t0 - sum(timings.values()), 3)

    raw, origins = sources.load_splits(config, root)
    lap("load")
    clean = validate.validate_splits(raw, config, origins)
    lap("validate")
    root.mkdir(parents=True, exist_ok=True)  # only now: data that fails validation leaves no output folder
    tok, tok_path, notes = _padded_tokenizer(config, raw["train"], root)
    lap("tokenizer")
    dd, truncation, lengths = encode.tokenize_splits(clean.rows, tok, config, fp)
    lap("tokenize")

    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        dd.save_to_disk(str(tmp / "dataset"))
        tok.save_pretrained(tmp / PREPARED_TOKENIZER_DIR)
        lap("save")
        manifest = {
            "fingerprint": fp,
            "name": config.name,
            "model_type": config.model_type,
            "tokenizer": config.tokenizer,
            "tokenizer_source": tok_path,
            "tokenizer_notes": notes,
            "rows": {s: dd[s].num_rows for s in dd},
            "drops": clean.drops,
            "leakage": clean.leakage,
            "truncation": truncation,
            "lengths": lengths,
            # Training, evaluation and serving read the prompt template and length limits from here.
            "config": config.to_dict(),
            "sources": {
                **source,
                "origins": origins,
                "rows_loaded": {s: d.num_rows for s, d in raw.items()},
                "carved_from_train": clean.carved,
            },
            "columns": dd["train"].column_names,
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.perf_counter() - t0, 3),
            "timings": timings,
            "complete": True,
        }
        # The manifest is written last: its presence (with "complete") marks a finished folder.
        write_json_atomic(tmp / MANIFEST_FILE, manifest)
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def load_prepared(path: str | Path) -> tuple[datasets.DatasetDict, dict]:
    """(DatasetDict, manifest) of a prepared folder; a clear error if it is not a complete one."""
    p = Path(path)
    manifest = read_manifest(p)
    if manifest is None:
        raise InputNotFoundError(
            f"{p} is not a complete prepared data folder (needs {MANIFEST_FILE} with complete=true, "
            f"dataset/, {PREPARED_TOKENIZER_DIR}/); run `lora-pipeline prepare --config FILE` first"
        )
    return datasets.load_from_disk(str(p / "dataset")), manifest


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved in a prepared folder (`<path>/tokenizer`)."""
    tok_dir = Path(path) / PREPARED_TOKENIZER_DIR
    if not tok_dir.is_dir():
        raise InputNotFoundError(f"no tokenizer/ folder in {path}: not a prepared data folder")
    return AutoTokenizer.from_pretrained(tok_dir)
