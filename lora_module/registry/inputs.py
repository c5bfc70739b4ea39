"""Read what one registration logs: adapter folder, ROUGE report, training outputs -> params,
metrics, files and version tags. No MLflow calls here except copying training loss curves.

Used by `lora_module.registry.register_adapter`; `read_inputs(...)` checks every path first, so a
bad folder fails before anything is written to the registry. Tag keys and file names come from
`lora_module.contracts`.

The prompt settings come from the adapter itself (its sidecar, written by the training export). An
adapter without them is refused unless `prepared_dir` names the prepared data it was trained on:
its manifest's settings are then written into the copy that is logged (`files_to_log`), never
into the caller's folder; an adapter or tokenizer folder of another name is logged as a copy named
as the loaders read it (`adapter`, `tokenizer`). Nothing is guessed: the tokenizer that ships is
`tokenizer_dir`, else the prepared folder's, else none (serving then takes the base model's).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_module import contracts as c
from lora_module.adapter_io import read_adapter_config, read_prompt_settings, write_prompt_settings
from lora_module.errors import AdapterLoadError, PipelineError
from lora_module.evaluation.metrics import metric_tag
from lora_module.evaluation.protocol import protocol_of
from lora_module.files import sha256_file
from lora_module.lineage import git_commit
from lora_module.names import check_name
from lora_module.prompt import PromptSettings
from lora_module.redact import redact_text, redact_uri
from lora_module.training.outputs import current_outputs

logger = logging.getLogger(__name__)

_PARAM_LIMIT = 6000  # MLflow's maximum param value length


class RegistrationInputError(PipelineError, ValueError):
    """A folder or report handed to the registry is missing, malformed or inconsistent."""


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}; lists stay leaves."""
    if not isinstance(obj, dict):
        return {prefix: obj} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def _key(text: str) -> str:
    """An MLflow-safe metric / param / tag key (letters, digits, `_ - . / space`)."""
    return re.sub(r"[^\w\-./ ]", "_", text)[:250]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RegistrationInputError(f"{what} {path} is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise RegistrationInputError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data


def resolve_adapter_dir(path: str | os.PathLike) -> Path:
    """The PEFT-format adapter folder: `path` itself or `path/adapter` (a training output)."""
    p = Path(path)
    if not (p / c.ADAPTER_CONFIG_FILE).is_file() and (p / c.ADAPTER_DIR / c.ADAPTER_CONFIG_FILE).is_file():
        p = p / c.ADAPTER_DIR
    missing = [f for f in (c.ADAPTER_CONFIG_FILE, c.ADAPTER_WEIGHTS_FILE) if not (p / f).is_file()]
    if missing:
        raise RegistrationInputError(
            f"adapter_dir {p} is not a PEFT-format adapter folder: missing {missing} (it needs "
            f"{c.ADAPTER_CONFIG_FILE} and {c.ADAPTER_WEIGHTS_FILE}, or a training output with "
            f"{c.ADAPTER_DIR}/)"
        )
    return p


@dataclass
class RegistrationInputs:
    """Everything one registration writes, computed from files before touching MLflow."""

    task: str
    adapter_dir: Path
    report_path: Path | None
    train_dir: Path | None
    tokenizer_dir: Path | None
    adapter_config: dict[str, Any]
    params: dict[str, str] = field(default_factory=dict)
    metrics: list[tuple[str, float, int]] = field(default_factory=list)
    report_files: list[Path] = field(default_factory=list)
    train_files: list[Path] = field(default_factory=list)
    run_tags: dict[str, str] = field(default_factory=dict)
    version_tags: dict[str, str] = field(default_factory=dict)
    candidate_metrics: dict[str, Any] = field(default_factory=dict)
    base_metrics: dict[str, Any] | None = None
    report_md: str | None = None
    training_run: tuple[str, str] | None = None  # (tracking uri, run id) of the training run
    prompt: PromptSettings | None = None  # template and lengths the adapter was trained with
    prompt_source: Path | None = None  # the prepared folder they came from; None: the adapter's sidecar
    metric: str = "rougeL"  # the gate's metric: the one figure (beside the baseline's) a version shows
    extra_version_tags: dict[str, str] = field(default_factory=dict)  # beside version_tags' dozen
    timestamp_ms: int = field(default_factory=lambda: int(time.time() * 1000))

    @property
    def adapter_task(self) -> str | None:
        """The task the adapter's sidecar says it was trained for (None: it records none)."""
        task = _meta(self.adapter_config).get(c.TAG_TASK)
        return str(task) if task else None

    @property
    def rouge_types(self) -> list[str]:
        """The metrics whose figures the version shows: the gate's (the rest are the run's metrics and in
        lineage.json; a version keeps about a dozen tags)."""
        return [self.metric] if self.metric in self.candidate_metrics else []

    @contextlib.contextmanager
    def files_to_log(self) -> Iterator[tuple[Path, Path | None]]:
        """(adapter folder, tokenizer folder or None) as the model will hold them: folders named as
        the loaders read them (MLflow stores an artifact under its folder's own name), the adapter's
        sidecar with the prompt settings (from `prompt_source`). Copies where the given folders differ;
        the caller's folders are never changed."""
        adapter_ok = self.adapter_dir.name == c.ADAPTER_DIR and self.prompt_source is None
        tokenizer_ok = self.tokenizer_dir is None or self.tokenizer_dir.name == c.TOKENIZER_ARTIFACT
        if adapter_ok and tokenizer_ok:
            yield self.adapter_dir, self.tokenizer_dir
            return
        with tempfile.TemporaryDirectory(prefix="register-") as tmp:
            adapter, tokenizer = self.adapter_dir, self.tokenizer_dir
            if not adapter_ok:
                adapter = Path(shutil.copytree(self.adapter_dir, Path(tmp) / c.ADAPTER_DIR))
                if self.prompt_source is not None and self.prompt is not None:
                    write_prompt_settings(adapter, self.prompt)
            if not tokenizer_ok:
                tokenizer = Path(shutil.copytree(self.tokenizer_dir, Path(tmp) / c.TOKENIZER_ARTIFACT))
            yield adapter, tokenizer

    def description(self, limit: int) -> str:
        """The report's Markdown table (cut to `limit` characters), or a note that there is none."""
        text = self.report_md or f"LoRA adapter for task {self.task!r}; registered without an evaluation."
        if len(text) <= limit:
            return text
        note = "\n\n... (cut; full report in the run's evaluation/report.md)\n"
        return text[: limit - len(note)] + note

    def copy_training_curves(self, client: Any, uri: str, call: Callable) -> None:
        """Append the training run's metric histories (train/loss, val/loss, ...) to `metrics`.

        The training CLI logs them to MLflow and records the run in metrics.json. Another store
        than ours is read with one attempt only: losing curves must not block a registration.
        """
        if self.training_run is None:
            return
        train_uri, run_id = self.training_run
        try:
            if train_uri == uri:
                src = client
                keys = call(lambda: list(src.get_run(run_id).data.metrics), "read training run")
                histories = {k: call(lambda k=k: src.get_metric_history(run_id, k), f"read {k}")
                             for k in keys}
            else:
                from mlflow import MlflowClient

                src = MlflowClient(tracking_uri=train_uri)
                histories = {k: src.get_metric_history(run_id, k) for k in src.get_run(run_id).data.metrics}
        except Exception as e:
            logger.warning("loss curves of training run %s at %s not copied: %s", run_id,
                           redact_uri(train_uri), redact_text(str(e)))
            return
        for key, history in sorted(histories.items()):
            for m in history:
                self.metrics.append((_key(f"training/{key}"), float(m.value), int(m.step)))


def _report_models(report: dict, path: Path) -> list[dict]:
    models = report.get("models")
    if isinstance(models, dict):  # tolerate {name: row}
        models = [{"name": k, **v} for k, v in models.items()]
    if not isinstance(models, list) or not all(isinstance(m, dict) and "name" in m for m in models):
        raise RegistrationInputError(f"report {path} has no 'models' list; was it written by build_report?")
    return models


def _scores(model_row: dict) -> dict:
    """A report row's scores by metric (`metrics`; a report written before the registry: `rouge`)."""
    return model_row.get("metrics") or model_row.get("rouge") or {}


def _record_protocol(inp: RegistrationInputs, cand: dict) -> None:
    """The candidate's evaluation protocol: name and id as run and version tags (the gate compares the
    id), every setting as a run param, both for the gate's candidate."""
    protocol = protocol_of(cand)
    tags = {c.TAG_EVAL_PROTOCOL: protocol.name, c.TAG_EVAL_PROTOCOL_ID: protocol.protocol_id}
    inp.version_tags.update(tags)
    inp.run_tags.update(tags)
    for k, v in protocol.to_dict().items():
        inp.params[_key(c.EVAL_PROTOCOL_PARAM + k)] = json.dumps(v) if isinstance(v, dict) else str(v)
    inp.candidate_metrics |= {"protocol_id": protocol.protocol_id, "protocol": protocol.name}


def _pick_candidate(models: list[dict], name: str | None, adapter_sha: str, path: Path) -> dict:
    names = [m["name"] for m in models]
    if name is not None:
        found = [m for m in models if m["name"] == name]
        if not found:
            raise RegistrationInputError(
                f"candidate {name!r} is not a model of report {path}; models: {names}")
        return found[0]
    by_sha = [m for m in models if (m.get("fingerprints") or {}).get("adapter_sha256") == adapter_sha]
    if by_sha:
        return by_sha[0]
    loras = [m for m in models if m.get("kind") == "lora"]
    if len(loras) == 1:
        return loras[0]
    raise RegistrationInputError(
        f"report {path} has {len(loras)} LoRA models and none matches the adapter's checksum; pass "
        f"candidate=<name> (models: {names})"
    )


def _read_report(inp: RegistrationInputs, path: Path, metric: str, candidate: str | None,
                 adapter_sha: str) -> None:
    report = _read_json(path, "report")
    models = _report_models(report, path)
    cand = _pick_candidate(models, candidate, adapter_sha, path)
    cand_sha = (cand.get("fingerprints") or {}).get("adapter_sha256")
    if cand_sha and cand_sha != adapter_sha:
        raise RegistrationInputError(
            f"report {path} evaluated model {cand['name']!r} with adapter sha256 {cand_sha[:12]}, but the "
            f"adapter being registered ({inp.adapter_dir}) has {adapter_sha[:12]}: the report is not about it"
        )
    baseline = report.get("baseline")
    bases = [m for m in models if m["name"] == baseline] or [m for m in models if m.get("kind") == "base"]
    base = bases[0] if bases else None
    eval_fp = (report.get("data") or {}).get("fingerprint") or (cand.get("fingerprints") or {}).get("data")

    tags = inp.version_tags
    for m in models:
        for t, s in _scores(m).items():
            if not isinstance(s, dict) or _number(s.get("mean")) is None:
                continue
            for stat in ("mean", "ci_low", "ci_high"):
                if _number(s.get(stat)) is not None:
                    suffix = "" if stat == "mean" else f".{stat}"
                    inp.metrics.append((_key(metric_tag(t, m["name"]) + suffix), float(s[stat]), 0))
            tags[_key(metric_tag(t, m["name"]))] = f"{s['mean']:.6f}"
            if m is cand:
                tags[_key(metric_tag(t))] = f"{s['mean']:.6f}"
                inp.candidate_metrics[t] = float(s["mean"])
                if _number(s.get("ci_low")) is not None and _number(s.get("ci_high")) is not None:
                    tags[_key(c.rouge_ci_key(t))] = f"[{s['ci_low']:.6f}, {s['ci_high']:.6f}]"
        for t, v in (m.get("change_vs_baseline_points") or {}).items():
            if _number(v) is not None:
                inp.metrics.append((_key(c.rouge_change_key(t, baseline, m["name"])), float(v), 0))
                if m is cand:
                    tags[_key(c.rouge_change_key(t, baseline))] = f"{v:+.4f}"
    for comp in report.get("comparisons") or []:
        for t, r in (comp.get("metrics") or {}).items():
            for stat in ("mean_diff", "ci_low", "ci_high", "p_value"):
                if _number((r or {}).get(stat)) is not None:
                    key = _key(f"compare.{comp.get('a')}_vs_{comp.get('b')}.{t}.{stat}")
                    inp.metrics.append((key, float(r[stat]), 0))
    if metric not in inp.candidate_metrics:
        raise RegistrationInputError(
            f"metric {metric!r} is not in report {path} for model {cand['name']!r}; "
            f"available: {sorted(_scores(cand))}"
        )
    inp.candidate_metrics["data_fingerprint"] = eval_fp
    _record_protocol(inp, cand)
    if base is not None:
        inp.base_metrics = {t: s.get("mean") for t, s in _scores(base).items() if isinstance(s, dict)}
    tags.update({
        c.TAG_EVAL_CANDIDATE: cand["name"], c.TAG_EVAL_BASELINE: base["name"] if base else c.NONE,
        c.TAG_EVAL_SPLIT: str(report.get("split", c.UNKNOWN)), c.TAG_EVAL_N: str(report.get("n", c.UNKNOWN)),
        c.TAG_EVAL_DATA_FINGERPRINT: eval_fp or c.UNKNOWN,
    })
    md = path.parent / c.REPORT_MD_FILE
    inp.report_md = md.read_text() if md.is_file() else None
    inp.report_files = [path.parent / f for f in c.REPORT_FILES if (path.parent / f).is_file()]


def _read_training(inp: RegistrationInputs, train_dir: Path) -> dict:
    """Params from config.yaml, scalar metrics and the training run from metrics.json."""
    import yaml

    if not train_dir.is_dir():
        raise RegistrationInputError(f"train_dir {train_dir} is not a folder (expected a training output)")
    config_file, metrics_file = train_dir / c.CONFIG_FILE, train_dir / c.METRICS_FILE
    config: dict = {}
    if config_file.is_file():
        try:
            config = yaml.safe_load(config_file.read_text()) or {}
        except yaml.YAMLError as e:
            raise RegistrationInputError(f"training config {config_file} is not valid YAML: {e}") from e
    for k, v in flatten(config).items():
        text = json.dumps(v) if isinstance(v, list | dict) else str(v)
        inp.params[_key(k)] = redact_text(text)[:_PARAM_LIMIT]  # a logger's tracking_uri may hold a password
    metrics = _read_json(metrics_file, "training metrics") if metrics_file.is_file() else {}
    for k, v in metrics.items():
        if _number(v) is not None:
            inp.metrics.append((_key(f"training.{k}"), float(v), 0))
        elif isinstance(v, list):  # a curve: numbers by step, or rows {"step": ..., name: value}
            for i, row in enumerate(v):
                if _number(row) is not None:
                    inp.metrics.append((_key(f"training/{k}"), float(row), i))
                elif isinstance(row, dict):
                    step = int(row.get("step", i))
                    for name, value in row.items():
                        if name != "step" and _number(value) is not None:
                            inp.metrics.append((_key(f"training/{name}"), float(value), step))
    if metrics.get("mlflow_run_id") and metrics.get("mlflow_tracking_uri"):
        inp.training_run = (str(metrics["mlflow_tracking_uri"]), str(metrics["mlflow_run_id"]))
        inp.run_tags[c.TAG_TRAINING_RUN_ID] = str(metrics["mlflow_run_id"])
    inp.train_files = [train_dir / f for f in c.TRAIN_FILES if (train_dir / f).is_file()]
    return {"config": flatten(config), "metrics": metrics}


def _check_training_matches(train: Path, training: dict, adapter: Path, cfg: dict, adapter_sha: str) -> None:
    """Refuse a training folder whose config.yaml or metrics.json describe another adapter."""
    config, metrics = training["config"], training["metrics"]
    for key, field_name in (("model.lora.r", "r"), ("model.lora.lora_alpha", "lora_alpha")):
        if key in config and field_name in cfg and config[key] != cfg[field_name]:
            raise RegistrationInputError(
                f"training folder {train} does not match adapter {adapter}: config.yaml {key}={config[key]}"
                f" but adapter_config.json {field_name}={cfg[field_name]}; pass the training folder that"
                " produced this adapter"
            )
    trained_sha = metrics.get("adapter_sha256")
    if trained_sha and trained_sha != adapter_sha:
        raise RegistrationInputError(
            f"training folder {train} does not match adapter {adapter}: metrics.json adapter_sha256"
            f" {trained_sha[:12]} but the adapter's weights have {adapter_sha[:12]}; pass the training"
            " folder that produced this adapter"
        )


def _prepared_prompt(prepared: Path) -> PromptSettings:
    """The prompt settings in a prepared data folder's manifest."""
    manifest = prepared / c.MANIFEST_FILE
    if not manifest.is_file():
        raise RegistrationInputError(
            f"prepared_dir {prepared} has no {c.MANIFEST_FILE}: pass the folder `lora-pipeline prepare` "
            "wrote (the one the adapter was trained on)")
    return PromptSettings.from_manifest(_read_json(manifest, "prepared data manifest"))


def _read_prompt(inp: RegistrationInputs, prepared: Path | None) -> None:
    """`inp.prompt` from the adapter's sidecar, else from `prepared`'s manifest (recorded as its
    source, so the logged copy gets them); neither: RegistrationInputError saying how to fix it."""
    try:
        own = read_prompt_settings(inp.adapter_dir)
    except AdapterLoadError as e:
        raise RegistrationInputError(str(e)) from e
    given = _prepared_prompt(prepared) if prepared is not None else None
    if own is None and given is None:
        raise RegistrationInputError(
            f"adapter {inp.adapter_dir} records no prompt settings (its {c.ADAPTER_SIDECAR_FILE} has no "
            "'prompt'; `lora-pipeline fit` writes them): register it with --prepared DIR "
            "(register_adapter(..., prepared_dir=DIR)), DIR being the prepared data folder it was trained on")
    if own is not None and given is not None and own != given:
        differ = sorted(k for k, v in own.to_dict().items() if given.to_dict()[k] != v)
        raise RegistrationInputError(
            f"adapter {inp.adapter_dir} records prompt settings that differ from {prepared}'s manifest in "
            f"{differ}: leave out --prepared to register the adapter with its own, or pass the data it was "
            "trained on")
    inp.prompt = own or given
    inp.prompt_source = prepared.resolve() if own is None else None


def _shipped_tokenizer(adapter: Path, tokenizer_dir: Path | None, prepared: Path | None) -> Path | None:
    """The tokenizer to log with the model: `tokenizer_dir`, else the prepared folder's (what training
    and evaluation used) unless the adapter folder holds one; None: serving uses the base model's."""
    if tokenizer_dir is not None:
        if not tokenizer_dir.is_dir():
            raise RegistrationInputError(f"tokenizer_dir {tokenizer_dir} is not a folder")
        return tokenizer_dir
    if prepared is None or any((adapter / f).is_file() for f in c.TOKENIZER_FILES):
        return None
    tok = prepared / c.PREPARED_TOKENIZER_DIR
    return tok if tok.is_dir() else None


def read_inputs(
    task: str,
    adapter_dir: str | os.PathLike,
    report_path: str | os.PathLike | None,
    train_dir: str | os.PathLike | None,
    data_fingerprint: str | None,
    metric: str,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    candidate: str | None = None,
    prepared_dir: str | os.PathLike | None = None,
) -> RegistrationInputs:
    """Check the paths and compute everything a registration logs (see RegistrationInputs)."""
    check_name("task name", task, RegistrationInputError)
    # Resolved once (training outputs are links into one export): every file read below comes from
    # the same export even if a training run publishes a new one meanwhile.
    adapter = resolve_adapter_dir(adapter_dir).resolve()
    try:  # adapter_config.json with our lora_pipeline.json sidecar (base fingerprint, metadata)
        cfg = read_adapter_config(adapter)
    except AdapterLoadError as e:
        raise RegistrationInputError(str(e)) from e
    report = Path(report_path) if report_path is not None else None
    if report is not None and report.is_dir():
        report = report / c.REPORT_FILE
    if report is not None and not report.is_file():
        raise RegistrationInputError(
            f"report_path {report} does not exist (expected build_report's {c.REPORT_FILE} or its folder)")
    # One export of a training output, read as a whole (a concurrent publish cannot mix two).
    train = current_outputs(train_dir) if train_dir is not None else None
    prepared = Path(prepared_dir) if prepared_dir is not None else None
    tok = _shipped_tokenizer(adapter, Path(tokenizer_dir) if tokenizer_dir is not None else None, prepared)
    inp = RegistrationInputs(task, adapter, report and report.resolve(), train and train.resolve(), tok, cfg,
                             metric=metric)
    _read_prompt(inp, prepared)
    for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora", "task_type",
              "base_model_name_or_path", "base_fingerprint"):
        value = cfg.get(k)
        inp.params[f"adapter.{k}"] = json.dumps(value) if isinstance(value, list) else str(value)
    training = _read_training(inp, train) if train is not None else {"config": {}, "metrics": {}}
    _tag_version(inp, adapter, cfg, training)
    sha = inp.version_tags[c.TAG_ADAPTER_SHA256]
    if train is not None:
        _check_training_matches(train, training, adapter, cfg, sha)
    if report is not None:
        _read_report(inp, inp.report_path, metric, candidate, sha)
    else:
        inp.version_tags[c.TAG_EVAL_DATA_FINGERPRINT] = c.UNKNOWN
    train_fp = (data_fingerprint or training["metrics"].get("data_fingerprint")
                or _meta(cfg).get("data_fingerprint") or inp.candidate_metrics.get("data_fingerprint"))
    inp.version_tags[c.TAG_DATA_FINGERPRINT] = str(train_fp or c.UNKNOWN)
    if c.TAG_TRAINING_RUN_ID in inp.run_tags:
        inp.version_tags[c.TAG_TRAINING_RUN_ID] = inp.run_tags[c.TAG_TRAINING_RUN_ID]
    inp.run_tags.update({c.TAG_TASK: task, c.TAG_ADAPTER_DIR: str(inp.adapter_dir), c.TAG_ADAPTER_SHA256: sha,
                         c.TAG_MODE: inp.version_tags[c.TAG_MODE]})
    return inp


def _meta(cfg: dict[str, Any]) -> dict[str, Any]:
    """Our metadata block (from the lora_pipeline.json sidecar; empty when absent)."""
    return cfg.get("lora_pipeline") if isinstance(cfg.get("lora_pipeline"), dict) else {}


def _tag_version(inp: RegistrationInputs, adapter: Path, cfg: dict[str, Any], training: dict) -> None:
    """Version tags that describe the adapter itself (base, LoRA settings, checksum, code)."""
    weights = adapter / c.ADAPTER_WEIGHTS_FILE
    mode = _meta(cfg).get("finetune") or training["metrics"].get("finetune") or next(
        (v for k, v in training["config"].items() if k.endswith("finetune")), None) or "lora"
    targets = cfg.get("target_modules")
    inp.version_tags.update({
        c.TAG_TASK: inp.task,
        c.TAG_BASE_MODEL: str(cfg.get("base_model_name_or_path") or c.UNKNOWN),
        c.TAG_BASE_FINGERPRINT: str(cfg.get("base_fingerprint") or c.UNKNOWN),
        c.TAG_LORA_R: str(cfg.get("r")),
        c.TAG_LORA_ALPHA: str(cfg.get("lora_alpha")),
        c.TAG_LORA_TARGETS: ",".join(targets) if isinstance(targets, list) else str(targets),
        c.TAG_LORA_RSLORA: str(bool(cfg.get("use_rslora"))),
        c.TAG_LORA_DORA: str(bool(cfg.get("use_dora"))),
        c.TAG_MODE: str(mode),
        c.TAG_ADAPTER_SHA256: sha256_file(weights),
        c.TAG_ADAPTER_BYTES: str(weights.stat().st_size),
        c.TAG_GIT_COMMIT: git_commit() or c.UNKNOWN,
    })
