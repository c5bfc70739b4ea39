"""Evaluate models on a prepared test split with every registered metric and write a per-task report.

Each model (the base, a LoRA adapter, a fully fine-tuned folder) is evaluated on its own into
`<out>/<name>.eval.json` (predictions, per-example scores of every metric in
`lora_module.evaluation.metrics` (ROUGE, exact match, chrF, BLEU, held-out loss and perplexity),
scores with bootstrap intervals, the evaluation protocol, fingerprints); `build_report` then combines
evaluations made on the same data under the same protocol into report.json / report.md / rouge.png /
predictions.csv.

Command line::

    lora-pipeline evaluate --prepared .lora_pipeline/data/dialogsum-1a2b3c4d5e6f \
        --model base=google/flan-t5-base --model full=runs/full/model --model lora=runs/lora/adapter \
        --task dialogsum --out reports/dialogsum [--split test --limit 100 --batch-size 16 \
        --num-beams 1 --max-new-tokens 128 --protocol one-reference-per-row --tokenizer unicode]

`--model NAME=PATH` takes its kind from NAME when NAME is base, lora or full; otherwise write
`NAME:KIND=PATH` (e.g. `lora_r8:lora=runs/r8/adapter`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from lora_module.contracts import METRICS_FILE, PREPARED_TOKENIZER_DIR, REPORT_MD_FILE, eval_file
from lora_module.errors import ArgumentParser, PipelineError, check_output_dir
from lora_module.evaluation.generation import (
    MODEL_KINDS,
    GenerationConfig,
    ModelLoadError,
    ModelSpec,
    generate,
    load_model_with_info,
)
from lora_module.evaluation.heldout import reference_nll
from lora_module.evaluation.metrics import NLL, compute, summarize_metric
from lora_module.evaluation.protocol import (
    DEFAULT_PROTOCOL,
    PROTOCOLS,
    TOKENIZERS,
    EvalProtocol,
    resolve_protocol,
)
from lora_module.evaluation.report import DEFAULT_BASELINE, ReportInputError, build_report, check_baseline
from lora_module.evaluation.rouge import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, DEFAULT_SEED
from lora_module.files import write_json_atomic
from lora_module.prompt import PromptSettings
from lora_module.qlora import check_model_source

__all__ = [
    "EvalInputError",
    "ReportInputError",
    "GenerationConfig",
    "ModelLoadError",
    "ModelSpec",
    "build_report",
    "evaluate_model",
    "evaluate_models",
    "evaluate_predictions",
    "main",
    "parse_model_arg",
]

EVAL_SCHEMA_VERSION = 2  # 2: every registered metric under "metrics", and the protocol
# Keys of LoadedModel.info stored elsewhere in the eval JSON (identity, fingerprints).
_INFO_NOT_IN_MODEL = ("name", "kind", "base_fingerprint", "model_fingerprint")
# Keys of the prepared data's manifest copied into the eval JSON's `data`.
_MANIFEST_IN_DATA = ("fingerprint", "name", "model_type", "rows")


class EvalInputError(PipelineError, ValueError):
    """An evaluation input that cannot be used: prepared data (missing split or column, empty references)
    or the models to evaluate (a `--model` argument, an evaluation name, duplicate names)."""


def _read_split(
    prepared_dir: Path, split: str, limit: int | None
) -> tuple[list[int], list[str], list[list[str]], dict]:
    """(row indices, prompts, references, manifest) of the split, checked for evaluation."""
    from lora_pipeline.data import load_prepared

    if not prepared_dir.exists():
        raise EvalInputError(f"prepared data folder {prepared_dir} does not exist")
    dataset, manifest = load_prepared(prepared_dir)
    if split not in dataset:
        raise EvalInputError(
            f"split {split!r} not in prepared data {prepared_dir}; available: {list(dataset)}"
        )
    table = dataset[split]
    missing = [c for c in ("prompt", "references") if c not in table.column_names]
    if missing:
        raise EvalInputError(
            f"split {split!r} of {prepared_dir} lacks column(s) {missing} needed for evaluation; "
            f"columns present: {table.column_names}"
        )
    if limit is not None:
        if limit < 1:
            raise EvalInputError(f"limit must be >= 1 (or None for the whole split), got {limit}")
        table = table.select(range(min(limit, len(table))))
    if len(table) == 0:
        raise EvalInputError(f"split {split!r} of {prepared_dir} has no rows: nothing to evaluate")
    prompts = list(table["prompt"])
    references = [list(r) if not isinstance(r, str) else [r] for r in table["references"]]
    for i, refs in enumerate(references):
        if not any(isinstance(r, str) and r.strip() for r in refs):
            raise EvalInputError(
                f"row {i} of split {split!r} in {prepared_dir} has no non-empty reference "
                f"(references={refs!r}); every evaluated example needs at least one"
            )
    return list(range(len(table))), prompts, references, manifest


def _training_metrics(model_path: Path) -> dict | None:
    """metrics.json written by training beside adapter/ or model/ (or inside the folder)."""
    for candidate in (model_path / METRICS_FILE, model_path.parent / METRICS_FILE):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except json.JSONDecodeError:
                return None
    return None


def _weights_bytes(folder: Path) -> int | None:
    files = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")] if folder.is_dir() else []
    return sum(p.stat().st_size for p in files) if files else None


def _versions() -> dict[str, str | None]:
    out = {}
    for lib in ("torch", "transformers", "rouge-score", "numpy"):
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def evaluate_predictions(
    name: str,
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    out_dir: str | os.PathLike,
    *,
    prompts: Sequence[str] | None = None,
    indices: Sequence[int] | None = None,
    kind: str = "external",
    data: dict[str, Any] | None = None,
    split: str = "test",
    model: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    fingerprints: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    protocol: EvalProtocol | str | dict | None = None,
    model_extras: dict[str, Any] | None = None,
) -> Path:
    """Score given predictions and write `<out_dir>/<name>.eval.json` (no model involved).

    `evaluate_model` uses it after generating; it also evaluates outputs produced elsewhere
    (another system, a human annotator) so they can join a report. `data` should carry the data
    `fingerprint`: the report refuses to mix evaluations on different data or protocols.
    `protocol`: a preset name, settings or EvalProtocol (None: the default preset);
    `model_extras`: what only a model gives the metrics (`metrics.NLL`), else those metrics are skipped.
    """
    if not isinstance(name, str) or not name or "/" in name:
        raise EvalInputError(f"evaluation name must be a non-empty string without '/', got {name!r}")
    if len(predictions) == 0:
        raise EvalInputError(f"model {name!r} produced no predictions: nothing to evaluate")
    protocol = resolve_protocol(protocol)
    scored = compute(predictions, [[r] if isinstance(r, str) else list(r) for r in references], protocol,
                     model_extras)
    summary = {m: summarize_metric(m, s, n_resamples=n_resamples, seed=seed) for m, s in scored.items()}
    params = dict(params or {})
    trainable, total = params.get("trainable"), params.get("total")
    params.setdefault("trainable_pct", 100.0 * trainable / total if trainable is not None and total else None)
    n = len(predictions)
    payload: dict[str, Any] = {
        "schema_version": EVAL_SCHEMA_VERSION,
        "model": {"name": name, "kind": kind} | (model or {}),
        "split": split,
        "n": n,
        "empty_predictions": sum(1 for p in predictions if not p.strip()),
        "data": dict(data or {}),
        "fingerprints": {"data": (data or {}).get("fingerprint")} | (fingerprints or {}),
        "params": params,
        "protocol": protocol.to_dict(),
        "metrics": summary,
        "bootstrap": {"n_resamples": n_resamples, "confidence": DEFAULT_CONFIDENCE, "seed": seed},
        "examples": _examples(predictions, references, prompts, indices, scored),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": _versions(),
    } | (extra or {})
    path = Path(out_dir) / eval_file(name)
    write_json_atomic(path, payload)
    return path


def _examples(predictions: Sequence[str], references: Sequence[Sequence[str]], prompts: Sequence[str] | None,
              indices: Sequence[int] | None, scored: dict[str, dict[str, list]]) -> dict[str, Any]:
    """The eval JSON's per-example block: inputs, outputs, per-example scores and corpus statistics."""
    n = len(predictions)
    return {
        "index": list(indices) if indices is not None else list(range(n)),
        "prompt": list(prompts) if prompts is not None else [""] * n,
        "references": [[r] if isinstance(r, str) else list(r) for r in references],
        "prediction": list(predictions),
        "scores": {m: s["scores"] for m, s in scored.items() if "scores" in s},
        "stats": {m: s["stats"] for m, s in scored.items() if "stats" in s},
    }


def evaluate_model(
    spec: ModelSpec,
    prepared_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    gen: GenerationConfig | None = None,
    split: str = "test",
    limit: int | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    protocol: EvalProtocol | str | dict | None = None,
) -> Path:
    """Generate with `spec` on `split` of the prepared data, score it, write `<out_dir>/<name>.eval.json`.

    Prompts are cut at the prepared data's `max_source_length` (what the model was trained with)
    unless `gen` sets another limit, which is then logged as an override. The held-out loss of the
    references is computed with the same model; the protocol records the decoding settings.
    """
    prepared_dir = Path(prepared_dir)
    indices, prompts, references, manifest = _read_split(prepared_dir, split, limit)
    gen = (gen or GenerationConfig()).with_settings(PromptSettings.from_manifest(manifest))

    tokenizer_dir = prepared_dir / PREPARED_TOKENIZER_DIR
    t0 = time.perf_counter()
    loaded = load_model_with_info(spec, gen, tokenizer_dir if tokenizer_dir.is_dir() else None)
    info = loaded.info
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    predictions = generate(loaded.model, loaded.tokenizer, prompts, gen)
    generate_s = time.perf_counter() - t0
    nll = reference_nll(loaded.model, loaded.tokenizer, prompts, references, gen)
    del loaded  # free the weights before scoring; only `info` is needed from here on

    metrics = _training_metrics(Path(info["path"])) if spec.kind != "base" else None
    return evaluate_predictions(
        spec.name, predictions, references, out_dir, prompts=prompts, indices=indices, kind=spec.kind,
        split=split,
        data={"prepared_dir": str(prepared_dir)} | {k: manifest.get(k) for k in _MANIFEST_IN_DATA},
        model={k: v for k, v in info.items() if k not in _INFO_NOT_IN_MODEL}
        | {"spec_path": spec.path, "spec_base": spec.base},
        params=_params(spec.kind, info, metrics),
        fingerprints={
            "base": info.get("base_fingerprint"),
            "model": info.get("model_fingerprint"),
            "adapter_sha256": info.get("adapter_sha256"),
        },
        extra={
            "limit": limit,
            "generation": gen.to_dict(),
            "training_metrics": metrics,
            "timing": {
                "load_s": load_s,
                "generate_s": generate_s,
                "examples_per_s": len(predictions) / generate_s if generate_s > 0 else None,
            },
        },
        n_resamples=n_resamples,
        seed=seed,
        protocol=resolve_protocol(protocol).with_decoding(gen.to_dict()),
        model_extras={NLL: nll},
    )


def _params(kind: str, info: dict[str, Any], metrics: dict | None) -> dict[str, Any]:
    """Trainable / total parameters and bytes on disk of the evaluated model."""
    trainable = info.get("trainable_params")
    if kind == "full" and metrics and metrics.get("trainable_params"):
        trainable = int(metrics["trainable_params"])
    if kind == "lora":
        disk_bytes = info.get("adapter_bytes")
    elif kind == "full":
        disk_bytes = _weights_bytes(Path(info["path"]))
    else:
        disk_bytes = None
    return {"trainable": trainable, "total": info.get("total_params"), "disk_bytes": disk_bytes}


def evaluate_models(
    prepared_dir: str | os.PathLike,
    specs: Sequence[ModelSpec],
    out_dir: str | os.PathLike,
    task: str,
    gen: GenerationConfig | None = None,
    split: str = "test",
    limit: int | None = None,
    baseline: str | None = DEFAULT_BASELINE,
    protocol: EvalProtocol | str | dict | None = None,
) -> Path:
    """Evaluate every spec on the same split under one protocol, then build the report; returns
    report.json's path."""
    names = [s.name for s in specs]
    if not specs:
        raise EvalInputError("evaluate_models needs at least one ModelSpec (one --model)")
    if len(set(names)) != len(names):
        raise EvalInputError(f"model names must be unique, got {names}; name each --model differently")
    check_baseline(baseline, names)  # an unknown one would drop every comparison after all the generating
    check_output_dir(out_dir, "out_dir")
    for spec in specs:  # every model's files, before the first one spends time generating
        _check_spec(spec)
    protocol = resolve_protocol(protocol)  # a bad protocol fails before any model is loaded
    paths = [evaluate_model(s, prepared_dir, out_dir, gen, split=split, limit=limit, protocol=protocol)
             for s in specs]
    return build_report(task, paths, out_dir, baseline=baseline)


def _check_spec(spec: ModelSpec) -> None:
    """The spec's folder exists and holds what its kind needs; a local base or full model is complete."""
    path = spec.resolved_path()
    if spec.kind != "lora":
        check_model_source(path, f"model {spec.name!r}")


def parse_model_arg(text: str) -> ModelSpec:
    """`NAME=PATH` (NAME in base/lora/full gives the kind) or `NAME:KIND=PATH`."""
    if "=" not in text:
        raise EvalInputError(f"--model {text!r}: expected NAME=PATH or NAME:KIND=PATH")
    left, path = text.split("=", 1)
    name, _, kind = left.partition(":")
    if not kind:
        if name not in MODEL_KINDS:
            raise EvalInputError(
                f"--model {text!r}: cannot tell the kind of {name!r}; name it one of {list(MODEL_KINDS)} "
                f"or write {name}:KIND={path} with KIND in {list(MODEL_KINDS)}"
            )
        kind = name
    return ModelSpec(name=name, kind=kind, path=path)


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="lora-pipeline evaluate",
        description="Evaluate base / LoRA / fully fine-tuned models with ROUGE and write a report.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--prepared", required=True,
                   help="prepared data folder (written by lora-pipeline prepare)")
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME[:KIND]=PATH",
        help="model to evaluate; repeat for several (kinds: base, lora, full)",
    )
    p.add_argument("--task", required=True, help="task name shown in the report")
    p.add_argument("--out", required=True, help="output folder for *.eval.json and the report")
    p.add_argument("--split", default="test", help="split of the prepared data to evaluate on")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    p.add_argument("--batch-size", type=int, default=GenerationConfig.batch_size,
                   help="prompts per generate call")
    p.add_argument("--num-beams", type=int, default=GenerationConfig.num_beams, help="beam width (1: greedy)")
    p.add_argument("--max-new-tokens", type=int, default=GenerationConfig.max_new_tokens,
                   help="generated tokens per example at most")
    p.add_argument("--max-source-length", type=int, default=GenerationConfig.max_source_length,
                   help="prompt tokens kept (None: the limit in the prepared data's manifest)")
    p.add_argument("--device", default=GenerationConfig.device,
                   help="'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype for generation ('auto': bf16 on a CUDA GPU that supports it, fp16 on"
                        " older GPUs, as loaded on the CPU)")
    p.add_argument("--no-merge", action="store_true", help="generate with the adapter unmerged (slower)")
    p.add_argument("--lora-base", default=None,
                   help="base model for LoRA specs (None: the adapter's recorded base)")
    p.add_argument("--force", action="store_true",
                   help="evaluate LoRA adapters even on a base whose fingerprint differs from their own")
    p.add_argument("--baseline", default=DEFAULT_BASELINE,
                   help="model name (of a --model) the report's changes are relative to; the default is used "
                        "only when such a model is evaluated")
    p.add_argument("--protocol", default=DEFAULT_PROTOCOL, choices=list(PROTOCOLS),
                   help="evaluation protocol: how several references per example score (best, one per row, "
                        "first)")
    p.add_argument("--tokenizer", default=None, choices=list(TOKENIZERS),
                   help="ROUGE tokens: ascii (rouge_score's) or unicode (non-Latin scripts); None: the "
                        "protocol's")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns 0. Bad input, or a model that cannot be loaded, raises a PipelineError,
    which `lora-pipeline` (`run_cli`) prints as one `error:` line with exit status 2."""
    args = _parser().parse_args(argv)
    specs = [parse_model_arg(m) for m in args.model]
    check_baseline(args.baseline, [s.name for s in specs])  # before --out is created
    for s in specs:
        if s.kind == "lora":
            s.base, s.force = args.lora_base or s.base, args.force
    gen = GenerationConfig(
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        max_source_length=args.max_source_length,
        device=args.device,
        dtype=args.dtype,
        merge_adapter=not args.no_merge,
    )
    check_output_dir(args.out, "--out")  # before any model is loaded: a bad --out loses no work
    protocol = {"name": args.protocol} | ({"tokenizer": args.tokenizer} if args.tokenizer else {})
    report = evaluate_models(args.prepared, specs, args.out, args.task, gen, split=args.split,
                             limit=args.limit, baseline=args.baseline, protocol=protocol)
    print(f"report written: {report}")
    print(report.with_name(REPORT_MD_FILE).read_text())
    return 0
