"""Bad evaluation inputs from issue #27: an unknown `--baseline` is refused in one line before anything
is written (it used to drop every comparison silently), and `--dtype float16` does not refuse an adapter
on its own base as "trained on a different base".

    .venv/bin/pytest tests/test_evaluate_inputs.py -q
"""

from __future__ import annotations

import json

import pytest
from registry_helpers import MISS, PROMPTS, REFERENCES, make_adapter

from lora_module.errors import run_cli
from lora_module.evaluation.evaluate import evaluate_predictions
from lora_module.evaluation.evaluate import main as evaluate_main
from lora_module.evaluation.generation import GenerationConfig, ModelSpec, load_model_with_info
from lora_module.evaluation.report import ReportInputError, build_report


def _evals(out):
    data = {"fingerprint": "data-A", "name": "demo"}
    return [evaluate_predictions(name, REFERENCES[:hits] + [MISS] * (len(REFERENCES) - hits), REFERENCES, out,
                                 prompts=PROMPTS, kind=kind, data=data, n_resamples=20)
            for name, kind, hits in (("base", "base", 2), ("lora", "lora", 6))]


def test_build_report_refuses_an_unknown_baseline_and_writes_nothing(tmp_path):
    evals = _evals(tmp_path / "evals")
    with pytest.raises(ReportInputError, match="baseline 'nosuch' is not one of the evaluated") as info:
        build_report("demo", evals, tmp_path / "report", baseline="nosuch", n_resamples=20)
    assert "\n" not in str(info.value) and "'base'" in str(info.value)
    assert not (tmp_path / "report").exists()
    report = json.loads(build_report("demo", evals, tmp_path / "r", baseline="lora",
                                     n_resamples=20).read_text())
    assert report["baseline"] == "lora" and report["comparisons"]  # a named, evaluated baseline is used


def test_the_default_baseline_is_optional(tmp_path):
    """`base` is the default: evaluating no model of that name still makes a report, without changes."""
    lora_only = _evals(tmp_path / "evals")[1:]
    report = json.loads(build_report("demo", lora_only, tmp_path / "r", n_resamples=20).read_text())
    assert report["baseline"] is None


def test_evaluate_cli_refuses_an_unknown_baseline_before_loading_anything(tiny_t5_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--prepared", str(tmp_path / "prepared"), "--model", f"base={tiny_t5_dir}", "--task", "demo",
            "--out", str(out), "--baseline", "nosuch"]
    assert run_cli(evaluate_main, argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "baseline 'nosuch'" in errors[0], errors
    assert not out.exists()


def test_float16_evaluation_loads_an_adapter_on_its_own_base(tiny_t5_dir, tmp_path):
    """fp32 -> fp16 -> bf16 rounds some weights differently from fp32 -> bf16, so an fp16 load hashed to
    another fingerprint and every adapter was refused on its own base."""
    adapter, _ = make_adapter(tiny_t5_dir, tmp_path / "adapter", seed=1)
    spec = ModelSpec(name="lora", kind="lora", path=str(adapter))
    loaded = load_model_with_info(spec, GenerationConfig(device="cpu", dtype="float16"))
    reference = load_model_with_info(spec, GenerationConfig(device="cpu", dtype="float32"))
    assert loaded.info["base_fingerprint"] == reference.info["base_fingerprint"]
