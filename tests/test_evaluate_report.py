"""The report stage without models: real DialogSum human agreement, report files, refusal to mix data.

Run: OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_evaluate_report.py -q
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from lora_module.contracts import REPORT_FILES
from lora_module.evaluation.evaluate import evaluate_predictions
from lora_module.evaluation.report import ReportInputError, build_report, format_table
from lora_module.evaluation.rouge import ROUGE_TYPES, score_examples
from lora_pipeline.flows.reporting import summary_markdown


def _lead(dialogue: str, turns: int = 2) -> str:
    """A trivial summarizer: the first turns of the dialogue without speaker tags."""
    lines = [re.sub(r"^#Person\d#:\s*", "", t) for t in dialogue.splitlines() if t.strip()]
    return " ".join(lines[:turns])


def test_dialogsum_human_agreement_report(dialogsum_dir, tmp_path):
    path = dialogsum_dir / "dialogsum.test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(rows) == 500
    # Our (cached-stemmer) scorer gives exactly rouge_score's numbers on real text too.
    plain = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    ours = score_examples([r["summary1"] for r in rows[:25]], [r["summary2"] for r in rows[:25]])
    for i, r in enumerate(rows[:25]):
        expected = plain.score(r["summary2"], r["summary1"])
        assert all(ours[t][i] == pytest.approx(expected[t].fmeasure, abs=1e-12) for t in expected)
    data = {"fingerprint": hashlib.sha256(path.read_bytes()).hexdigest(), "name": "dialogsum-test"}
    refs = [[r["summary2"], r["summary3"]] for r in rows]
    prompts = [r["dialogue"] for r in rows]
    human = evaluate_predictions(
        "human", [r["summary1"] for r in rows], refs, tmp_path, prompts=prompts, kind="human", data=data
    )
    lead = evaluate_predictions(
        "lead2", [_lead(r["dialogue"]) for r in rows], refs, tmp_path, prompts=prompts, kind="base", data=data
    )
    report_path = build_report(
        "dialogsum-human-agreement", [lead, human], tmp_path / "report", baseline="lead2"
    )

    out = report_path.parent
    for name in REPORT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads(report_path.read_text())
    assert report["n"] == 500 and report["data"]["fingerprint"] == data["fingerprint"]
    by_name = {m["name"]: m for m in report["models"]}
    h = by_name["human"]["metrics"]
    print(
        "DialogSum human agreement (summary1 vs best of summary2/3):",
        {
            t: (round(h[t]["mean"], 4), round(h[t]["ci_low"], 4), round(h[t]["ci_high"], 4))
            for t in ROUGE_TYPES
        },
    )
    # Plausible: published DialogSum inter-annotator ROUGE-1 is in the 0.5s; best-of-two is a bit higher.
    assert 0.45 < h["rouge1"]["mean"] < 0.70
    assert (
        h["rouge2"]["mean"]
        < h["rougeL"]["mean"]
        <= h["rougeLsum"]["mean"] + 0.05
        < h["rouge1"]["mean"] + 0.05
    )
    for t in ROUGE_TYPES:
        s = h[t]
        assert s["ci_low"] < s["mean"] < s["ci_high"] and s["ci_high"] - s["ci_low"] < 0.06
    # Humans beat the lead-2 heuristic by a clear, significant margin.
    assert by_name["lead2"]["metrics"]["rouge1"]["mean"] < h["rouge1"]["mean"] - 0.1
    assert by_name["human"]["change_vs_baseline_points"]["rouge1"] > 10
    (cmp,) = [c for c in report["comparisons"] if c["a"] == "human" and c["b"] == "lead2"]
    assert cmp["metrics"]["rouge1"]["ci_low"] > 0 and cmp["metrics"]["rouge1"]["p_value"] < 0.01

    md = (out / "report.md").read_text()
    assert (
        "| model | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | exact match | chrF | BLEU "
        "| trainable parameters | adapter size on disk |" in md
    )
    # Every table is headed by the protocol it was scored under.
    assert md.count("Scored under protocol best-reference (") == 3
    assert f"{h['rouge1']['mean']:.4f}" in md and "Change vs lead2" in md and "human vs lead2" in md
    assert "p=<0.002" in md and "outputs given" in md
    with open(out / "predictions.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 500
    assert table[0]["output_human"] == rows[0]["summary1"] and table[0]["reference_2"] == rows[0]["summary3"]
    assert table[0]["input"] == rows[0]["dialogue"]
    assert (out / "rouge.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _eval(
    tmp_path: Path, name: str, preds: list[str], fingerprint: str = "f" * 64, kind: str = "base"
) -> Path:
    refs = [["alice books a table for two"], ["bob repairs the laptop"], ["the train leaves at nine"]]
    return evaluate_predictions(
        name, preds, refs[: len(preds)], tmp_path, kind=kind, data={"fingerprint": fingerprint, "name": "toy"}
    )


def test_report_layout_changes_and_comparisons(tmp_path):
    base = _eval(tmp_path, "base", ["table", "laptop", "train"])
    full = _eval(
        tmp_path, "full", ["alice books a table", "bob repairs laptop", "the train leaves"], kind="full"
    )
    lora = _eval(
        tmp_path, "lora", ["alice books table", "bob repairs the laptop", "train leaves"], kind="lora"
    )
    report = json.loads(build_report("toy", [base, full, lora], tmp_path / "r").read_text())
    names = [m["name"] for m in report["models"]]
    assert names == ["base", "full", "lora"]
    pairs = {(c["a"], c["b"]) for c in report["comparisons"]}
    assert pairs == {("lora", "full"), ("full", "base"), ("lora", "base")}
    by_name = {m["name"]: m for m in report["models"]}
    for t in ROUGE_TYPES:
        expected = 100 * (by_name["lora"]["metrics"][t]["mean"] - by_name["base"]["metrics"][t]["mean"])
        assert by_name["lora"]["change_vs_baseline_points"][t] == pytest.approx(expected)
    assert by_name["base"]["change_vs_baseline_points"]["rouge1"] == 0
    # Without the baseline present there are no changes, but LoRA vs full is still compared.
    report2 = json.loads(build_report("toy", [full, lora], tmp_path / "r2").read_text())
    assert report2["baseline"] is None and [(c["a"], c["b"]) for c in report2["comparisons"]] == [
        ("lora", "full")
    ]


def test_report_refuses_different_data(tmp_path):
    a = _eval(tmp_path / "a", "base", ["table", "laptop", "train"], fingerprint="a" * 64)
    b = _eval(tmp_path / "b", "lora", ["table", "laptop", "train"], fingerprint="b" * 64, kind="lora")
    with pytest.raises(ReportInputError, match="different data: data fingerprint"):
        build_report("toy", [a, b], tmp_path / "r")
    c = _eval(tmp_path / "c", "lora", ["table", "laptop"], kind="lora")
    d = _eval(tmp_path / "d", "base", ["table", "laptop", "train"])
    with pytest.raises(ReportInputError, match="example set .* 2 examples"):
        build_report("toy", [d, c], tmp_path / "r")
    assert not (tmp_path / "r").exists()  # nothing half-written
    with pytest.raises(ReportInputError, match="does not exist"):
        build_report("toy", [tmp_path / "nope.eval.json"], tmp_path / "r")
    with pytest.raises(ReportInputError, match="duplicate model names"):
        build_report("toy", [d, d], tmp_path / "r")
    with pytest.raises(ReportInputError, match="at least one"):
        build_report("toy", [], tmp_path / "r")
    bad = tmp_path / "bad.eval.json"
    bad.write_text(json.dumps({"model": {}}))
    with pytest.raises(ReportInputError, match="lacks keys"):
        build_report("toy", [bad], tmp_path / "r")


def test_evaluate_predictions_rejects_empty(tmp_path):
    from lora_module.evaluation.evaluate import EvalInputError

    with pytest.raises(EvalInputError, match="no predictions"):
        evaluate_predictions("x", [], [], tmp_path)


def test_one_table_formatter_aligns_columns_for_every_caller():
    """format_table draws the report's, the flows' and `lora-pipeline list`'s tables: per-column
    alignment in text ('<' / '>') and in Markdown (`---:` right-aligns in a renderer)."""
    header, rows = ["version", "aliases", "rougeL"], [["3", "champion", "0.7500"], ["12", "-", "0.1"]]
    assert format_table(header, rows, "text", align="><>").splitlines() == [
        "version  aliases   rougeL", "      3  champion  0.7500", "     12  -            0.1"]
    assert format_table(header, rows, "text").splitlines()[2] == "12              -     0.1"  # first left
    assert format_table(header, rows, align="<<>").splitlines()[1] == "| --- | --- | ---: |"
    assert format_table(header, rows).splitlines()[1] == "| --- | --- | --- |"
    with pytest.raises(ValueError, match="one '<' or '>' per column"):
        format_table(header, rows, align="<>")
    summary = summary_markdown(
        {"a": {"rouge": {"base": {"rougeL": 0.1}, "lora": {"rougeL": 0.3}}, "model_name": "a-lora",
               "version": "1", "alias": "champion", "seconds": 12.3}}, {"b": "boom | bang"}, 40.0)
    assert summary.splitlines()[2:] == [
        "| task | status | registered | alias | ROUGE-L base | ROUGE-L full | ROUGE-L LoRA | seconds |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
        "| a | ok | a-lora v1 | champion | 10.00 | - | 30.00 | 12 |",
        "| b | FAILED: boom / bang | - | - | - | - | - | - |"]
