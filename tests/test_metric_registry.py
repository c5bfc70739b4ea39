"""The metric registry: the shipped metrics agree with their reference implementations, held-out loss
is the model's own loss, and a metric registered in one place shows up in the report, the gate, the
task spec's validation and the rank sweep's choice.

    .venv/bin/pytest tests/test_metric_registry.py -q
"""

from __future__ import annotations

import json
import math

import pytest
import sacrebleu
import torch
from transformers import AutoTokenizer

from lora_module.evaluation.evaluate import evaluate_predictions
from lora_module.evaluation.generation import GenerationConfig
from lora_module.evaluation.heldout import reference_nll
from lora_module.evaluation.metrics import (
    NLL,
    Metric,
    MetricError,
    compute,
    get_metric,
    metric_names,
    register_metric,
    summarize_metric,
    unregister_metric,
)
from lora_module.evaluation.protocol import PROTOCOLS
from lora_module.evaluation.report import build_report
from lora_module.registry.gate import VersionScore, decide_promotion
from lora_pipeline.flows.specs import TaskSpec, TaskSpecError
from lora_pipeline.flows.sweep import recommend

PREDS = ["alice books a table for two", "bob fixed the laptop", "the train leaves at nine"]
REFS = [["alice books a table for two"], ["bob repairs the laptop"], ["the train leaves at ten"]]
BEST = PROTOCOLS["best-reference"]


def test_shipped_metrics_match_sacrebleu_and_exact_match():
    assert metric_names()[:9] == ("rouge1", "rouge2", "rougeL", "rougeLsum", "exact_match", "chrf", "bleu",
                                  "loss", "perplexity")
    scored = compute(PREDS, REFS, BEST)
    assert "loss" not in scored  # needs the model: outputs alone skip it
    assert scored["exact_match"]["scores"] == [1.0, 0.0, 0.0]
    refs = [[r[0] for r in REFS]]
    for name, expected in (("bleu", sacrebleu.corpus_bleu(PREDS, refs).score),
                           ("chrf", sacrebleu.corpus_chrf(PREDS, refs).score)):
        s = summarize_metric(name, scored[name], n_resamples=200)
        assert s["mean"] == pytest.approx(expected / 100, abs=1e-9)
        assert s["ci_low"] <= s["mean"] <= s["ci_high"] and s["corpus"] and s["n"] == 3
    # Several references: max = sacrebleu's multi-reference BLEU, mean = every reference its own row.
    multi = [["bob repairs the laptop", "bob fixed the laptop"]]
    best = compute(["bob fixed the laptop"], multi, BEST)["bleu"]
    assert summarize_metric("bleu", best, 10)["mean"] == pytest.approx(
        sacrebleu.corpus_bleu(["bob fixed the laptop"], [[multi[0][0]], [multi[0][1]]]).score / 100)
    rows = compute(["bob fixed the laptop"], multi, PROTOCOLS["one-reference-per-row"])["bleu"]
    assert summarize_metric("bleu", rows, 10)["mean"] == pytest.approx(
        sacrebleu.corpus_bleu(["bob fixed the laptop"] * 2, [multi[0]]).score / 100)
    with pytest.raises(MetricError, match="unknown metric 'rouge3'; registered metrics"):
        get_metric("rouge3")


def test_held_out_loss_is_the_models_loss_and_perplexity_its_exp(tiny_t5, seq2seq_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(seq2seq_tokenizer_dir))
    prompts = ["summarize: alice books a table", "summarize: bob repairs the laptop today"]
    refs = [["alice books", "a table"], ["bob repairs"]]
    nll = reference_nll(tiny_t5, tok, prompts, refs, GenerationConfig(batch_size=2, max_new_tokens=16))
    with torch.no_grad():
        for i, j in ((0, 1), (1, 0)):
            enc = tok(prompts[i], return_tensors="pt")
            labels = tok(refs[i][j], return_tensors="pt")["input_ids"]
            hf = tiny_t5(**enc, labels=labels).loss.item()
            total, count = nll[i][j]
            assert count == labels.shape[1] and total / count == pytest.approx(hf, rel=1e-5)
    scored = compute(["x", "y"], refs, PROTOCOLS["one-reference-per-row"], {NLL: nll})
    loss = summarize_metric("loss", scored["loss"], 50)["mean"]
    pooled = sum(n for r in nll for n, _ in r) / sum(t for r in nll for _, t in r)
    assert loss == pytest.approx(pooled)
    assert summarize_metric("perplexity", scored["perplexity"], 50)["mean"] == pytest.approx(math.exp(pooled))
    assert not get_metric("loss").higher_is_better and get_metric("loss").better(1.0, 2.0)


@pytest.fixture
def length_ratio():
    """A metric registered by the test (lower is better: |len(pred) / len(ref) - 1|), removed afterwards."""
    def score(inp):
        return [abs(len(p.split()) / len(r[0].split()) - 1) for p, r in zip(inp.predictions, inp.references,
                                                                           strict=True)]

    metric = register_metric(Metric("length_gap", "length gap", higher_is_better=False, per_example=score))
    yield metric
    unregister_metric("length_gap")
    assert "length_gap" not in metric_names()


def test_a_registered_metric_reaches_report_gate_spec_and_sweep(length_ratio, tmp_path):
    data = {"fingerprint": "f" * 64, "name": "toy"}
    base = evaluate_predictions("base", ["alice", "bob", "the train leaves at nine today or tomorrow"], REFS,
                                tmp_path, kind="base", data=data, n_resamples=50)
    lora = evaluate_predictions("lora", PREDS, REFS, tmp_path, kind="lora", data=data, n_resamples=50)
    report = json.loads(build_report("toy", [base, lora], tmp_path / "r", n_resamples=50).read_text())
    assert "length_gap" in report["metric_names"]
    by_name = {m["name"]: m for m in report["models"]}
    gap = by_name["lora"]["metrics"]["length_gap"]["mean"]
    assert gap == pytest.approx((0 + 0 + 0) / 3) and by_name["base"]["metrics"]["length_gap"]["mean"] > 0.3
    assert "length gap" in (tmp_path / "r" / "report.md").read_text()
    (cmp,) = report["comparisons"]
    assert cmp["metrics"]["length_gap"]["share_a_better"] > 0.5  # lower is better: lora wins
    # The gate: lower is better, so 0.0 beats the base's gap.
    d = decide_promotion({"length_gap": gap, "data_fingerprint": "f"}, {"length_gap": 0.5}, None,
                         "length_gap")
    assert d.promote and "length_gap 0.0000 beats the base model's 0.5000" in d.reason
    assert not VersionScore.from_tags("1", {"metric.length_gap": "0.6", "metric.base.length_gap": "0.5",
                                            "eval.baseline": "base"}, "length_gap").eligible
    # The task spec accepts it (and still refuses an unknown name).
    fields = {"name": "t", "data_config": "d.yaml", "lora_config": "l.yaml", "base_model": "demo"}
    assert TaskSpec(**fields, metric="length_gap").metric == "length_gap"
    with pytest.raises(TaskSpecError, match="metric must be a registered metric, one of .*'length_gap'"):
        TaskSpec(**fields, metric="length_gap2")
    # The sweep recommends by it: the smallest gap wins, the smallest rank within its interval.
    def point(rank, mean):
        return {"name": f"attention-r{rank}", "target": "attention", "rank": rank, "trainable": rank * 100,
                "rouge": {"length_gap": {"mean": mean, "ci_low": mean - 0.02, "ci_high": mean + 0.02,
                                         "n": 3}}}

    points = [point(2, 0.30), point(4, 0.11), point(8, 0.10), point(16, 0.40)]
    rec = recommend(points, "length_gap")
    assert rec["best"]["rank"] == 8 and rec["point"]["rank"] == 4
    assert rec["interval"] == pytest.approx([0.08, 0.12])
