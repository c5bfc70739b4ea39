"""One source per setting: prompt template and lengths from the prepared data's manifest, one name
rule, one file writer. Small and model-free except the registration inputs (tiny T5 from conftest).

    .venv/bin/pytest tests/test_settings_source.py -q
"""

from __future__ import annotations

import json
import logging
import stat

import pytest
from registry_helpers import make_adapter, make_report
from transformers import AutoTokenizer

from lora_module.adapter_io import read_prompt_settings, write_prompt_settings
from lora_module.evaluation.generation import DEFAULT_MAX_NEW_TOKENS, GenerationConfig
from lora_module.evaluation.report import format_table, rouge_table
from lora_module.files import publish_dir, sha256_dir, sha256_file, write_atomic, write_json_atomic
from lora_module.home import PipelineHome
from lora_module.names import NAME_PATTERN, InvalidNameError, check_name
from lora_module.prompt import PromptSettings
from lora_module.registry import register_adapter
from lora_module.registry.inputs import RegistrationInputError, read_inputs
from lora_module.serving import predictor as predictor_module
from lora_module.serving.predictor import AdapterPredictor, Output

TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "
MANIFEST = {"fingerprint": "f" * 64, "model_type": "seq2seq",
            "config": {"prompt_template": TEMPLATE, "input_column": "dialogue",
                       "max_source_length": 192, "max_target_length": 64}}


def test_prompt_settings_from_manifest_render_and_resolve(caplog):
    s = PromptSettings.from_manifest(MANIFEST)
    assert (s.max_source_length, s.max_target_length, s.model_type) == (192, 64, "seq2seq")
    assert s.render(["#Person1#: hi"]) == [TEMPLATE.format(dialogue="#Person1#: hi")]
    assert PromptSettings().render(["as is"]) == ["as is"]
    assert PromptSettings.from_dict(s.to_dict()) == s
    with caplog.at_level(logging.WARNING, logger="lora_module.prompt"):
        assert s.resolve("max_source_length", None) == 192 and not caplog.records
        assert s.resolve("max_source_length", 256) == 256
    assert "max_source_length=256" in caplog.text and "max_source_length=192" in caplog.text
    with pytest.raises(ValueError, match=r"also needs column\(s\) \['speaker'\]"):
        PromptSettings(template="{speaker}: {dialogue}").render(["x"])


def test_generation_lengths_come_from_the_manifest(caplog):
    gen = GenerationConfig()
    assert gen.max_source_length is None and gen.max_new_tokens is None
    settings = PromptSettings.from_manifest(MANIFEST)
    resolved = gen.with_settings(settings)
    assert (resolved.max_source_length, resolved.max_new_tokens) == (192, 64)
    assert GenerationConfig().with_settings(PromptSettings()).max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    with caplog.at_level(logging.WARNING):
        over = GenerationConfig(max_source_length=256, max_new_tokens=64).with_settings(settings)
    assert over.max_source_length == 256
    assert "max_source_length=256" in caplog.text and "192" in caplog.text
    assert "max_new_tokens" not in caplog.text  # 64 is what training used: no override to report


def test_registration_records_the_prompt_and_predict_applies_it(tmp_path, tiny_t5_dir, monkeypatch):
    adapter, model = make_adapter(tiny_t5_dir, tmp_path / "adapter", seed=1)
    write_prompt_settings(adapter, PromptSettings.from_manifest(MANIFEST))  # what the training export writes
    inp = read_inputs("summary", adapter, None, None, None, "rougeL")
    assert inp.prompt == PromptSettings.from_manifest(MANIFEST) == read_prompt_settings(adapter)

    seen = {}

    def fake_generate_rows(model, jobs, batch_size, is_seq2seq, sampling, deadline):
        seen.update(jobs=jobs)
        return [Output("out", "stop", len(j.ids), 1) for j in jobs]

    monkeypatch.setattr(predictor_module, "generate_rows", fake_generate_rows)
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5_dir)
    predictor = AdapterPredictor(model, tokenizer, inp.prompt)
    assert predictor.predict(["#Person1#: hi"], {"num_beams": 2}) == ["out"]
    [job] = seen["jobs"]
    assert job.ids == tokenizer(TEMPLATE.format(dialogue="#Person1#: hi"))["input_ids"]
    assert (job.max_new_tokens, job.num_beams) == (64, 2)
    assert read_prompt_settings(tmp_path / "nothing-here") is None


def test_name_rule_is_one_and_refuses_a_quote_before_registering(tmp_path, tiny_t5_dir):
    assert check_name("task name", "summary-2_b") == "summary-2_b"
    for bad in ("a.b", "o'brien", "-x", "", "x/y", "a" * 101, None):
        with pytest.raises(InvalidNameError, match="pattern"):
            check_name("task name", bad)
    with pytest.raises(InvalidNameError) as err:
        check_name("adapter name", "a b")
    assert NAME_PATTERN in str(err.value) and "adapter name 'a b'" in str(err.value)

    adapter, _ = make_adapter(tiny_t5_dir, tmp_path / "adapter", seed=2)
    report = make_report(tmp_path / "report", adapter, 5, 2)
    home = PipelineHome.from_env(tmp_path / "home")
    with pytest.raises(RegistrationInputError, match="registered model name \"o'brien\""):
        register_adapter("summary", adapter, report, model_name="o'brien", home=home, retries=0)
    with pytest.raises(RegistrationInputError, match="invalid task name"):
        register_adapter("o'brien", adapter, report, home=home, retries=0)
    assert not (tmp_path / "home").exists()  # nothing created: no store, no lock folder


def test_atomic_writes_are_0644_and_hashes_agree(tmp_path):
    a = write_atomic(tmp_path / "sub" / "a.txt", "hello")
    b = write_json_atomic(tmp_path / "b.json", {"x": 1})
    for path in (a, b):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert json.loads(b.read_text()) == {"x": 1}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "b.json", "sub"]  # no temp files left
    assert sha256_file(a) == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert sha256_dir(tmp_path / "sub") != sha256_dir(tmp_path / "sub", (".json",))
    tmp, final = tmp_path / "t", tmp_path / "final"
    tmp.mkdir()
    (tmp / "done").write_text("first")
    assert publish_dir(tmp, final) and final.is_dir()
    tmp.mkdir()
    (tmp / "done").write_text("second")
    assert not publish_dir(tmp, final) and not tmp.exists()  # a complete copy was there first
    assert (final / "done").read_text() == "first"


def test_one_rouge_table_formatter():
    rows = {"base": {"rouge1": 0.1, "rouge2": 0.05, "rougeL": 0.1, "rougeLsum": 0.1, "trainable": 0},
            "lora": {"rouge1": 0.4, "rouge2": 0.2, "rougeL": 0.35, "rougeLsum": 0.36, "trainable": 1234}}
    md = rouge_table(rows)
    assert md.splitlines()[0] == "| model | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | trainable params |"
    assert "| lora | 40.00 | 20.00 | 35.00 | 36.00 | 1,234 |" in md
    text = rouge_table(rows, "text", "  ").splitlines()
    assert text[0].startswith("  model")
    assert text[2].split() == ["lora", "40.00", "20.00", "35.00", "36.00", "1,234"]
    assert format_table(["a", "b"], [["x", "1"]]) == "| a | b |\n| --- | --- |\n| x | 1 |"
