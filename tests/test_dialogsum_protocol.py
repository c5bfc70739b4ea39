"""The protocol really changes the number: DialogSum's lead-2 baseline (the first two dialogue turns,
speaker tags removed) scored with one reference per row, as the published FLAN-T5-base figures were,
and as the best of three references. Pure scoring on ../shared/data/dialogsum (skipped without it).

    .venv/bin/pytest tests/test_dialogsum_protocol.py -q
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from lora_module.evaluation.rouge import score_examples


def _lead2(dialogue: str) -> str:
    turns = [re.sub(r"^#Person\d#:\s*", "", t) for t in dialogue.splitlines() if t.strip()]
    return " ".join(turns[:2])


def test_one_reference_per_row_scores_4_to_7_rouge1_points_below_best_of_3(dialogsum_dir):
    rows = [json.loads(line) for line in (dialogsum_dir / "dialogsum.test.jsonl").read_text().splitlines()
            if line.strip()]
    assert len(rows) == 500
    preds = [_lead2(r["dialogue"]) for r in rows]
    refs = [[r["summary1"], r["summary2"], r["summary3"]] for r in rows]
    single = 100 * np.mean(score_examples(preds, refs, ["rouge1"], "one-reference-per-row")["rouge1"])
    best = 100 * np.mean(score_examples(preds, refs, ["rouge1"], "best-reference")["rouge1"])
    # One reference per row is what the Hub's ungrouped split (each dialogue once per summary) gives:
    # the mean of scoring each reference as its own row.
    per_row = [score_examples(preds, [r[k] for r in refs], ["rouge1"])["rouge1"] for k in range(3)]
    assert single == pytest.approx(100 * np.mean(per_row), abs=1e-9)
    print(f"lead-2 ROUGE-1: one reference per row {single:.2f}, best of 3 {best:.2f}")
    assert round(single, 2) == 20.70 and round(best, 2) == 26.19  # the figures issue #24 measured
    assert 4.0 <= best - single <= 7.0
