"""The typed, validated configuration of one data-preparation task.

    from lora_pipeline.data import DataConfig
    cfg = DataConfig.from_yaml("deploy/configs/data_demo_summary.yaml")
    cfg = DataConfig(name="dialogsum", source="files", files={"train": "dev.jsonl", "test": "test.jsonl"},
                     reference_columns=["summary1", "summary2", "summary3"], tokenizer="google/flan-t5-base")
    cfg.columns_for("test")   # ("dialogue", ["summary1", "summary2", "summary3"]): input and label columns

Every field is checked in `__post_init__`; errors name the field, the bad value and what is valid.
"""

from __future__ import annotations

import math
import os
import string
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from lora_module.errors import PipelineError, check_output_dir
from lora_module.user_files import read_yaml_file

SOURCES = ("demo", "hub", "files")
MODEL_TYPES = ("seq2seq", "causal")
PROMPT_FORMATS = ("template", "chat")
ASSISTANT_LOSSES = ("all", "last")
DEMO_TASKS = ("summary", "topic")
SPLITS = ("train", "validation", "test")
FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
DEMO_TOKENIZER = "demo"
# Fields that do not change the prepared rows, so they stay out of the fingerprint.
NOT_HASHED = ("name", "num_proc", "output_root")

SUMMARY_TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "
TOPIC_TEMPLATE = "What is the topic of the following conversation?\n\n{dialogue}\n\nTopic: "
# A template is chosen by target column when none is given; anything else gets the summary one.
DEFAULT_TEMPLATES = {"summary": SUMMARY_TEMPLATE, "topic": TOPIC_TEMPLATE}


class DataConfigError(PipelineError, ValueError):
    """A data config field holds a value that is not allowed."""


def template_fields(template: str) -> list[str]:
    """The named placeholders of a `str.format` template, in order of first use."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise DataConfigError(f"prompt_template {template!r} is not a valid format string: {e}") from e
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conv:
            raise DataConfigError(
                f"prompt_template placeholder {{{name}}} uses a conversion or format spec "
                f"({'!' + conv if conv else ''}{':' + spec if spec else ''}) or is not a name: "
                "use plain named placeholders like {dialogue} (column names)"
            )
        if name not in names:
            names.append(name)
    return names


def default_output_root() -> Path:
    """`.lora_pipeline/data` under the working directory: the data folder of the default pipeline home.

    Callers with a pipeline home pass its folder instead (`output_root=str(home.data_dir)`).
    """
    return Path.cwd() / ".lora_pipeline" / "data"


@dataclass
class DataConfig:
    """What to load, how to validate, template and tokenize it, and where the prepared folder goes."""

    name: str = "demo_summary"
    """Task name; the prepared folder is `<output_root>/<name>-<fingerprint[:12]>`."""
    source: str = "demo"
    """Where rows come from: "demo" (generated corpus), "hub" (Hugging Face Hub name) or "files"."""
    hub_name: str | None = None
    """Hub data set name (source="hub"), e.g. "knkarthick/dialogsum"."""
    hub_config: str | None = None
    """Hub data set configuration name, if the data set has several."""
    hub_revision: str | None = None
    """Hub revision (branch, tag or commit) to pin; part of the fingerprint."""
    files: dict[str, str] | None = None
    """source="files": split -> path (.json/.jsonl/.csv/.parquet, relative to cwd); needs "train"."""
    demo_task: str = "summary"
    """source="demo": which column is the target, "summary" or "topic"."""
    demo_train_size: int = 3000
    """source="demo": generated training rows."""
    demo_validation_size: int = 300
    """source="demo": generated validation rows."""
    demo_test_size: int = 300
    """source="demo": generated test rows."""
    demo_seed: int = 0
    """source="demo": generator seed (same seed, same corpus)."""
    input_column: str = "dialogue"
    """Column holding the source text; rows where it is empty or not a string are dropped."""
    target_column: str | None = None
    """Column holding the train/validation target (default: demo_task for the demo, else "summary")."""
    reference_columns: list[str] | None = None
    """Test-split reference columns, first one gives the labels (default: [target_column])."""
    split_columns: dict[str, dict[str, Any]] | None = None
    """Per-split column names where a split's file differs, e.g. {test: {input_column: conversation}}."""
    group_test_references: bool = False
    """Merge test rows sharing one input into one row whose references are all their targets (each input
    is then generated once and bootstrapped as one example). How several references score is the
    evaluation protocol's choice (`lora_module.evaluation.protocol`): `one-reference-per-row` gives the
    numbers of the ungrouped split, `best-reference` the best of them."""
    prompt_template: str | None = None
    """str.format template; placeholders are column names (default: by target column, reads input_column;
    prompt_format chat: none, the input is the user turn as it is)."""
    prompt_format: str = "template"
    """"template" (prompt_template's text) or "chat" (the tokenizer's chat template; causal models only)."""
    system_prompt: str | None = None
    """prompt_format chat: a system turn put first (conversations with their own system turn keep theirs)."""
    messages_column: str | None = None
    """prompt_format chat: column of conversations ([{role, content}] or ShareGPT [{from, value}]) ending
    with an assistant turn; replaces input/target columns (the last assistant turn is the reference)."""
    assistant_loss: str = "all"
    """prompt_format chat: learn every assistant turn ("all") or only the last one ("last")."""
    validation_size: int | float = 0.1
    """Rows carved from train when no validation split is given: fraction (<1) or count (>=1)."""
    test_size: int | float = 0.1
    """Rows carved from train when no test split is given: fraction (<1) or count (>=1)."""
    seed: int = 42
    """Seed for carving validation/test splits out of train."""
    max_source_length: int = 512
    """Prompt tokens kept (seq2seq: right-truncated; causal: the prompt's last tokens are kept)."""
    max_target_length: int = 128
    """Target tokens kept (including the end-of-sequence token)."""
    tokenizer: str = DEMO_TOKENIZER
    """Tokenizer name or local folder; "demo" trains a byte-level BPE on the train split."""
    tokenizer_vocab_size: int = 2000
    """Vocabulary size of the "demo" tokenizer (ignored otherwise)."""
    model_type: str | None = None
    """"seq2seq" (labels = target ids) or "causal" (prompt + target, prompt masked with -100); default: the
    base's (the tokenizer location's AutoConfig is_encoder_decoder), else "seq2seq"; checked against it."""
    num_proc: int | None = None
    """Worker processes for tokenization (None: in-process)."""
    output_root: str | None = None
    """Folder that holds prepared folders (default ./.lora_pipeline/data; flows pass their home's data/)."""

    def __post_init__(self) -> None:
        self._check_choice("source", self.source, SOURCES)
        if self.model_type is not None:
            self._check_choice("model_type", self.model_type, MODEL_TYPES)
        self._check_choice("prompt_format", self.prompt_format, PROMPT_FORMATS)
        self._check_choice("assistant_loss", self.assistant_loss, ASSISTANT_LOSSES)
        self._check_choice("demo_task", self.demo_task, DEMO_TASKS)
        if not isinstance(self.name, str) or not self.name or any(c in self.name for c in "/\\ \t\n"):
            raise DataConfigError(
                f"name must be a non-empty string without slashes or spaces, got {self.name!r}"
            )
        if self.source == "hub" and not self.hub_name:
            raise DataConfigError("hub_name is required when source='hub' (e.g. 'knkarthick/dialogsum')")
        if self.source == "files":
            self._check_files()
        elif self.files:
            raise DataConfigError(f"files is only used with source='files', got source={self.source!r}")
        for f in ("demo_train_size", "demo_validation_size", "demo_test_size"):
            self._check_int(f, getattr(self, f), minimum=1)
        for f in ("demo_seed", "seed"):
            self._check_int(f, getattr(self, f), minimum=0)
        self._check_int("max_source_length", self.max_source_length, minimum=4)
        self._check_int("max_target_length", self.max_target_length, minimum=2)
        self._check_int("tokenizer_vocab_size", self.tokenizer_vocab_size, minimum=300)
        if self.num_proc is not None:
            self._check_int("num_proc", self.num_proc, minimum=1)
        for f in ("validation_size", "test_size"):
            v = getattr(self, f)
            if (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0
                    or (v >= 1 and v != int(v))):
                raise DataConfigError(
                    f"{f} must be a fraction in (0, 1) or a whole row count >= 1, got {v!r}"
                )
        if not isinstance(self.group_test_references, bool):  # YAML's "no" (quoted) is a true string
            raise DataConfigError(
                f"group_test_references must be true or false, got {self.group_test_references!r}")
        for f in ("input_column", "tokenizer"):
            if not isinstance(getattr(self, f), str) or not getattr(self, f):
                raise DataConfigError(f"{f} must be a non-empty string, got {getattr(self, f)!r}")

        if self.target_column is None:
            self.target_column = self.demo_task if self.source == "demo" else "summary"
        if self.source == "demo" and self.target_column != self.demo_task:
            raise DataConfigError(
                f"target_column={self.target_column!r} disagrees with demo_task={self.demo_task!r}: "
                f"with source='demo' the target column is the demo task, one of {DEMO_TASKS}"
            )
        if self.reference_columns is None:
            self.reference_columns = [self.target_column]
        if (
            not isinstance(self.reference_columns, list)
            or not self.reference_columns
            or not all(isinstance(c, str) and c for c in self.reference_columns)
        ):
            raise DataConfigError(
                f"reference_columns must be a non-empty list of column names, got {self.reference_columns!r}"
            )
        self._check_split_columns()
        self._check_chat()
        self._check_template()

    def _check_chat(self) -> None:
        """Chat fields only with prompt_format chat, which needs a causal model (`prepare` checks the
        tokenizer's chat template and the base's model type before any work)."""
        if self.prompt_format != "chat":
            given = [f for f in ("system_prompt", "messages_column") if getattr(self, f) is not None]
            given += ["assistant_loss"] if self.assistant_loss != "all" else []
            if given:
                raise DataConfigError(f"{given} only apply with prompt_format='chat', got "
                                      f"prompt_format={self.prompt_format!r}")
            return
        if self.model_type == "seq2seq":
            raise DataConfigError("prompt_format='chat' needs model_type='causal' (a decoder-only chat "
                                  "model), got model_type='seq2seq'")
        for f in ("system_prompt", "messages_column"):
            value = getattr(self, f)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise DataConfigError(f"{f} must be a non-empty string or null, got {value!r}")
        if self.messages_column and self.prompt_template is not None:
            raise DataConfigError("prompt_template is not used with messages_column (the conversation is the "
                                  "prompt): remove one of them")

    def _check_split_columns(self) -> None:
        """split_columns: known splits and keys, each valid for its split, values like the top-level ones."""
        if self.split_columns is None:
            return
        if not isinstance(self.split_columns, dict):
            raise DataConfigError(f"split_columns must map split names {list(SPLITS)} to column settings, "
                                  f"got {self.split_columns!r}")
        for split, cols in self.split_columns.items():
            if split not in SPLITS:
                raise DataConfigError(
                    f"split_columns has unknown split {split!r}; valid splits are {list(SPLITS)}")
            labels = "reference_columns" if split == "test" else "target_column"
            valid = ("input_column", labels)
            if not isinstance(cols, dict) or not cols or set(cols) - set(valid):
                raise DataConfigError(
                    f"split_columns[{split!r}]={cols!r}: give a mapping with keys among {list(valid)} "
                    "(the test split is scored on reference_columns, train/validation learn target_column)"
                )
            for key, value in cols.items():
                ok = (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)
                      if key == "reference_columns" else isinstance(value, str) and value)
                if not ok:
                    kind = "a non-empty list of column names" if key == "reference_columns" else "a name"
                    raise DataConfigError(f"split_columns[{split!r}][{key!r}] must be {kind}, got {value!r}")

    def columns_for(self, split: str) -> tuple[str, list[str]]:
        """(input column, label columns) of `split`'s file: the test split's label columns are its
        references (the first gives the labels), the others' is the target; split_columns overrides."""
        own = (self.split_columns or {}).get(split, {})
        labels = own.get("reference_columns", self.reference_columns) if split == "test" else [
            own.get("target_column", self.target_column)]
        return own.get("input_column", self.input_column), list(labels)

    def _check_template(self) -> None:
        """Default the template by target column; it must read the input column and no target column."""
        if self.prompt_template is None and self.prompt_format == "chat":
            return  # the raw input is the user turn
        if self.prompt_template is None:  # the default template reads whatever the input column is called
            default = DEFAULT_TEMPLATES.get(self.target_column, SUMMARY_TEMPLATE)
            self.prompt_template = default.replace("{dialogue}", "{" + self.input_column + "}")
        if not isinstance(self.prompt_template, str):
            raise DataConfigError(f"prompt_template must be a string, got {self.prompt_template!r}")
        placeholders = template_fields(self.prompt_template)
        if self.input_column not in placeholders:
            raise DataConfigError(
                f"prompt_template must contain the input column as {{{self.input_column}}}; "
                f"its placeholders are {placeholders}"
            )
        labels = {c for split in SPLITS for c in self.columns_for(split)[1]}
        leaks = sorted((labels | {self.target_column, *self.reference_columns}) & set(placeholders))
        if leaks:
            raise DataConfigError(f"prompt_template must not contain target/reference columns, found {leaks}")

    @staticmethod
    def _check_choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
        if value not in valid:
            raise DataConfigError(f"{name} must be one of {list(valid)}, got {value!r}")

    @staticmethod
    def _check_int(name: str, value: Any, minimum: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise DataConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")

    def _check_files(self) -> None:
        if not isinstance(self.files, dict) or "train" not in self.files:
            raise DataConfigError(
                f"files must map split names {list(SPLITS)} to paths and include 'train', got {self.files!r}"
            )
        for split, path in self.files.items():
            if split not in SPLITS:
                raise DataConfigError(f"files has unknown split {split!r}; valid splits are {list(SPLITS)}")
            if not isinstance(path, str | os.PathLike) or Path(path).suffix.lower() not in FILE_FORMATS:
                raise DataConfigError(
                    f"files[{split!r}]={str(path)!r} must end with one of {sorted(FILE_FORMATS)}"
                )
        self.files = {k: str(v) for k, v in self.files.items()}

    def check_paths(self) -> None:
        """Checks against the file system, made before any work: the tokenizer folder and output root."""
        tok = Path(self.tokenizer).expanduser()
        looks_local = self.tokenizer.startswith((".", "/", "~")) or self.tokenizer.count("/") > 1
        if self.tokenizer != DEMO_TOKENIZER and (looks_local or tok.exists()) and not tok.is_dir():
            found = "is a file, not a folder" if tok.exists() else "does not exist"
            raise DataConfigError(
                f"tokenizer={self.tokenizer!r}: {found}; give a tokenizer folder (written by "
                "save_pretrained), a Hub name such as 'google/flan-t5-base', or 'demo'"
            )
        check_output_dir(self.output_dir_root, "output_root")

    @property
    def template_columns(self) -> list[str]:
        """Columns the prompt template reads (the input column among them)."""
        return template_fields(self.prompt_template or "")

    @property
    def output_dir_root(self) -> Path:
        """The resolved output root."""
        return Path(self.output_root) if self.output_root else default_output_root()

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain data (round-trips through `from_dict`)."""
        return asdict(self)

    def hash_dict(self) -> dict[str, Any]:
        """The fields that change the prepared output (name, num_proc and output_root do not)."""
        d = self.to_dict()
        for k in NOT_HASHED:
            d.pop(k)
        return d

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """Build from a mapping; unknown keys are an error that lists the valid ones."""
        if not isinstance(d, dict):
            raise DataConfigError(
                f"a data config must be a mapping of field -> value, got {type(d).__name__}"
            )
        valid = cls.field_names()
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise DataConfigError(f"unknown data config keys {unknown}; valid keys are {valid}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> DataConfig:
        """Read a YAML mapping (optionally nested under a top-level `data:` key), then apply `overrides`."""
        p = Path(path)
        d = read_yaml_file(p, "data config file", DataConfigError)
        if isinstance(d, dict) and set(d) == {"data"}:
            d = d["data"]
        if overrides and isinstance(d, dict):
            d = {**d, **overrides}
        try:
            return cls.from_dict(d)
        except DataConfigError as e:
            raise DataConfigError(f"{p}: {e}") from e
