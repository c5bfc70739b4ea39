"""Tidy surfaces: ROUGE-Lsum splits sentences the standard way and says so; no spurious import warning.

    .venv/bin/pytest tests/test_tidy_surfaces.py -q
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from bitsandbytes.functional import has_avx512bf16
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import LocalEntryNotFoundError
from nltk.tokenize.punkt import PunktSentenceTokenizer
from rouge_score import rouge_scorer

from lora_module.evaluation.evaluate import evaluate_predictions
from lora_module.evaluation.report import build_report
from lora_module.evaluation.rouge import SENTENCE_SPLITTER, lsum_text, score_examples, split_sentences
from lora_module.qlora import BNB_KERNEL_REPO, MissingKernelsFilter

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


def _record(exc: BaseException | None, msg: str = MissingKernelsFilter.MESSAGE + ": %s.",
            logger: str = "bitsandbytes.backends.cpu.ops") -> logging.LogRecord:
    args = (exc,) if exc is not None else None
    return logging.LogRecord(logger, logging.WARNING, "ops.py", 1, msg, args, None)


def _chained(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause
    return error


# The causes kernels 0.19 gives, offline, for a kernel that is not in the local cache.
NOT_CACHED = [
    ValueError(f"Version 1 of '{BNB_KERNEL_REPO}' is not available in the local cache and Hugging Face Hub "
               "is in offline mode. Download the kernel while online first."),
    _chained(FileNotFoundError(f"Cannot find a local snapshot for {BNB_KERNEL_REPO} (revision: abc). When "
                               "Hugging Face Hub is in offline mode the kernel must already be present in "
                               "the local cache."), LocalEntryNotFoundError("not cached")),
]


def test_missing_kernels_package_warning_is_dropped_and_real_failures_are_kept():
    f = MissingKernelsFilter()
    missing = ModuleNotFoundError("No module named 'kernels'", name="kernels")
    assert not f.filter(_record(missing))
    assert not f.filter(_record(ModuleNotFoundError("import of kernels halted; None in sys.modules",
                                                    name="kernels")))
    assert f.filter(_record(OSError("cannot reach the Hub")))  # kernels installed, download failed: shown
    broken_install = ModuleNotFoundError("No module named 'torch_x'", name="torch_x")  # kernels' own import
    assert f.filter(_record(broken_install))
    assert f.filter(_record(missing, "another bitsandbytes warning: %s"))


def test_offline_kernel_not_in_cache_is_dropped_only_while_offline(monkeypatch):
    f = MissingKernelsFilter()
    trust_skipped = _record(None, f"Skipping publisher trust check for '{BNB_KERNEL_REPO}' because Hugging "
                                  "Face Hub is in offline mode.", logger="kernels._internals.hf_hub")
    other_trust_skipped = _record(None, "Skipping publisher trust check for 'someone/other-kernel' because "
                                        "Hugging Face Hub is in offline mode.",
                                  logger="kernels._internals.hf_hub")
    online_failure = _chained(ValueError(f"Kernel repository '{BNB_KERNEL_REPO}' could not verify publisher "
                                         "trust status. Set trust_remote_code=True ..."),
                              ConnectionError("Max retries exceeded with url: /api/organizations"))
    broken = ImportError("undefined symbol: gemm_4bit_forward_impl")  # in the cache, but does not load
    no_variant = FileNotFoundError(f"Cannot find a build variant for this system in {BNB_KERNEL_REPO}")

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert [f.filter(_record(e)) for e in NOT_CACHED] == [False, False]
    assert not f.filter(trust_skipped)
    assert f.filter(other_trust_skipped)  # another kernel's warning is not ours to hide
    assert f.filter(_record(broken)) and f.filter(_record(no_variant))

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # online, "not cached" cannot be the cause
    assert [f.filter(_record(e)) for e in NOT_CACHED] == [True, True]
    assert f.filter(_record(online_failure))


# Importing kernels fails as for a package that is not installed (find_spec says None, import raises
# ModuleNotFoundError). A meta-path finder that raises instead also breaks transformers' own find_spec probe.
WITHOUT_KERNELS = "import sys; sys.modules['kernels'] = None; "


def _import_output(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return out.stderr + out.stdout


@pytest.mark.parametrize("prefix", ["", WITHOUT_KERNELS], ids=["kernels-offline-not-cached", "no-kernels"])
def test_importing_bitsandbytes_after_lora_module_prints_nothing_about_kernels(prefix):
    assert "kernels-community" not in _import_output(prefix + "import lora_module.qlora, bitsandbytes, peft")
    if has_avx512bf16():  # only there does bnb try the kernel: without lora_module it does print the noise
        assert "Failed to load CPU gemm_4bit_forward" in _import_output(prefix + "import bitsandbytes")
