"""Read what one registration logs: adapter folder, ROUGE report, training outputs -> params,
metrics, files and version tags. No MLflow calls here except copying training loss curves.

Used by `lora_module.registry.register_adapter`; `read_inputs(...)` checks every path first, so a
bad folder fails before anything is written to the registry.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_module.adapter_io import read_adapter_config
from lora_module.errors import AdapterLoadError, PipelineError
from lora_module.files import sha256_file
from lora_module.lineage import git_commit
from lora_module.names import check_name
from lora_module.prompt import PromptSettings
from lora_module.training.outputs import current_outputs

logger = logging.getLogger(__name__)

REPORT_FILES = ("report.json", "report.md", "rouge.png", "predictions.csv")
TRAIN_FILES = ("config.yaml", "metrics.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json")
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
    if not (p / "adapter_config.json").is_file() and (p / "adapter" / "adapter_config.json").is_file():
        p = p / "adapter"
    missing = [f for f in ("adapter_config.json", "adapter_model.safetensors") if not (p / f).is_file()]
    if missing:
        raise RegistrationInputError(
            f"adapter_dir {p} is not a PEFT-format adapter folder: missing {missing} (it needs "
            "adapter_config.json and adapter_model.safetensors, or a training output with adapter/)"
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
    timestamp_ms: int = field(default_factory=lambda: int(time.time() * 1000))

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
            logger.warning("loss curves of training run %s at %s not copied: %s", run_id, train_uri, e)
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
        rouge = m.get("rouge") or {}
        for t, s in rouge.items():
            if not isinstance(s, dict) or _number(s.get("mean")) is None:
                continue
            for stat in ("mean", "ci_low", "ci_high"):
                if _number(s.get(stat)) is not None:
                    suffix = "" if stat == "mean" else f".{stat}"
                    inp.metrics.append((_key(f"rouge.{m['name']}.{t}{suffix}"), float(s[stat]), 0))
            tags[_key(f"rouge.{m['name']}.{t}")] = f"{s['mean']:.6f}"
            if m is cand:
                tags[_key(f"rouge.{t}")] = f"{s['mean']:.6f}"
                inp.candidate_metrics[t] = float(s["mean"])
                if _number(s.get("ci_low")) is not None and _number(s.get("ci_high")) is not None:
                    tags[_key(f"rouge.{t}.ci95")] = f"[{s['ci_low']:.6f}, {s['ci_high']:.6f}]"
        for t, v in (m.get("change_vs_baseline_points") or {}).items():
            if _number(v) is not None:
                inp.metrics.append((_key(f"rouge.{m['name']}.{t}.vs_{baseline}_points"), float(v), 0))
                if m is cand:
                    tags[_key(f"rouge.{t}.vs_{baseline}_points")] = f"{v:+.4f}"
    for c in report.get("comparisons") or []:
        for t, r in (c.get("metrics") or {}).items():
            for stat in ("mean_diff", "ci_low", "ci_high", "p_value"):
                if _number((r or {}).get(stat)) is not None:
                    key = _key(f"compare.{c.get('a')}_vs_{c.get('b')}.{t}.{stat}")
                    inp.metrics.append((key, float(r[stat]), 0))
    if metric not in inp.candidate_metrics:
        raise RegistrationInputError(
            f"metric {metric!r} is not in report {path} for model {cand['name']!r}; "
            f"available: {sorted(inp.candidate_metrics)}"
        )
    inp.candidate_metrics["data_fingerprint"] = eval_fp
    if base is not None:
        rouge = base.get("rouge") or {}
        inp.base_metrics = {t: s.get("mean") for t, s in rouge.items() if isinstance(s, dict)}
    tags.update({
        "eval.candidate": cand["name"], "eval.baseline": base["name"] if base else "none",
        "eval.split": str(report.get("split", "unknown")), "eval.n": str(report.get("n", "unknown")),
        "eval_data_fingerprint": eval_fp or "unknown",
    })
    md = path.parent / "report.md"
    inp.report_md = md.read_text() if md.is_file() else None
    inp.report_files = [path.parent / f for f in REPORT_FILES if (path.parent / f).is_file()]


def _read_training(inp: RegistrationInputs, train_dir: Path) -> dict:
    """Params from config.yaml, scalar metrics and the training run from metrics.json."""
    import yaml

    if not train_dir.is_dir():
        raise RegistrationInputError(f"train_dir {train_dir} is not a folder (expected a training output)")
    config_file, metrics_file = train_dir / "config.yaml", train_dir / "metrics.json"
    config: dict = {}
    if config_file.is_file():
        try:
            config = yaml.safe_load(config_file.read_text()) or {}
        except yaml.YAMLError as e:
            raise RegistrationInputError(f"training config {config_file} is not valid YAML: {e}") from e
    for k, v in flatten(config).items():
        text = json.dumps(v) if isinstance(v, list | dict) else str(v)
        inp.params[_key(k)] = text[:_PARAM_LIMIT]
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
        inp.run_tags["training_run_id"] = str(metrics["mlflow_run_id"])
    inp.train_files = [train_dir / f for f in TRAIN_FILES if (train_dir / f).is_file()]
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


def _prepared_dir(tokenizer_dir: Path | None, config: dict[str, Any]) -> Path | None:
    """The prepared data folder the adapter was trained on: the given tokenizer's folder, else the
    training config's `data.prepared_dir`."""
    candidates = [tokenizer_dir.parent] if tokenizer_dir is not None else []
    candidates += [Path(v) for k, v in config.items() if k.endswith("prepared_dir") and isinstance(v, str)]
    return next((p for p in candidates if (p / "manifest.json").is_file()), None)


def _find_tokenizer(adapter_dir: Path, prepared: Path | None) -> Path | None:
    """The prepared data's tokenizer (what evaluation used), unless the adapter folder has one."""
    if any((adapter_dir / f).is_file() for f in _TOKENIZER_FILES):
        return None  # shipped inside the adapter artifact already
    return prepared / "tokenizer" if prepared is not None and (prepared / "tokenizer").is_dir() else None


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
        report = report / "report.json"
    if report is not None and not report.is_file():
        raise RegistrationInputError(
            f"report_path {report} does not exist (expected build_report's report.json or its folder)")
    # One export of a training output, read as a whole (a concurrent publish cannot mix two).
    train = current_outputs(train_dir) if train_dir is not None else None
    tok = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if tok is not None and not tok.is_dir():
        raise RegistrationInputError(f"tokenizer_dir {tok} is not a folder")
    inp = RegistrationInputs(task, adapter.resolve(), report and report.resolve(), train and train.resolve(),
                             tok, cfg)
    for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "task_type",
              "base_model_name_or_path", "base_fingerprint"):
        value = cfg.get(k)
        inp.params[f"adapter.{k}"] = json.dumps(value) if isinstance(value, list) else str(value)
    training = _read_training(inp, train) if train is not None else {"config": {}, "metrics": {}}
    prepared = _prepared_dir(tok, training["config"])
    if inp.tokenizer_dir is None:
        inp.tokenizer_dir = _find_tokenizer(adapter, prepared)
    if prepared is not None:
        manifest = _read_json(prepared / "manifest.json", "prepared data manifest")
        inp.prompt = PromptSettings.from_manifest(manifest)
    _tag_version(inp, adapter, cfg, training, data_fingerprint)
    if train is not None:
        _check_training_matches(train, training, adapter, cfg, inp.version_tags["adapter_sha256"])
    if report is not None:
        _read_report(inp, inp.report_path, metric, candidate, inp.version_tags["adapter_sha256"])
    else:
        inp.version_tags["eval_data_fingerprint"] = "unknown"
    train_fp = (data_fingerprint or training["metrics"].get("data_fingerprint")
                or _meta(cfg).get("data_fingerprint") or inp.candidate_metrics.get("data_fingerprint"))
    inp.version_tags["data_fingerprint"] = str(train_fp or "unknown")
    if "training_run_id" in inp.run_tags:
        inp.version_tags["training_run_id"] = inp.run_tags["training_run_id"]
    tags = inp.version_tags
    inp.run_tags.update({"task": task, "adapter_dir": str(inp.adapter_dir),
                         "adapter_sha256": tags["adapter_sha256"], "mode": tags["mode"]})
    return inp


def _meta(cfg: dict[str, Any]) -> dict[str, Any]:
    """Our metadata block (from the lora_pipeline.json sidecar; empty when absent)."""
    return cfg.get("lora_pipeline") if isinstance(cfg.get("lora_pipeline"), dict) else {}


def _tag_version(inp: RegistrationInputs, adapter: Path, cfg: dict[str, Any], training: dict,
                 data_fingerprint: str | None) -> None:
    """Version tags that describe the adapter itself (base, LoRA settings, checksum, code)."""
    weights = adapter / "adapter_model.safetensors"
    mode = _meta(cfg).get("finetune") or training["metrics"].get("finetune") or next(
        (v for k, v in training["config"].items() if k.endswith("finetune")), None) or "lora"
    targets = cfg.get("target_modules")
    inp.version_tags.update({
        "task": inp.task,
        "base_model": str(cfg.get("base_model_name_or_path") or "unknown"),
        "base_fingerprint": str(cfg.get("base_fingerprint") or "unknown"),
        "lora.r": str(cfg.get("r")),
        "lora.alpha": str(cfg.get("lora_alpha")),
        "lora.targets": ",".join(targets) if isinstance(targets, list) else str(targets),
        "lora.rslora": str(bool(cfg.get("use_rslora"))),
        "mode": str(mode),
        "adapter_sha256": sha256_file(weights),
        "adapter_bytes": str(weights.stat().st_size),
        "git_commit": git_commit() or "unknown",
    })
