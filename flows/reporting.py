"""What the flows show: ROUGE tables, Markdown artifacts and links into the MLflow UI.

Presentation only, with credentials masked in every URI shown: the numbers come from
`lora_module.evaluation.report` (report.json) and the registry; every table is drawn by its
`format_table` / `rouge_table`, headed by the evaluation protocol.
"""

from __future__ import annotations

from typing import Any

from lora_module.contracts import run_link
from lora_module.evaluation.protocol import protocol_of
from lora_module.evaluation.report import format_table, rouge_table
from lora_module.evaluation.rouge import ROUGE_TYPES
from lora_module.redact import MASK, redact_uri

LOCAL_UI = "http://127.0.0.1:5000"


def rouge_rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Model name -> kind, mean ROUGE per type, trainable parameters and the protocol line, from a
    report.json."""
    rows = {}
    for m in report["models"]:
        rows[m["name"]] = {"kind": m["kind"], **{t: m["metrics"][t]["mean"] for t in ROUGE_TYPES},
                           "trainable": (m.get("params") or {}).get("trainable"),
                           "protocol": protocol_of(m).describe()}
    return rows


def mlflow_run_link(tracking_uri: str, run_id: str) -> str:
    """A browser link to the MLflow run (for a local SQLite store: after `mlflow ui` starts on port 5000),
    without the tracking URI's credentials (the browser asks for them)."""
    base = (redact_uri(tracking_uri).replace(f"://{MASK}@", "://").rstrip("/")
            if tracking_uri.startswith(("http://", "https://")) else LOCAL_UI)
    experiment = None
    try:
        from mlflow import MlflowClient

        experiment = MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.experiment_id
    except Exception:  # a link is a convenience: never fail a flow over it
        pass
    return f"{base}/{run_link(experiment, run_id)}" if experiment else f"{base}/#/runs/{run_id}"


def _ui_hint(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return ""
    return f" (start the UI first: `mlflow ui --backend-store-uri {redact_uri(tracking_uri)}`)"


def task_markdown(task: str, report: dict[str, Any], reg: dict[str, Any], link: str, report_path: str) -> str:
    """The per-task artifact: ROUGE table, registered version, gate decision and the MLflow run link."""
    reason = (reg.get("decision") or {}).get("reason", "")
    return "\n".join([
        f"# Task `{task}`: ROUGE on {report.get('n')} test examples",
        "",
        rouge_table(rouge_rows(report)),
        "",
        f"Registered **{reg['model_name']} v{reg['version']}** as `{reg['alias']}`: {reason}",
        "",
        f"MLflow run: [{reg['run_id']}]({link}){_ui_hint(reg['tracking_uri'])}",
        "",
        f"Full report (paired comparisons, fingerprints): `{report_path}`",
    ]) + "\n"


def summary_markdown(results: dict[str, dict], failed: dict[str, str], seconds: float) -> str:
    """The many-task artifact: one line per task (version or error) and each task's ROUGE-L."""
    header = ["task", "status", "registered", "alias", "ROUGE-L base", "ROUGE-L full", "ROUGE-L LoRA",
              "seconds"]

    def cell(rows: dict, name: str) -> str:
        return f"{100 * rows[name]['rougeL']:.2f}" if name in rows else "-"

    body = [[name, "ok", f"{r['model_name']} v{r['version']}", r["alias"],
             *(cell(r["rouge"], m) for m in ("base", "full", "lora")), f"{r['seconds']:.0f}"]
            for name, r in results.items()]
    body += [[name, f"FAILED: {err[:200].replace('|', '/')}", *["-"] * 6] for name, err in failed.items()]
    title = f"# Pipeline summary ({len(results)} succeeded, {len(failed)} failed, {seconds:.0f} s)"
    return "\n".join([title, "", format_table(header, body, align="<<<<>>>>")]) + "\n"
