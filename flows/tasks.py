"""Prefect tasks of the pipeline: each one calls one plain function of `data/` or `lora_module/`.

Tasks take and return paths and small dicts (never models or datasets), and every one returns its
own run time in `seconds`, so a flow can tell the work from the orchestration around it. There is
one caching layer, the library's content-addressed folders: `prepare` reuses a prepared folder
with the same data fingerprint and `evaluate_base` an evaluation with the same inputs, and both
say so in `reused`. Prefect caches nothing across runs (its default policy is scoped to the run).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import task

from lora_module import contracts as c
from lora_module.errors import PipelineError
from lora_module.home import PipelineHome
from lora_module.registry.retry import RegistryUnavailableError


class FlowFailedError(PipelineError, RuntimeError):
    """A flow could not deliver its result: tasks or sweep points failed (the message names each one)."""


def _registry_down(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a registration only when the registry was unreachable (not for bad inputs)."""
    return isinstance(state.result(raise_on_failure=False), RegistryUnavailableError)


def training_env(threads: int) -> dict[str, str]:
    """Environment additions of a training subprocess: its share of the CPU threads."""
    return {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


@task(name="build-base-model", retries=1)
def build_base(base_model: str, base_dir: str, demo_base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build (or reuse) the demo base model when `base_model` names one ("demo", "demo-causal"); else
    pass the name through. "demo" builds what `demo_base` says (the T5 by default); "demo-causal" the
    causal family (`demo_base` settings of another family are replaced by the causal defaults)."""
    from lora_pipeline.flows.specs import DEMO_BASES

    t0 = time.perf_counter()
    if base_model not in DEMO_BASES:
        return {"path": base_model, "built": False, "seconds": 0.0}
    from lora_module.training.demo_base import build_demo_base

    settings = dict(demo_base or {})
    if base_model != "demo" and settings.get("family", "seq2seq") != DEMO_BASES[base_model]:
        settings = {"family": DEMO_BASES[base_model]}
    path = build_demo_base(Path(base_dir), **settings)
    return {"path": str(path), "built": True, "seconds": time.perf_counter() - t0}


@task(name="prepare-data", retries=1)
def prepare_data(data_config: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Prepare the task's data, or reuse the folder with the same fingerprint."""
    from lora_pipeline.data import DataConfig, prepare

    t0 = time.perf_counter()
    prepared = prepare(DataConfig.from_yaml(data_config, overrides or None))
    return {"path": str(prepared.path), "fingerprint": prepared.fingerprint, "reused": prepared.reused,
            "rows": prepared.manifest.get("rows"), "seconds": time.perf_counter() - t0}


@task(name="evaluate-base")
def evaluate_base(base_model: str, prepared_dir: str, evals_dir: str, generation: dict[str, Any],
                  limit: int | None, protocol: str | dict[str, Any] | None = None) -> dict[str, Any]:
    """Scores of the untouched base model under `protocol`, or the stored evaluation with the same inputs."""
    from lora_module.evaluation.baseline import evaluate_base as evaluate_base_model
    from lora_module.evaluation.generation import GenerationConfig

    t0 = time.perf_counter()
    gen = GenerationConfig.from_dict(generation)
    res = evaluate_base_model(base_model, prepared_dir, evals_dir, gen, limit, protocol)
    return {"path": str(res.path), "reused": res.reused, "seconds": time.perf_counter() - t0}


@task(name="evaluate")
def evaluate(name: str, kind: str, path: str, prepared_dir: str, out_dir: str, generation: dict[str, Any],
             limit: int | None, protocol: str | dict[str, Any] | None = None) -> dict[str, Any]:
    """Scores of a fine-tuned model (kind "lora" or "full") on the prepared test split under `protocol`."""
    from lora_module.evaluation.evaluate import GenerationConfig, ModelSpec, evaluate_model

    t0 = time.perf_counter()
    gen = GenerationConfig.from_dict(generation)
    out = evaluate_model(ModelSpec(name, kind, path), prepared_dir, out_dir, gen, limit=limit,
                         protocol=protocol)
    return {"path": str(out), "seconds": time.perf_counter() - t0}


@task(name="train", retries=1, retry_delay_seconds=5)
def train(config_path: str, overrides: list[str], output_dir: str, tracking_uri: str, experiment: str,
          env: dict[str, str]) -> dict[str, Any]:
    """Fine-tune through the Lightning CLI in a subprocess; a retry (or a re-run that adopted this folder)
    resumes from the last checkpoint, and a folder whose training finished is reused as it is."""
    from lora_module.training.launcher import run_fit
    from lora_module.training.outputs import current_outputs

    t0 = time.perf_counter()
    done = current_outputs(output_dir)
    if (done / c.METRICS_FILE).is_file() and any((done / d).is_dir() for d in (c.ADAPTER_DIR, c.MODEL_DIR)):
        # Exports appear only when a fit ends: an interrupted flow's finished training.
        metrics = json.loads((done / c.METRICS_FILE).read_text())
        return {"path": str(Path(output_dir).resolve()), "metrics": metrics, "finished_before": True,
                "seconds": 0.0}
    out = run_fit(config_path, overrides, resume=True, env=env, output_dir=output_dir,
                  tracking_uri=tracking_uri, experiment=experiment)
    metrics = json.loads((out / c.METRICS_FILE).read_text())
    return {"path": str(out), "metrics": metrics, "finished_before": False,
            "seconds": time.perf_counter() - t0}


@task(name="build-report")
def report(task_name: str, eval_paths: list[str], out_dir: str) -> dict[str, Any]:
    """report.json / report.md / rouge.png / predictions.csv comparing the task's models."""
    from lora_module.evaluation.report import build_report

    t0 = time.perf_counter()
    path = build_report(task_name, [Path(p) for p in eval_paths], out_dir)
    return {"path": str(path), "seconds": time.perf_counter() - t0}


@task(name="register-adapter", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_registry_down)
def register(task_name: str, adapter_dir: str, report_path: str, train_dir: str, model_name: str, metric: str,
             tokenizer_dir: str, home: PipelineHome, retries: int = 2, reuse_finished: bool = False
             ) -> dict[str, Any]:
    """Register the adapter as a new version through the promotion gate; retried while MLflow is down.
    `reuse_finished` (a flow that resumed an interrupted run folder): a version this adapter's
    registration already finished is returned as it is (`already_registered`) instead of registering
    it again."""
    from lora_module.registry import register_adapter

    t0 = time.perf_counter()
    res = register_adapter(
        task_name, adapter_dir, report_path=report_path, train_dir=train_dir, model_name=model_name,
        metric=metric, retries=retries, backoff=1.0, tokenizer_dir=tokenizer_dir, candidate="lora",
        home=home, reuse_finished=reuse_finished,
    )
    return {"model_name": res.model_name, "version": res.version, "alias": res.alias,
            "already_registered": res.reused,  # not `reused`: Stages reads that as a cache hit
            "decision": res.decision, "run_id": res.run_id, "tracking_uri": res.tracking_uri,
            "model_uri": res.model_uri, "seconds": time.perf_counter() - t0}
