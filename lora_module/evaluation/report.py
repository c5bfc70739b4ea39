"""Combine per-model evaluations (`<name>.eval.json`) into one task report.

`build_report(task, eval_paths, out_dir)` writes, under `out_dir`:

- `report.json`: every number (means, intervals, changes vs the baseline, paired comparisons),
  the generation config and the data / base / adapter fingerprints;
- `report.md`: the comparison table (model | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum, trainable
  parameters, adapter size on disk), the change vs the baseline in ROUGE points, paired tests;
- `rouge.png`: grouped bars with 95% interval whiskers;
- `predictions.csv`: input, references and each model's output, one row per example.

Evaluations made on different data (fingerprint, split or example set) are refused: their
numbers are not comparable. Usually called through `lora_module.evaluation.evaluate` (see its CLI).
File names come from `lora_module.contracts` (REPORT_FILES). `format_table` is the project's one
table formatter (Markdown or aligned text; the flows' artifacts and `lora-pipeline list` use it too),
`rouge_table` its ROUGE-means table.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lora_module import contracts
from lora_module.errors import PipelineError
from lora_module.evaluation.rouge import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    ROUGE_LABELS,
    ROUGE_TYPES,
    SENTENCE_SPLITTER,
    paired_bootstrap,
)
from lora_module.files import write_atomic, write_json_atomic, write_with


class ReportInputError(PipelineError, ValueError):
    """Evaluations that cannot be combined (missing, malformed, or computed on different data)."""


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], style: str = "markdown",
                 indent: str = "", align: str | None = None) -> str:
    """The one table formatter (reports, the flows' artifacts, `lora-pipeline list`): Markdown, or
    plain text with padded columns. `align`: one '<' (left) or '>' (right) per column; None: plain
    text puts the first column left and the rest right, Markdown leaves alignment to the renderer."""
    if align is not None and (len(align) != len(header) or set(align) - {"<", ">"}):
        raise ValueError(f"align={align!r} needs one '<' or '>' per column ({len(header)} columns)")
    if style == "markdown":
        rule = ["---" if align is None or a == "<" else "---:" for a in align or header]
        return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in [header, rule, *rows])
    align = align or "<" + ">" * (len(header) - 1)
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    return "\n".join(
        indent + "  ".join(str(c).ljust(w) if a == "<" else str(c).rjust(w)
                           for c, w, a in zip(line, widths, align, strict=True))
        for line in [header, *rows]
    )


def rouge_table(rows: Mapping[str, Mapping[str, Any]], style: str = "markdown", indent: str = "") -> str:
    """ROUGE means (x100) and trainable parameters; `rows`: model -> {rouge type: mean, "trainable": n}."""
    body = []
    for name, r in rows.items():
        trainable = f"{r['trainable']:,}" if isinstance(r.get("trainable"), int) else "-"
        body.append([name, *(f"{100 * r[t]:.2f}" for t in ROUGE_TYPES), trainable])
    return format_table(["model", *(ROUGE_LABELS[t] for t in ROUGE_TYPES), "trainable params"], body,
                        style, indent)


def load_eval(path: str | os.PathLike) -> dict:
    """Read one `<name>.eval.json`, checking the fields the report needs."""
    p = Path(path)
    if not p.is_file():
        raise ReportInputError(f"evaluation file {p} does not exist")
    try:
        ev = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ReportInputError(f"evaluation file {p} is not valid JSON: {e}") from e
    required = ("model", "data", "split", "rouge", "examples", "params", "fingerprints")
    missing = [k for k in required if k not in ev]
    if missing:
        raise ReportInputError(f"evaluation file {p} lacks keys {missing}; was it written by evaluate_model?")
    ev["_path"] = str(p)
    return ev


def _check_comparable(evals: list[dict]) -> None:
    first = evals[0]
    for ev in evals[1:]:
        for what, get in (
            ("data fingerprint", lambda e: e["data"].get("fingerprint")),
            ("split", lambda e: e["split"]),
            ("example set", lambda e: e["examples"]["index"]),
        ):
            if get(ev) != get(first):
                shown_a, shown_b = repr(get(first)), repr(get(ev))
                if what == "example set":
                    shown_a, shown_b = f"{len(get(first))} examples", f"{len(get(ev))} examples"
                raise ReportInputError(
                    f"cannot combine evaluations computed on different data: {what} of {first['_path']} is "
                    f"{shown_a} but {ev['_path']} has {shown_b}; evaluate all models on the same "
                    "prepared folder, split and limit"
                )


def _score_cell(s: dict) -> str:
    return f"{s['mean']:.4f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"


def _p_text(p: float, n_resamples: int) -> str:
    # A bootstrap p-value cannot resolve below 2 / n_resamples; print a bound, not a false zero.
    floor = 2.0 / n_resamples
    return f"<{floor:.3g}" if p < floor else f"{p:.3f}"


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _params_text(params: dict) -> str:
    trainable = params.get("trainable")
    if trainable is None:
        return "-"
    if trainable == 0:
        return "0 (frozen)"
    pct = params.get("trainable_pct")
    return f"{trainable:,}" + (f" ({pct:.2f}%)" if pct is not None else "")


def _comparisons(evals: dict[str, dict], baseline: str | None, n_resamples: int, seed: int) -> list[dict]:
    pairs: list[tuple[str, str]] = []
    loras = [n for n, e in evals.items() if e["model"]["kind"] == "lora"]
    fulls = [n for n, e in evals.items() if e["model"]["kind"] == "full"]
    for a in loras:
        pairs += [(a, b) for b in fulls]
    if baseline is not None:
        pairs += [(a, baseline) for a in evals if a != baseline and (a, baseline) not in pairs]
    out = []
    for a, b in pairs:
        metrics = {}
        for t in ROUGE_TYPES:
            res = paired_bootstrap(
                evals[a]["examples"]["scores"][t], evals[b]["examples"]["scores"][t], n_resamples, seed=seed
            )
            metrics[t] = res
        out.append({"a": a, "b": b, "metrics": metrics})
    return out


def build_report(
    task: str,
    eval_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    baseline: str | None = "base",
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> Path:
    """Write report.json, report.md, rouge.png and predictions.csv; returns report.json's path.

    `baseline` names the model that changes are measured against (None or an absent name: no
    changes). Paired comparisons: every LoRA model vs every full fine-tune, and every model vs
    the baseline.
    """
    if not eval_paths:
        raise ReportInputError("build_report needs at least one evaluation file")
    loaded = [load_eval(p) for p in eval_paths]
    names = [e["model"]["name"] for e in loaded]
    if len(set(names)) != len(names):
        raise ReportInputError(f"evaluations have duplicate model names {names}; names must be unique")
    _check_comparable(loaded)
    evals = dict(zip(names, loaded, strict=True))
    if baseline is not None and baseline not in evals:
        baseline = None
    first = loaded[0]
    report = {
        "task": task,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": first["data"],
        "split": first["split"],
        "n": len(first["examples"]["index"]),
        "baseline": baseline,
        "rouge_types": list(ROUGE_TYPES),
        "bootstrap": {"n_resamples": n_resamples, "confidence": 0.95, "seed": seed},
        "models": [_model_row(name, ev, evals, baseline) for name, ev in evals.items()],
        "comparisons": _comparisons(evals, baseline, n_resamples, seed),
        "notes": _notes(evals, baseline),
        "files": list(contracts.REPORT_FILES),
    }
    out_dir = Path(out_dir)
    json_path = write_json_atomic(out_dir / contracts.REPORT_FILE, report)
    write_atomic(out_dir / contracts.REPORT_MD_FILE, _markdown(report))
    references = [len(r) for r in first["examples"]["references"]]
    _write_chart(report, out_dir / contracts.ROUGE_CHART_FILE, references)
    _write_predictions(evals, out_dir / contracts.PREDICTIONS_FILE)
    return json_path


def _model_row(name: str, ev: dict, evals: dict[str, dict], baseline: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": name,
        "kind": ev["model"]["kind"],
        "path": ev["model"].get("path"),
        "rouge": ev["rouge"],
        "params": ev["params"],
        "fingerprints": ev["fingerprints"],
        "generation": ev.get("generation"),
        "timing": ev.get("timing"),
        "empty_predictions": ev.get("empty_predictions"),
        "training_metrics": ev.get("training_metrics"),
        "eval_file": ev["_path"],
    }
    if baseline is not None:
        base_rouge = evals[baseline]["rouge"]
        row["change_vs_baseline_points"] = {
            t: 100.0 * (ev["rouge"][t]["mean"] - base_rouge[t]["mean"]) for t in ROUGE_TYPES
        }
    return row


def _notes(evals: dict[str, dict], baseline: str | None) -> list[str]:
    """Warnings for the reader: mixed decoding settings, adapters on another base than the baseline."""
    notes = []
    gens = {json.dumps(e.get("generation"), sort_keys=True) for e in evals.values() if e.get("generation")}
    if len(gens) > 1:
        notes.append("models were decoded with different generation settings (see report.json)")
    if baseline is not None:
        base_fp = evals[baseline]["fingerprints"].get("base")
        for name, ev in evals.items():
            fp = ev["fingerprints"].get("base")
            if ev["model"]["kind"] == "lora" and base_fp and fp and fp != base_fp:
                notes.append(
                    f"adapter {name!r} sits on a base (fingerprint {fp[:12]}) other than the baseline "
                    f"{baseline!r} ({base_fp[:12]}): its change vs the baseline mixes two bases"
                )
    return notes


def _markdown(report: dict) -> str:
    data = report["data"]
    fp = (data.get("fingerprint") or "?")[:12]
    gen = next((m["generation"] for m in report["models"] if m.get("generation")), None)
    if gen is None:
        decoding = "outputs given, not generated"
    else:
        search = "greedy" if gen["num_beams"] == 1 else f"beam search ({gen['num_beams']} beams)"
        decoding = f"{search} decoding, up to {gen['max_new_tokens']} new tokens"
    lines = [
        f"# ROUGE evaluation: {report['task']}",
        "",
        f"Data `{data.get('name')}` (fingerprint `{fp}`), split `{report['split']}`, {report['n']} examples; "
        f"{decoding}. Scores are ROUGE F-measures (rouge_score, stemming, best of the references); "
        f"brackets hold 95% bootstrap intervals ({report['bootstrap']['n_resamples']} resamples).",
        "",
        f"ROUGE-Lsum: sentences split with {SENTENCE_SPLITTER}, one per line as rouge_score expects.",
        "",
        _scores_table(report["models"]),
    ]
    labels = [ROUGE_LABELS[t] for t in ROUGE_TYPES]
    if report["baseline"] is not None:
        rows = [[m["name"], *(f"{m['change_vs_baseline_points'][t]:+.2f}" for t in ROUGE_TYPES)]
                for m in report["models"] if m["name"] != report["baseline"]]
        lines += ["", f"## Change vs {report['baseline']} (ROUGE points)", "",
                  format_table(["model", *labels], rows)]
    if report["comparisons"]:
        title = "## Paired comparisons (A - B in ROUGE points, 95% bootstrap interval, bootstrap p-value)"
        lines += ["", title, "", format_table(["A vs B", *labels], _comparison_rows(report))]
    fingerprints = [[m["name"], *(f"`{(m['fingerprints'].get(k) or '-')[:12]}`"
                                  for k in ("data", "base", "model", "adapter_sha256"))]
                    for m in report["models"]]
    lines += ["", "## Fingerprints", "",
              format_table(["model", "data", "base", "model weights", "adapter sha256"], fingerprints)]
    for note in report["notes"]:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def _scores_table(models: list[dict]) -> str:
    rows = []
    for m in models:
        disk = _human_bytes(m["params"].get("disk_bytes"))
        if m["kind"] == "full" and m["params"].get("disk_bytes") is not None:
            disk += " (whole model)"
        rows.append([_legend_label(m), *(_score_cell(m["rouge"][t]) for t in ROUGE_TYPES),
                     _params_text(m["params"]), disk])
    labels = [ROUGE_LABELS[t] for t in ROUGE_TYPES]
    return format_table(["model", *labels, "trainable parameters", "adapter size on disk"], rows)


def _comparison_rows(report: dict) -> list[list[str]]:
    rows = []
    for c in report["comparisons"]:
        cells = []
        for t in ROUGE_TYPES:
            r = c["metrics"][t]
            cells.append(
                f"{100 * r['mean_diff']:+.2f} [{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}] "
                f"p={_p_text(r['p_value'], report['bootstrap']['n_resamples'])}"
            )
        rows.append([f"{c['a']} vs {c['b']}", *cells])
    return rows


def _references_text(counts: list[int]) -> str:
    """'1 reference each', '3 references each' or '1-3 references each' for per-example reference counts."""
    low, high = (min(counts), max(counts)) if counts else (0, 0)
    span = str(low) if low == high else f"{low}-{high}"
    return f"{span} reference{'' if high == 1 else 's'} each"


def _legend_label(model: dict) -> str:
    """A model's label in the chart and table: its kind only when the name does not already say it
    (`base`, not `base (base)`)."""
    return model["name"] if model["name"] == model["kind"] else f"{model['name']} ({model['kind']})"


def _write_chart(report: dict, path: Path, reference_counts: list[int]) -> None:
    # Figure without pyplot: no global backend state, safe in worker threads and headless runs.
    from matplotlib.figure import Figure

    models = report["models"]
    fig = Figure(figsize=(1.6 + 1.7 * len(ROUGE_TYPES), 4.2), dpi=110)
    ax = fig.subplots()
    width = 0.8 / len(models)
    for j, m in enumerate(models):
        means = [m["rouge"][t]["mean"] for t in ROUGE_TYPES]
        low = [m["rouge"][t]["mean"] - m["rouge"][t]["ci_low"] for t in ROUGE_TYPES]
        high = [m["rouge"][t]["ci_high"] - m["rouge"][t]["mean"] for t in ROUGE_TYPES]
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(ROUGE_TYPES))]
        ax.bar(xs, means, width, yerr=[low, high], capsize=3, label=_legend_label(m))
    ax.set_xticks(range(len(ROUGE_TYPES)), [ROUGE_LABELS[t] for t in ROUGE_TYPES])
    ax.set_ylabel("F-measure (95% bootstrap interval)")
    top = max(m["rouge"][t]["ci_high"] for t in ROUGE_TYPES for m in models)
    ax.set_ylim(0, min(1.0, top * 1.25 + 0.02))
    ax.set_title(f"{report['task']}: ROUGE on {report['split']} "
                 f"(n={report['n']}, {_references_text(reference_counts)})")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png"))


def _write_predictions(evals: dict[str, dict], path: Path) -> None:
    first = next(iter(evals.values()))["examples"]
    n_refs = max((len(r) for r in first["references"]), default=0)
    header = ["index", "input"] + [f"reference_{k + 1}" for k in range(n_refs)]
    header += [f"output_{name}" for name in evals]
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    for i, idx in enumerate(first["index"]):
        refs = list(first["references"][i]) + [""] * (n_refs - len(first["references"][i]))
        outputs = [ev["examples"]["prediction"][i] for ev in evals.values()]
        writer.writerow([idx, first["prompt"][i], *refs, *outputs])
    write_atomic(path, text.getvalue())
