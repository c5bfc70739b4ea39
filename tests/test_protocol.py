"""Evaluation protocols: presets and validation, what each setting changes in the scores, where the
protocol is recorded (eval JSON, report, tables, registration tags and params), and the promotion gate
refusing to compare scores made under different protocols.

    .venv/bin/pytest tests/test_protocol.py -q
"""

from __future__ import annotations

import json

import pytest
from registry_helpers import make_candidate
from rouge_score import rouge_scorer

from lora_module import contracts as c
from lora_module.evaluation.evaluate import evaluate_predictions
from lora_module.evaluation.protocol import PROTOCOLS, EvalProtocol, ProtocolError, resolve_protocol
from lora_module.evaluation.report import ReportInputError, build_report, format_table
from lora_module.evaluation.rouge import RougeInputError, score_examples
from lora_module.registry.gate import VersionScore, choose_champion, decide_promotion
from lora_module.registry.inputs import read_inputs
from lora_pipeline.flows.specs import TaskSpec, TaskSpecError, load_task_spec

REFS = [["alice books a table for two", "alice reserves a table"], ["bob repairs the laptop", "bob fixes it"]]
PREDS = ["alice books a table", "bob repairs a laptop"]


def test_presets_settings_and_one_line_errors():
    assert list(PROTOCOLS) == ["best-reference", "one-reference-per-row", "first-reference"]
    assert resolve_protocol(None) == PROTOCOLS["best-reference"]
    custom = resolve_protocol({"name": "best-reference", "tokenizer": "unicode", "stemmer": True})
    assert custom.name == "best-reference+tokenizer=unicode" and custom.tokenizer == "unicode"
    assert custom.protocol_id != PROTOCOLS["best-reference"].protocol_id
    # The id covers decoding too: the same scoring with another beam width is another protocol.
    greedy = custom.with_decoding({"num_beams": 1, "max_new_tokens": 64, "max_source_length": 256,
                                   "batch_size": 8})
    beams = custom.with_decoding({"num_beams": 4, "max_new_tokens": 64, "max_source_length": 256})
    assert greedy.protocol_id != beams.protocol_id and greedy.decoding == {
        "num_beams": 1, "max_new_tokens": 64, "max_source_length": 256}
    assert EvalProtocol.from_dict(greedy.to_dict()) == greedy
    assert "greedy decoding, up to 64 new tokens" in greedy.describe()
    for bad, match in (("best-of-3", "unknown evaluation protocol 'best-of-3'; named protocols"),
                       ({"references": "median"}, "references must be one of"),
                       ({"stemmer": "yes"}, "stemmer must be true or false"),
                       ({"lowercase": True}, "unknown protocol settings")):
        with pytest.raises(ProtocolError, match=match) as e:
            resolve_protocol(bad)
        assert "\n" not in str(e.value)


def test_each_setting_changes_the_scores_and_the_default_is_rouge_score():
    best = score_examples(PREDS, REFS, ["rouge1"])["rouge1"]
    mean = score_examples(PREDS, REFS, ["rouge1"], "one-reference-per-row")["rouge1"]
    first = score_examples(PREDS, REFS, ["rouge1"], "first-reference")["rouge1"]
    plain = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    per_ref = [[plain.score(r, p)["rouge1"].fmeasure for r in refs]
               for p, refs in zip(PREDS, REFS, strict=True)]
    assert best == [max(s) for s in per_ref]  # byte-identical to rouge_score
    assert mean == [sum(s) / len(s) for s in per_ref] and first == [s[0] for s in per_ref]
    assert mean[0] < best[0]
    unstemmed = score_examples(["he runs"], ["he running"], ["rouge1"], {"stemmer": False})["rouge1"]
    assert unstemmed == [0.5] and score_examples(["he runs"], ["he running"], ["rouge1"])["rouge1"] == [1.0]
    # ROUGE-Lsum on the text's own newlines only: one "sentence" here, two with Punkt.
    text = "Alice came. Bob left."
    punkt = score_examples([text], ["Bob left. Alice came."], ["rougeLsum"])["rougeLsum"]
    lines = score_examples([text], ["Bob left. Alice came."], ["rougeLsum"], {"lsum_splitter": "newline"})
    assert punkt == [1.0] and lines["rougeLsum"][0] < 1.0


def test_unicode_tokens_score_non_latin_text_and_leave_english_unchanged():
    unicode = {"tokenizer": "unicode"}
    for text in ("Привет, как дела у тебя сегодня?", "Η γάτα κάθεται στο χαλί.", "我们明天在北京见面。"):
        with pytest.raises(RougeInputError, match="no ASCII token.*tokenizer 'unicode'"):
            score_examples([text], [text], ["rouge1", "rougeL"])  # rouge_score's tokens: 0 for every model
        scores = score_examples([text], [text], ["rouge1", "rougeL"], unicode)
        assert scores == {"rouge1": [1.0], "rougeL": [1.0]}
    shared = score_examples(["我们明天见"], ["我们后天见"], ["rouge1"], unicode)["rouge1"]
    assert shared == [pytest.approx(0.8)]  # 4 of 5 characters
    english = ["The cats were running quickly to the garden's gate, e.g. at 9 a.m.", "Bob repairs laptops."]
    refs = [["A cat ran to the garden gate at nine."], ["Bob is repairing the laptop!"]]
    assert score_examples(english, refs, protocol=unicode) == score_examples(english, refs)


def _evals(tmp_path, protocol_b):
    data = {"fingerprint": "f" * 64, "name": "toy"}
    a = evaluate_predictions("base", ["table", "laptop"], REFS, tmp_path / "a", kind="base", data=data,
                             n_resamples=50)
    b = evaluate_predictions("lora", PREDS, REFS, tmp_path / "b", kind="lora", data=data, n_resamples=50,
                             protocol=protocol_b)
    return a, b


def test_protocol_is_recorded_and_a_report_refuses_to_mix_protocols(tmp_path):
    a, b = _evals(tmp_path, "one-reference-per-row")
    assert json.loads(b.read_text())["protocol"]["references"] == "mean"
    with pytest.raises(ReportInputError, match="scoring protocol of .* is .*'max'.* has .*'mean'") as e:
        build_report("toy", [a, b], tmp_path / "r")
    assert "\n" not in str(e.value) and "score every model under one protocol" in str(e.value)
    a2 = evaluate_predictions("base", ["table", "laptop"], REFS, tmp_path / "a2", kind="base",
                              data={"fingerprint": "f" * 64}, n_resamples=50,
                              protocol="one-reference-per-row")
    report = json.loads(build_report("toy", [a2, b], tmp_path / "r2", n_resamples=50).read_text())
    assert report["protocol"]["name"] == "one-reference-per-row"
    assert {m["protocol"]["protocol_id"] for m in report["models"]} == {report["protocol"]["protocol_id"]}
    md = (tmp_path / "r2" / c.REPORT_MD_FILE).read_text()
    assert "Scored under protocol one-reference-per-row (" in md and "one reference per row (mean" in md
    table = format_table(["model", "rougeL"], [["lora", "0.5"]], "text",
                         protocol=PROTOCOLS["first-reference"])
    assert table.splitlines()[0].startswith("scored under protocol first-reference (")


def test_registration_records_the_protocol(tmp_path, tiny_t5_dir):
    adapter, report, _ = make_candidate(tmp_path / "c", tiny_t5_dir, seed=1, lora_hits=6)
    inp = read_inputs("demo", adapter, report, None, None, "rougeL")
    expected = PROTOCOLS["best-reference"]
    assert inp.version_tags[c.TAG_EVAL_PROTOCOL] == "best-reference"
    assert inp.version_tags[c.TAG_EVAL_PROTOCOL_ID] == expected.protocol_id  # outputs given: no decoding
    assert inp.run_tags[c.TAG_EVAL_PROTOCOL_ID] == expected.protocol_id
    assert inp.params["eval.protocol.references"] == "max" and inp.params["eval.protocol.stemmer"] == "True"
    shown = c.version_tags(inp.version_tags, inp.rouge_types, "rougeL")
    assert shown[c.TAG_EVAL_PROTOCOL] == "best-reference" and "rouge.rougeL" in shown and len(shown) <= 12
    assert inp.candidate_metrics["protocol_id"] == expected.protocol_id


def test_gate_refuses_to_compare_scores_from_different_protocols():
    one_row, best = PROTOCOLS["one-reference-per-row"], PROTOCOLS["best-reference"]
    cand = {"rougeL": 0.40, "data_fingerprint": "A", "protocol_id": one_row.protocol_id,
            "protocol": one_row.name}
    champion = {"rougeL": 0.45, "data_fingerprint": "A", "version": "1", "protocol_id": best.protocol_id,
                "protocol": best.name}
    d = decide_promotion(cand, {"rougeL": 0.2}, champion, "rougeL")
    assert d.promote and d.champion_comparable is False and d.protocol_id == one_row.protocol_id
    assert (f"the current champion v1 was scored under another evaluation protocol (best-reference "
            f"{best.protocol_id} vs one-reference-per-row {one_row.protocol_id}), so it is not comparable "
            "and the base comparison alone decides") in d.reason
    assert "\n" not in d.reason
    # The same protocol: compared, and kept below the champion.
    same = decide_promotion(cand, {"rougeL": 0.2}, champion | {"protocol_id": one_row.protocol_id}, "rougeL")
    assert not same.promote and "below the current champion v1's 0.4500" in same.reason
    # The registry's choice: the newest eligible version's protocol decides who competes.
    v1 = VersionScore("1", 0.45, 0.2, "A", protocol_id=best.protocol_id)
    v2 = VersionScore("2", 0.40, 0.2, "A", protocol_id=one_row.protocol_id)
    assert choose_champion([v1, v2]).version == "2"
    v3 = VersionScore("3", 0.41, 0.2, "A", protocol_id=best.protocol_id)
    assert choose_champion([v1, v2, v3]).version == "1"
    tags = {"rouge.rougeL": "0.4", "rouge.base.rougeL": "0.2", "eval.baseline": "base",
            "eval_data_fingerprint": "A", c.TAG_EVAL_PROTOCOL_ID: one_row.protocol_id}
    assert VersionScore.from_tags("2", tags, "rougeL").protocol_id == one_row.protocol_id


def test_task_spec_protocol_is_validated_and_dialogsum_uses_the_published_one():
    spec = load_task_spec("dialogsum")
    assert spec.eval_protocol() == PROTOCOLS["one-reference-per-row"]
    assert load_task_spec("summary").eval_protocol() == PROTOCOLS["best-reference"]
    fields = {"name": "t", "data_config": "d.yaml", "lora_config": "l.yaml", "base_model": "demo"}
    spec = TaskSpec(**fields, protocol={"name": "first-reference", "tokenizer": "unicode"})
    assert spec.eval_protocol().name == "first-reference+tokenizer=unicode"
    with pytest.raises(TaskSpecError, match="task 't': protocol: unknown evaluation protocol 'best-of-3'"):
        TaskSpec(**fields, protocol="best-of-3")
