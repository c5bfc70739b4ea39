"""Combine per-model evaluations (`<name>.eval.json`) into one task report.

`build_report(task, eval_paths, out_dir)` writes, under `out_dir`:

- `report.json`: every number of every metric in `lora_module.evaluation.metrics` (scores, intervals,
  changes vs the baseline, paired comparisons), the evaluation protocol, the generation config and
  the data / base / adapter fingerprints;
- `report.md`: the protocol line, the comparison table (model | ROUGE-1 ... | chrF | BLEU | loss ...,
  trainable parameters, adapter size on disk), the change vs the baseline, paired tests;
- `rouge.png`: grouped bars of the 0-1 metrics with 95% interval whiskers;
- `predictions.csv`: input, references and each model's output, one row per example.

Evaluations made on different data (fingerprint, split or example set) or scored under different
protocols are refused: their numbers are not comparable. Usually called through
`lora_module.evaluation.evaluate` (see its CLI).
File names come from `lora_module.contracts` (REPORT_FILES). `format_table` is the project's one
table formatter (Markdown or aligned text; the flows' artifacts and `lora-pipeline list` use it too;
given a protocol it heads the table with it), `rouge_table` its ROUGE-means table.
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
from lora_module.evaluation.metrics import get_metric, metric_names, paired_metric
from lora_module.evaluation.protocol import EvalProtocol, protocol_of
from lora_module.evaluation.rouge import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    ROUGE_LABELS,
    ROUGE_TYPES,
    SENTENCE_SPLITTER,
)
from lora_module.files import write_atomic, write_json_atomic, write_with


class ReportInputError(PipelineError, ValueError):
    """Evaluations that cannot be combined (missing, malformed, or computed on different data)."""


DEFAULT_BASELINE = "base"
"""The baseline when none is named: used when a model of that name was evaluated, else no changes."""


def check_baseline(baseline: str | None, names: Sequence[str]) -> str | None:
    """The baseline to measure changes against: `baseline` when it is one of `names`; None for None
    or an absent DEFAULT_BASELINE. Any other absent name: ReportInputError (it would silently drop
    every comparison)."""
    if baseline is None or baseline in names:
        return baseline
    if baseline == DEFAULT_BASELINE:
        return None
    raise ReportInputError(
        f"baseline {baseline!r} is not one of the evaluated models {list(names)}; name one of them "
        f"(--baseline), or leave it out ({DEFAULT_BASELINE!r} when evaluated)")


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], style: str = "markdown",
                 indent: str = "", align: str | None = None,
                 protocol: EvalProtocol | str | None = None) -> str:
    """The one table formatter (reports, the flows' artifacts, `lora-pipeline list`): Markdown, or
    plain text with padded columns. `align`: one '<' (left) or '>' (right) per column; None: plain
    text puts the first column left and the rest right, Markdown leaves alignment to the renderer.
    `protocol` (an EvalProtocol or its `describe()` line): scores are meaningless without it, so a
    table of scores is headed by it."""
    if align is not None and (len(align) != len(header) or set(align) - {"<", ">"}):
        raise ValueError(f"align={align!r} needs one '<' or '>' per column ({len(header)} columns)")
    caption = protocol.describe() if isinstance(protocol, EvalProtocol) else protocol
    if style == "markdown":
        rule = ["---" if align is None or a == "<" else "---:" for a in align or header]
        table = "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in [header, rule, *rows])
        return f"Scored under {caption}.\n\n{table}" if caption else table
    align = align or "<" + ">" * (len(header) - 1)
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = [f"scored under {caption}"] if caption else []
    lines += ["  ".join(str(c).ljust(w) if a == "<" else str(c).rjust(w)
                        for c, w, a in zip(line, widths, align, strict=True)) for line in [header, *rows]]
    return "\n".join(indent + line for line in lines)


def rouge_table(rows: Mapping[str, Mapping[str, Any]], style: str = "markdown", indent: str = "") -> str:
    """ROUGE means (x100) and trainable parameters; `rows`: model -> {rouge type: mean, "trainable": n,
    "protocol": its describe() line}; the protocol heads the table when every row has the same one."""
    body = []
    for name, r in rows.items():
        trainable = f"{r['trainable']:,}" if isinstance(r.get("trainable"), int) else "-"
        body.append([name, *(f"{100 * r[t]:.2f}" for t in ROUGE_TYPES), trainable])
    protocols = {r.get("protocol") for r in rows.values()}
    return format_table(["model", *(ROUGE_LABELS[t] for t in ROUGE_TYPES), "trainable params"], body,
                        style, indent, protocol=protocols.pop() if len(protocols) == 1 else None)


def load_eval(path: str | os.PathLike) -> dict:
    """Read one `<name>.eval.json`, checking the fields the report needs."""
    p = Path(path)
    if not p.is_file():
        raise ReportInputError(f"evaluation file {p} does not exist")
    try:
        ev = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ReportInputError(f"evaluation file {p} is not valid JSON: {e}") from e
    if "rouge" in ev and "metrics" not in ev:  # schema 1: ROUGE only, best reference, no protocol
        ev["metrics"] = ev.pop("rouge")
    required = ("model", "data", "split", "metrics", "examples", "params", "fingerprints")
    missing = [k for k in required if k not in ev]
    if missing:
        raise ReportInputError(f"evaluation file {p} lacks keys {missing}; was it written by evaluate_model?")
    ev["_path"] = str(p)
    ev["_protocol"] = protocol_of(ev)
    return ev


def _check_comparable(evals: list[dict]) -> None:
    first = evals[0]
    for ev in evals[1:]:
        for what, get in (
            ("data fingerprint", lambda e: e["data"].get("fingerprint")),
            ("split", lambda e: e["split"]),
            ("example set", lambda e: e["examples"]["index"]),
            ("scoring protocol", lambda e: e["_protocol"].scoring()),
        ):
            if get(ev) != get(first):
                shown_a, shown_b = repr(get(first)), repr(get(ev))
                if what == "example set":
                    shown_a, shown_b = f"{len(get(first))} examples", f"{len(get(ev))} examples"
                fix = ("score every model under one protocol" if what == "scoring protocol" else
                       "evaluate all models on the same prepared folder, split and limit")
                raise ReportInputError(
                    f"cannot combine evaluations computed on different data: {what} of {first['_path']} is "
                    f"{shown_a} but {ev['_path']} has {shown_b}; {fix}"
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


def _comparisons(evals: dict[str, dict], names: list[str], baseline: str | None, n_resamples: int,
                 seed: int) -> list[dict]:
    pairs: list[tuple[str, str]] = []
    loras = [n for n, e in evals.items() if e["model"]["kind"] == "lora"]
    fulls = [n for n, e in evals.items() if e["model"]["kind"] == "full"]
    for a in loras:
        pairs += [(a, b) for b in fulls]
    if baseline is not None:
        pairs += [(a, baseline) for a in evals if a != baseline and (a, baseline) not in pairs]
    return [{"a": a, "b": b, "metrics": {m: paired_metric(m, _scored(evals[a], m), _scored(evals[b], m),
                                                         n_resamples, seed=seed) for m in names}}
            for a, b in pairs]


def _scored(ev: dict, name: str) -> dict[str, list]:
    """One metric's per-example scores or statistics of an evaluation (`metrics.compute`'s form)."""
    examples = ev["examples"]
    if name in examples.get("stats", {}):
        return {"stats": examples["stats"][name]}
    return {"scores": examples["scores"][name]}


def _report_metrics(evals: list[dict]) -> list[str]:
    """The registered metrics every evaluation has, in the registry's order."""
    return [m for m in metric_names() if all(m in ev["metrics"] for ev in evals)]


def build_report(
    task: str,
    eval_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    baseline: str | None = DEFAULT_BASELINE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> Path:
    """Write report.json, report.md, rouge.png and predictions.csv; returns report.json's path.

    `baseline` names the model that changes are measured against (None, or DEFAULT_BASELINE when no
    model has that name: no changes; another name that is not an evaluated model: ReportInputError,
    before anything is written). Paired comparisons: every LoRA model vs every full fine-tune, and
    every model vs the baseline.
    """
    if not eval_paths:
        raise ReportInputError("build_report needs at least one evaluation file")
    loaded = [load_eval(p) for p in eval_paths]
    names = [e["model"]["name"] for e in loaded]
    if len(set(names)) != len(names):
        raise ReportInputError(f"evaluations have duplicate model names {names}; names must be unique")
    _check_comparable(loaded)
    evals = dict(zip(names, loaded, strict=True))
    baseline = check_baseline(baseline, names)
    first = loaded[0]
    names = _report_metrics(loaded)
    report = {
        "task": task,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": first["data"],
        "split": first["split"],
        "n": len(first["examples"]["index"]),
        "baseline": baseline,
        "protocol": first["_protocol"].to_dict(),
        "metric_names": names,
        "bootstrap": {"n_resamples": n_resamples, "confidence": 0.95, "seed": seed},
        "models": [_model_row(name, ev, evals, baseline, names) for name, ev in evals.items()],
        "comparisons": _comparisons(evals, names, baseline, n_resamples, seed),
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


def _model_row(name: str, ev: dict, evals: dict[str, dict], baseline: str | None,
               names: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": name,
        "kind": ev["model"]["kind"],
        "path": ev["model"].get("path"),
        "metrics": {m: ev["metrics"][m] for m in names},
        "protocol": ev["_protocol"].to_dict(),
        "params": ev["params"],
        "fingerprints": ev["fingerprints"],
        "generation": ev.get("generation"),
        "timing": ev.get("timing"),
        "empty_predictions": ev.get("empty_predictions"),
        "training_metrics": ev.get("training_metrics"),
        "eval_file": ev["_path"],
    }
    if baseline is not None:  # in each metric's display units (ROUGE points, nats)
        base = evals[baseline]["metrics"]
        row["change_vs_baseline_points"] = {
            m: get_metric(m).scale * (ev["metrics"][m]["mean"] - base[m]["mean"]) for m in names
        }
    return row


def _notes(evals: dict[str, dict], baseline: str | None) -> list[str]:
    """Warnings for the reader: mixed decoding settings, adapters on another base than the baseline."""
    notes = []
    gens = {json.dumps(e.get("generation"), sort_keys=True) for e in evals.values() if e.get("generation")}
    if len(gens) > 1:
        notes.append("models were decoded with different generation settings (see report.json)")
    decodings = {json.dumps(e["_protocol"].decoding, sort_keys=True) for e in evals.values()}
    if len(decodings) > 1 and len(gens) <= 1:
        notes.append("the models' protocols differ in decoding (see each model's protocol in report.json)")
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
    protocol = EvalProtocol.from_dict(report["protocol"])
    names = report["metric_names"]
    lines = [
        f"# ROUGE evaluation: {report['task']}",
        "",
        f"Data `{data.get('name')}` (fingerprint `{fp}`), split `{report['split']}`, {report['n']} examples. "
        f"Scores: {', '.join(get_metric(m).label for m in names)}; brackets hold 95% bootstrap intervals "
        f"({report['bootstrap']['n_resamples']} resamples).",
        "",
        f"ROUGE-Lsum: sentences split with {SENTENCE_SPLITTER}, one per line as rouge_score expects."
        if protocol.lsum_splitter == "punkt" else "ROUGE-Lsum: the texts' own newlines end sentences.",
        "",
        _scores_table(report["models"], names, protocol),
    ]
    labels = [_unit_label(m) for m in names]
    if report["baseline"] is not None:
        rows = [[m["name"], *(f"{m['change_vs_baseline_points'][t]:+.2f}" for t in names)]
                for m in report["models"] if m["name"] != report["baseline"]]
        lines += ["", f"## Change vs {report['baseline']}", "",
                  format_table(["model", *labels], rows, protocol=protocol)]
    if report["comparisons"]:
        title = "## Paired comparisons (A - B, 95% bootstrap interval, bootstrap p-value)"
        lines += ["", title, "",
                  format_table(["A vs B", *labels], _comparison_rows(report), protocol=protocol)]
    fingerprints = [[m["name"], *(f"`{(m['fingerprints'].get(k) or '-')[:12]}`"
                                  for k in ("data", "base", "model", "adapter_sha256"))]
                    for m in report["models"]]
    lines += ["", "## Fingerprints", "",
              format_table(["model", "data", "base", "model weights", "adapter sha256"], fingerprints)]
    for note in report["notes"]:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def _unit_label(name: str) -> str:
    """A metric's column header with the unit its changes are in: `ROUGE-1 (points)`, `loss (nats)`."""
    metric = get_metric(name)
    return f"{metric.label} ({metric.unit})" if metric.unit else metric.label


def _scores_table(models: list[dict], names: list[str], protocol: EvalProtocol) -> str:
    rows = []
    for m in models:
        disk = _human_bytes(m["params"].get("disk_bytes"))
        if m["kind"] == "full" and m["params"].get("disk_bytes") is not None:
            disk += " (whole model)"
        rows.append([_legend_label(m), *(_score_cell(m["metrics"][t]) for t in names),
                     _params_text(m["params"]), disk])
    labels = [get_metric(t).label for t in names]
    return format_table(["model", *labels, "trainable parameters", "adapter size on disk"], rows,
                        protocol=protocol)


def _comparison_rows(report: dict) -> list[list[str]]:
    rows = []
    for c in report["comparisons"]:
        cells = []
        for t in report["metric_names"]:
            r, k = c["metrics"][t], get_metric(t).scale
            cells.append(
                f"{k * r['mean_diff']:+.2f} [{k * r['ci_low']:+.2f}, {k * r['ci_high']:+.2f}] "
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
    names = [m for m in report["metric_names"] if get_metric(m).bounded]  # one 0-1 axis
    fig = Figure(figsize=(1.6 + 1.7 * len(names), 4.2), dpi=110)
    ax = fig.subplots()
    width = 0.8 / len(models)
    for j, m in enumerate(models):
        scores = [m["metrics"][t] for t in names]
        low = [s["mean"] - s["ci_low"] for s in scores]
        high = [s["ci_high"] - s["mean"] for s in scores]
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(names))]
        ax.bar(xs, [s["mean"] for s in scores], width, yerr=[low, high], capsize=3, label=_legend_label(m))
    ax.set_xticks(range(len(names)), [get_metric(t).label for t in names])
    ax.set_ylabel("score (95% bootstrap interval)")
    top = max((m["metrics"][t]["ci_high"] for t in names for m in models), default=1.0)
    ax.set_ylim(0, min(1.0, top * 1.25 + 0.02))
    ax.set_title(f"{report['task']}: ROUGE on {report['split']} "
                 f"(n={report['n']}, {_references_text(reference_counts)})")
    ax.set_xlabel(f"protocol {report['protocol']['name']}", fontsize="small")
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
