"""ROUGE scoring, sentence splitting and bootstrap statistics (no models).

Run: OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_rouge.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
from rouge_score import rouge_scorer

from lora_module.evaluation.rouge import (
    ROUGE_TYPES,
    RougeInputError,
    bootstrap_ci,
    lsum_text,
    paired_bootstrap,
    score_examples,
    split_sentences,
    summarize,
)

PAIRS = [
    ("the cat sat on the mat", "the cat was sitting on the mat"),
    ("#Person1# asks #Person2# to book a table for two.", "#Person2# books a table for two people at nine."),
    ("Bob is running late. He will call Alice back.", "Alice says Bob runs late and calls back."),
    ("completely different words here", "nothing shared at all"),
]


def test_scores_equal_rouge_score_on_fixed_strings():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    preds = [p for _, p in PAIRS]
    refs = [r for r, _ in PAIRS]
    ours = score_examples(preds, refs)
    for i, (ref, pred) in enumerate(PAIRS):
        expected = scorer.score(ref, pred)  # reference first, as rouge_score wants
        for t in ("rouge1", "rouge2", "rougeL"):
            assert ours[t][i] == pytest.approx(expected[t].fmeasure, abs=1e-12), (i, t)
    # Known value by hand: 5 shared unigrams (the, cat, on, the, mat; "sitting"->"sit" != "sat"),
    # P = 5/7, R = 5/6 -> F = 2PR/(P+R) = 10/13.
    assert ours["rouge1"][0] == pytest.approx(10 / 13)
    assert ours["rouge1"][3] == 0.0


def test_lsum_matches_rouge_score_on_newline_split_text():
    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    ref = "Bob is late. Alice waits at the cafe. They meet at nine."
    pred = "Alice waits. Bob is late at nine."
    ours = score_examples([pred], [ref], rouge_types=["rougeLsum"])["rougeLsum"][0]
    expected = scorer.score(
        "Bob is late.\nAlice waits at the cafe.\nThey meet at nine.", "Alice waits.\nBob is late at nine."
    )["rougeLsum"].fmeasure
    assert ours == pytest.approx(expected)
    # Without sentence splitting Lsum degenerates to ROUGE-L; with it the scores differ here.
    unsplit = scorer.score(ref, pred)["rougeLsum"].fmeasure
    assert ours != pytest.approx(unsplit)


def test_split_sentences():
    text = 'Mr. Smith met Dr. J. Doe at the cafe. They talked! #Person1# agreed? "Yes." Then 3 left'
    assert split_sentences(text) == [
        "Mr. Smith met Dr. J. Doe at the cafe.",
        "They talked!",
        "#Person1# agreed?",
        '"Yes."',
        "Then 3 left",
    ]
    assert split_sentences("one line\n\nsecond line.") == ["one line", "second line."]
    # Punkt (as nltk.sent_tokenize): a known abbreviation never ends a sentence, any other word's period does.
    assert split_sentences("See e.g. This one. Price is 3.5 dollars. lower case goes on") == [
        "See e.g. This one.",
        "Price is 3.5 dollars.",
        "lower case goes on",
    ]
    assert split_sentences("") == []
    assert lsum_text("Bob left. Carol stayed.") == "Bob left.\nCarol stayed."


def test_multi_reference_takes_best_per_metric():
    pred = "alice books a table for two at nine"
    good, bad = "alice books a table for two at nine tonight", "bob repairs a laptop"
    multi = score_examples([pred], [[bad, good]])
    single_good = score_examples([pred], [good])
    single_bad = score_examples([pred], [bad])
    for t in ROUGE_TYPES:
        assert multi[t][0] == pytest.approx(max(single_good[t][0], single_bad[t][0]))
        assert multi[t][0] == pytest.approx(single_good[t][0])
    # Best is chosen per metric: each metric takes its own maximum over references.
    refs = ["alice bob carol dave", "dave carol bob alice"]
    pred2 = "alice bob carol dave"
    s = score_examples([pred2], [refs[::-1]])
    assert s["rouge1"][0] == pytest.approx(1.0) and s["rouge2"][0] == pytest.approx(1.0)
    # Empty reference strings are ignored when another reference exists.
    assert score_examples([pred], [["", good]])["rouge1"][0] == pytest.approx(single_good["rouge1"][0])


def test_bad_inputs_are_clear_errors():
    with pytest.raises(RougeInputError, match="predictions is empty"):
        score_examples([], [])
    with pytest.raises(RougeInputError, match="differ in length: 2 predictions vs 1"):
        score_examples(["a", "b"], [["a"]])
    with pytest.raises(RougeInputError, match=r"references\[1\] has no non-empty reference"):
        score_examples(["a", "b"], [["a"], []])
    with pytest.raises(RougeInputError, match=r"references\[0\] has no non-empty reference"):
        score_examples(["a"], [["  "]])
    with pytest.raises(RougeInputError, match="unknown rouge_types"):
        score_examples(["a"], ["a"], rouge_types=["rouge9"])
    with pytest.raises(RougeInputError, match="single string"):
        score_examples("abc", ["abc"])
    with pytest.raises(RougeInputError, match="confidence"):
        bootstrap_ci([0.1, 0.2], confidence=1.5)
    # An empty prediction is a legitimate (bad) output: it scores zero.
    assert score_examples([""], ["some reference"])["rouge1"] == [0.0]


def test_bootstrap_interval_contains_mean_and_narrows_with_n():
    rng = np.random.default_rng(1)
    widths = []
    for n in (20, 200, 2000):
        values = rng.beta(2, 3, size=n)
        low, high = bootstrap_ci(values, n_resamples=1000, seed=0)
        assert low <= values.mean() <= high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    # 1/sqrt(n) scaling: 100x the data -> about a tenth of the width.
    assert 0.05 < widths[2] / widths[0] < 0.2
    # Seeded: the same call gives the same interval.
    assert bootstrap_ci([0.1, 0.5, 0.9], seed=3) == bootstrap_ci([0.1, 0.5, 0.9], seed=3)
    summary = summarize({"rouge1": [0.2, 0.4, 0.6]})
    assert summary["rouge1"]["mean"] == pytest.approx(0.4) and summary["rouge1"]["n"] == 3
    assert summary["rouge1"]["ci_low"] <= 0.4 <= summary["rouge1"]["ci_high"]


def test_bootstrap_coverage_is_near_nominal():
    # Draw many samples from a known distribution: ~95% of intervals should cover the true mean.
    rng = np.random.default_rng(7)
    true_mean = 2 / 5  # Beta(2, 3)
    hits = 0
    trials = 200
    for i in range(trials):
        sample = rng.beta(2, 3, size=100)
        low, high = bootstrap_ci(sample, n_resamples=400, seed=i)
        hits += low <= true_mean <= high
    assert 0.88 <= hits / trials <= 0.99


def test_paired_bootstrap_finds_planted_difference():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.1, 0.6, size=150)  # per-example difficulty varies a lot
    better = np.clip(base + 0.03 + rng.normal(0, 0.01, size=150), 0, 1)
    res = paired_bootstrap(better, base, seed=0)
    assert res["mean_diff"] == pytest.approx(float((better - base).mean()))
    assert 0 < res["ci_low"] <= res["mean_diff"] <= res["ci_high"]
    assert res["p_value"] < 0.01 and res["share_a_better"] > 0.99
    # The paired test sees a difference an unpaired comparison of intervals would miss.
    a_low, a_high = bootstrap_ci(better)
    b_low, b_high = bootstrap_ci(base)
    assert a_low < b_high  # the two marginal intervals overlap
    # No planted difference: the interval straddles zero and p is large.
    noise = np.clip(base + rng.normal(0, 0.01, size=150), 0, 1)
    null = paired_bootstrap(noise, base, seed=0)
    assert null["ci_low"] < 0 < null["ci_high"] and null["p_value"] > 0.05
    # Identical systems: zero difference, p = 1.
    same = paired_bootstrap(base, base)
    assert same["mean_diff"] == 0 and same["p_value"] == 1.0
    with pytest.raises(RougeInputError, match="same examples"):
        paired_bootstrap([0.1, 0.2], [0.1])
