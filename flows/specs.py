"""Task specs: what one pipeline task is (data config, training configs, decoding, registry name).

    from lora_pipeline.flows.specs import load_task_spec, known_tasks
    spec = load_task_spec("summary")                 # deploy/tasks/summary.yaml
    spec = load_task_spec("path/to/my_task.yaml")    # any spec file
    problems = check_task_spec(spec)                 # [] when every file and config is valid

A spec is a small YAML file; relative paths in it resolve against the spec's folder, then the folder
holding the shipped `deploy/` package (the repository root in a checkout, `site-packages/lora_pipeline`
installed; so `deploy/configs/x.yaml` names the shipped config in both), then the working
directory. Shipped specs are found by name in the package's `deploy/tasks/`, whatever the working
directory. Checking a spec parses every config it names (data, training, generation) without
building anything, so a bad value fails a flow before any data is prepared or any model trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lora_module.errors import PipelineError
from lora_module.evaluation.metrics import metric_names
from lora_module.evaluation.protocol import EvalProtocol, ProtocolError, resolve_protocol
from lora_module.names import check_name
from lora_module.user_files import read_yaml_file
from lora_pipeline.deploy import SHIPPED_ROOT, TASKS_DIR

DEMO_BASE = "demo"
DEMO_BASES = {DEMO_BASE: "seq2seq", "demo-causal": "causal"}
"""base_model names of the built demo bases, with their family (lora_module.training.demo_base)."""


class TaskSpecError(PipelineError, ValueError):
    """A task spec (or a file or config it names) is missing or invalid."""


@dataclass
class TaskSpec:
    """One task of the pipeline: where its data and configs are and how it is evaluated and registered."""

    name: str
    """Task name (registered model `<name>-lora` unless `registry_model` is given)."""
    data_config: str
    """Data-preparation YAML (data.DataConfig)."""
    lora_config: str
    """Training YAML of the adapter run (finetune: lora or qlora)."""
    base_model: str
    """Base model: a Hub name, a local `save_pretrained` folder, "demo" (the built demo T5) or
    "demo-causal" (the built demo Llama with a chat template)."""
    full_config: str | None = None
    """Training YAML of the full fine-tuning baseline; None skips it."""
    generation: dict[str, Any] = field(default_factory=dict)
    """lora_module.evaluation.generation.GenerationConfig fields used for every evaluation of the task."""
    eval_limit: int | None = None
    """Evaluate on the first N test rows only (None: the whole test split)."""
    data_overrides: dict[str, Any] = field(default_factory=dict)
    """DataConfig fields that replace the data YAML's values."""
    train_overrides: list[str] = field(default_factory=list)
    """Extra Lightning CLI arguments for both training runs, e.g. ["--trainer.max_steps", "100"]."""
    lora_overrides: list[str] = field(default_factory=list)
    """Extra Lightning CLI arguments for the adapter run only (after train_overrides)."""
    full_overrides: list[str] = field(default_factory=list)
    """Extra Lightning CLI arguments for the full fine-tuning run only (after train_overrides)."""
    registry_model: str | None = None
    """Registered model name (default `<name>-lora`)."""
    metric: str = "rougeL"
    """Metric the promotion gate compares and the rank sweep recommends by: a name in the metric
    registry (`lora_module.evaluation.metrics`: rougeL, rouge1, chrf, bleu, loss, ...)."""
    protocol: str | dict[str, Any] | None = None
    """Evaluation protocol: a preset name (`best-reference`, `one-reference-per-row`, `first-reference`)
    or `{name: PRESET, tokenizer: unicode, ...}`; None: `best-reference`."""
    source: str | None = None
    """The spec file it was read from (filled in by load_task_spec)."""

    def __post_init__(self) -> None:
        name = check_name("task name", self.name, TaskSpecError)
        if self.registry_model is not None:
            check_name(f"task {name!r}: registry_model", self.registry_model, TaskSpecError)

        def bad(key: str, valid: str) -> TaskSpecError:
            return TaskSpecError(f"task {name!r}: {key} must be {valid}, got {getattr(self, key)!r}")

        for key in ("data_config", "lora_config", "base_model"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise bad(key, "a non-empty string")
        if self.full_config is not None and not isinstance(self.full_config, str):
            raise bad("full_config", "a path or null")
        if not isinstance(self.generation, dict):
            raise bad("generation", "a mapping of GenerationConfig fields")
        if not isinstance(self.data_overrides, dict):
            raise bad("data_overrides", "a mapping of DataConfig fields")
        for key in ("train_overrides", "lora_overrides", "full_overrides"):
            args = getattr(self, key)
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                raise bad(key, "a list of CLI argument strings")
        limit = self.eval_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise bad("eval_limit", "an integer >= 1 or null")
        if self.metric not in metric_names():
            raise bad("metric", f"a registered metric, one of {list(metric_names())}")
        try:
            self.eval_protocol()
        except ProtocolError as e:
            raise TaskSpecError(f"task {name!r}: protocol: {e}") from e

    @property
    def model_name(self) -> str:
        """The registered model this task's adapters become versions of."""
        from lora_module.registry.tracking import model_name_for  # here: the registry imports MLflow

        return self.registry_model or model_name_for(self.name)

    def eval_protocol(self) -> EvalProtocol:
        """The task's evaluation protocol (scoring settings; evaluation adds the decoding)."""
        return resolve_protocol(self.protocol)

    def training_overrides(self, kind: str) -> list[str]:
        """The run-specific overrides of `kind` ("lora" or "full")."""
        return self.lora_overrides if kind == "lora" else self.full_overrides

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskSpec:
        """Build from a mapping; unknown keys are an error that lists the valid ones."""
        if not isinstance(d, dict):
            raise TaskSpecError(f"a task spec must be a mapping of field -> value, got {type(d).__name__}")
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise TaskSpecError(f"unknown task spec keys {unknown}; valid keys are {valid}")
        missing = [k for k in ("name", "data_config", "lora_config", "base_model") if k not in d]
        if missing:
            raise TaskSpecError(f"task spec lacks required keys {missing}")
        return cls(**d)


def known_tasks(tasks_dir: Path = TASKS_DIR) -> list[str]:
    """Names of the task specs shipped in deploy/tasks/."""
    return sorted(p.stem for p in tasks_dir.glob("*.yaml"))


def load_task_spec(task: str, tasks_dir: Path = TASKS_DIR) -> TaskSpec:
    """Read a task by name (deploy/tasks/<name>.yaml) or by spec file path; resolves its paths."""
    path = Path(task)
    if path.suffix not in (".yaml", ".yml"):
        path = tasks_dir / f"{task}.yaml"
        if not path.is_file():
            raise TaskSpecError(
                f"unknown task {task!r}; known tasks are {known_tasks(tasks_dir)} "
                f"(or pass the path of a task spec .yaml)"
            )
    try:
        raw = read_yaml_file(path, "task spec file", TaskSpecError)
    except PipelineError as e:  # missing, a folder, a FIFO, not UTF-8: one problem of the run's list
        raise TaskSpecError(str(e)) from None
    try:
        spec = TaskSpec.from_dict(raw)
    except TaskSpecError as e:
        raise TaskSpecError(f"{path}: {e}") from e
    spec.source = str(path.resolve())
    base = path.resolve().parent
    spec.data_config = resolve_path(spec.data_config, base, f"task {spec.name!r}: data_config")
    spec.lora_config = resolve_path(spec.lora_config, base, f"task {spec.name!r}: lora_config")
    if spec.full_config:
        spec.full_config = resolve_path(spec.full_config, base, f"task {spec.name!r}: full_config")
    if spec.base_model not in DEMO_BASES and _looks_local(spec.base_model):
        what = f"task {spec.name!r}: base_model"
        spec.base_model = resolve_path(spec.base_model, base, what, kind="folder")
    return spec


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1


def resolve_path(value: str, base: Path, what: str, kind: str = "file") -> str:
    """An existing path: absolute, or relative to `base`, the shipped files' root or the working directory."""
    p = Path(value).expanduser()
    candidates = [p] if p.is_absolute() else [base / p, SHIPPED_ROOT / p, Path.cwd() / p]
    for c in candidates:
        if (c.is_file() if kind == "file" else c.is_dir()):
            return str(c.resolve())
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise TaskSpecError(f"{what}: {kind} {value!r} not found (looked at {tried})")


def check_task_spec(spec: TaskSpec, base_model: str | None = None) -> list[str]:
    """Every problem with the spec's configs, as messages naming the file and key ([] when valid).

    Parses the data config (with overrides), the generation settings and each training config (with
    overrides, through the Lightning CLI parser) without loading any data or model.
    """
    from lora_module.evaluation.generation import GenerationConfig
    from lora_module.qlora import check_model_source
    from lora_module.training.cli import ConfigParseError, parse_config
    from lora_pipeline.data import DataConfig

    problems: list[str] = []
    try:
        DataConfig.from_yaml(spec.data_config, spec.data_overrides or None)
    except (PipelineError, TypeError) as e:  # a data config file that is missing or invalid
        problems.append(f"task {spec.name!r}: data config {spec.data_config}: {e}")
    try:
        GenerationConfig.from_dict(spec.generation)
    except (PipelineError, TypeError) as e:
        problems.append(f"task {spec.name!r}: generation: {e}")
    model = base_model or spec.base_model
    if model not in DEMO_BASES:
        try:
            check_model_source(model, "base_model")
        except PipelineError as e:  # before Prefect starts, not as a failed flow's traceback
            problems.append(f"task {spec.name!r}: {e}")
    for key, kinds in (("lora_config", ("lora", "qlora")), ("full_config", ("full",))):
        path = getattr(spec, key)
        if not path:
            continue
        overrides = [*spec.train_overrides, *spec.training_overrides(key.removesuffix("_config"))]
        # The flow passes the built base and the prepared folder; parsing only needs their places
        # filled (the demo base and the data do not exist before the flow builds them).
        run_paths = ["--model.model_name_or_path", model, "--data.prepared_dir", "<prepared by the flow>"]
        try:
            config = parse_config(["--config", path, *run_paths, *overrides], quiet=True)
        except ConfigParseError as e:
            problems.append(f"task {spec.name!r}: {key} {path} with overrides {overrides} does not parse: "
                            f"{e}")
            continue
        if config.model.finetune not in kinds:
            problems.append(
                f"task {spec.name!r}: {key} {path} has model.finetune={config.model.finetune!r}; "
                f"a {key} must use one of {list(kinds)}"
            )
    return problems
