"""Prefect tasks of the pipeline: each one calls one plain function of `data/` or `lora_module/`.

Tasks take and return paths, fingerprints and small dicts (never models or datasets), so results
persist and cache keys hash cheaply. Two tasks are cached across runs by their inputs
(INPUTS + TASK_SOURCE, results persisted under Prefect's local storage): data preparation, keyed by
the data fingerprint, and the base-model evaluation, keyed by data fingerprint + base-model
identity + decoding settings + evaluation code. Every task returns its own run time in
`seconds`, so a flow can tell the work from the orchestration around it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from lora_module.registry.gate import RegistryUnavailableError

CACHED = INPUTS + TASK_SOURCE
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model")


# ---- small wiring helpers (no ML logic) ---------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_identity(name_or_path: str) -> str:
    """A cache key for a base model: a hash of a local folder's weight/config files, else the Hub name."""
    p = Path(name_or_path)
    if not p.is_dir():
        return f"hub:{name_or_path}"
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in _WEIGHT_SUFFIXES)
    return hashlib.sha256(json.dumps([[f.name, _sha256(f)] for f in files]).encode()).hexdigest()


def code_identity(*modules: str) -> str:
    """Hash of the source files of `modules` (e.g. the evaluation code), so a code change misses the cache."""
    import importlib

    h = hashlib.sha256()
    for name in modules:
        h.update(Path(importlib.import_module(name).__file__).read_bytes())
    return h.hexdigest()


def _registry_down(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a registration only when the registry was unreachable (not for bad inputs)."""
    return isinstance(state.result(raise_on_failure=False), RegistryUnavailableError)


# ---- tasks --------------------------------------------------------------------------------------
@task(name="build-base-model", retries=1)
def build_base(base_model: str, home: str, demo_base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build (or reuse) the demo base model when `base_model` is "demo"; else pass the name through."""
    t0 = time.perf_counter()
    if base_model != "demo":
        return {"path": base_model, "built": False, "seconds": 0.0}
    from lora_module.training.demo_base import build_demo_base, read_manifest

    path = build_demo_base(Path(home) / "base", **(demo_base or {}))
    manifest = read_manifest(path)
    return {"path": str(path), "built": True, "seconds": time.perf_counter() - t0, "manifest": manifest}


@task(name="prepare-data", retries=1, cache_policy=CACHED, persist_result=True)
def prepare_data(data_config: str, overrides: dict[str, Any], fingerprint: str) -> dict[str, Any]:
    """Prepare (or reuse) the task's data; cached across runs by its fingerprint."""
    from lora_pipeline.data import DataConfig, prepare

    t0 = time.perf_counter()
    prepared = prepare(DataConfig.from_yaml(data_config, overrides or None))
    if prepared.fingerprint != fingerprint:
        raise RuntimeError(
            f"data fingerprint changed while preparing: {fingerprint[:12]} -> {prepared.fingerprint[:12]}"
        )
    return {
        "path": str(prepared.path),
        "fingerprint": prepared.fingerprint,
        "reused": prepared.reused,
        "rows": prepared.manifest.get("rows"),
        "seconds": time.perf_counter() - t0,
    }


def _evaluate(name: str, kind: str, path: str, prepared_dir: str, out_dir: str, generation: dict,
              limit: int | None) -> dict[str, Any]:
    from lora_module.evaluation.evaluate import GenerationConfig, ModelSpec, evaluate_model

    t0 = time.perf_counter()
    gen = GenerationConfig.from_dict(generation)
    out = evaluate_model(ModelSpec(name, kind, path), prepared_dir, out_dir, gen, limit=limit)
    return {"path": str(out), "seconds": time.perf_counter() - t0}


@task(name="evaluate-base", cache_policy=CACHED, persist_result=True)
def evaluate_base(base_model: str, base_identity: str, prepared_dir: str, data_fingerprint: str,
                  generation: dict[str, Any], limit: int | None, eval_code: str,
                  out_dir: str) -> dict[str, Any]:
    """ROUGE of the untouched base model; cached by data + base fingerprints, decoding and eval code."""
    return _evaluate("base", "base", base_model, prepared_dir, out_dir, generation, limit)


@task(name="evaluate")
def evaluate(name: str, kind: str, path: str, prepared_dir: str, out_dir: str, generation: dict[str, Any],
             limit: int | None) -> dict[str, Any]:
    """ROUGE of a fine-tuned model (kind "lora" or "full") on the prepared test split."""
    return _evaluate(name, kind, path, prepared_dir, out_dir, generation, limit)


@task(name="train", retries=1, retry_delay_seconds=5)
def train(config_path: str, overrides: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Fine-tune through the Lightning CLI in a subprocess; a retry resumes from the last checkpoint."""
    from lora_module.training.launcher import run_fit

    t0 = time.perf_counter()
    out = run_fit(config_path, overrides, resume=True, env=env)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"path": str(out), "metrics": metrics, "seconds": time.perf_counter() - t0}


@task(name="build-report")
def report(task_name: str, eval_paths: list[str], out_dir: str) -> dict[str, Any]:
    """report.json / report.md / rouge.png / predictions.csv comparing the task's models."""
    from lora_module.evaluation.report import build_report

    t0 = time.perf_counter()
    path = build_report(task_name, [Path(p) for p in eval_paths], out_dir)
    return {"path": str(path), "seconds": time.perf_counter() - t0}


@task(name="register-adapter", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_registry_down)
def register(task_name: str, adapter_dir: str, report_path: str, train_dir: str, model_name: str, metric: str,
             tokenizer_dir: str, retries: int = 2) -> dict[str, Any]:
    """Register the adapter as a new version through the promotion gate; retried while MLflow is down."""
    from lora_module.registry import register_adapter

    t0 = time.perf_counter()
    res = register_adapter(
        task_name, adapter_dir, report_path=report_path, train_dir=train_dir, model_name=model_name,
        metric=metric, retries=retries, backoff=1.0, tokenizer_dir=tokenizer_dir, candidate="lora",
    )
    return {
        "model_name": res.model_name,
        "version": res.version,
        "alias": res.alias,
        "decision": res.decision,
        "run_id": res.run_id,
        "tracking_uri": res.tracking_uri,
        "model_uri": res.model_uri,
        "seconds": time.perf_counter() - t0,
    }


def training_env(home: str, threads: int) -> dict[str, str]:
    """Environment of a training subprocess: the pipeline home and its share of the CPU threads."""
    env = {"LORA_PIPELINE_HOME": home, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    for key in ("MLFLOW_TRACKING_URI",):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env
