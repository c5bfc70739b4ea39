"""Tidy surfaces: ROUGE-Lsum splits sentences the standard way and says so; no spurious import warning.

    .venv/bin/pytest tests/test_tidy_surfaces.py -q
"""

from __future__ import annotations

import logging
import subprocess
import sys

from nltk.tokenize.punkt import PunktSentenceTokenizer
from rouge_score import rouge_scorer

from lora_module.evaluation.evaluate import evaluate_predictions
from lora_module.evaluation.report import build_report
from lora_module.evaluation.rouge import SENTENCE_SPLITTER, lsum_text, score_examples, split_sentences
from lora_module.qlora import MissingKernelsFilter

PRED = "Mr. Smith books a table. Dr. Who pays the bill! They leave at nine."
REF = "Mr. Smith pays. Dr. Who books a table for two and they leave at nine."


def test_lsum_is_rouge_score_on_punkt_sentences():
    # Untrained Punkt splits after "Mr."; the abbreviation list keeps it whole, as the pretrained model does.
    assert PunktSentenceTokenizer().tokenize("Mr. Smith pays.") == ["Mr.", "Smith pays."]
    assert split_sentences(PRED) == [
        "Mr. Smith books a table.", "Dr. Who pays the bill!", "They leave at nine."]
    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    expected = scorer.score(lsum_text(REF), lsum_text(PRED))
    assert score_examples([PRED], [REF], ["rougeLsum"])["rougeLsum"][0] == expected["rougeLsum"].fmeasure
    assert SENTENCE_SPLITTER.startswith("nltk Punkt")


def test_report_states_the_sentence_splitter(tmp_path):
    ev = evaluate_predictions("base", [PRED], [[REF]], tmp_path, kind="base",
                              data={"fingerprint": "f" * 64, "name": "toy"})
    build_report("toy", [ev], tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    assert f"ROUGE-Lsum: sentences split with {SENTENCE_SPLITTER}" in md


def _record(exc: BaseException, msg: str = MissingKernelsFilter.MESSAGE + ": %s.") -> logging.LogRecord:
    return logging.LogRecord("bitsandbytes.backends.cpu.ops", logging.WARNING, "ops.py", 1, msg, (exc,), None)


def test_missing_kernels_warning_is_dropped_and_real_failures_are_kept():
    f = MissingKernelsFilter()
    missing = ModuleNotFoundError("No module named 'kernels'", name="kernels")
    assert not f.filter(_record(missing))
    assert f.filter(_record(OSError("cannot reach the Hub")))  # kernels installed, download failed: shown
    assert f.filter(_record(ModuleNotFoundError("No module named 'torch_x'", name="torch_x")))
    assert f.filter(_record(missing, "another bitsandbytes warning: %s"))


def test_importing_bitsandbytes_after_lora_module_prints_nothing_about_kernels():
    code = "import lora_module.qlora, bitsandbytes, peft"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "kernels-community" not in out.stderr + out.stdout
