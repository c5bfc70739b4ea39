"""The causal demo (`lora-pipeline demo --family causal`): the demo Llama base with its chat template, and a
quick variant of the demo end to end (tiny base, two training steps) that prints base / full / LoRA."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from lora_module.contracts import ADAPTER_CONFIG_FILE, ADAPTER_DIR, MANIFEST_FILE
from lora_module.errors import SettingsError
from lora_module.home import PipelineHome
from lora_module.training.demo_base import build_demo_base, read_manifest
from lora_module.training.demo_causal import CausalDemoConfig, chat_instructions, encode_chat

TINY_BASE = {"family": "causal", "corpus_size": 40, "steps": 3, "instruction_steps": 3,
             "instruction_rows": 24, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
             "num_heads": 2, "vocab_size": 400,
             "batch_size": 4, "seq_len": 32, "log_every": 0}


@pytest.fixture(scope="module")
def tiny_causal_base(tmp_path_factory) -> Path:
    return build_demo_base(tmp_path_factory.mktemp("causal_base"), **TINY_BASE)


def test_causal_base_is_a_llama_with_a_chat_template_and_is_reused(tiny_causal_base):
    assert tiny_causal_base.name.startswith("demo-llama-")
    tok = AutoTokenizer.from_pretrained(tiny_causal_base)
    model = LlamaForCausalLM.from_pretrained(tiny_causal_base)
    assert model.config.vocab_size == len(tok) and not model.config.is_encoder_decoder
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<s><|user|>\nHi</s>\n<|assistant|>\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # the template's BOS, once
    manifest = read_manifest(tiny_causal_base)
    assert manifest["family"] == "causal" and manifest["config"]["steps"] == 3
    again = build_demo_base(tiny_causal_base.parent, **TINY_BASE)
    assert again == tiny_causal_base  # same fingerprint: no second build
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([ids])).logits).all()


def test_chat_instructions_train_on_the_answer_only(tiny_causal_base):
    tok = AutoTokenizer.from_pretrained(tiny_causal_base)
    pairs = chat_instructions(6, seed=1)
    assert all(not p.rstrip().endswith(":") for p, _ in pairs)  # the answer cue is the assistant's turn
    encoded = encode_chat(tok, pairs, max_prompt=10_000)
    assert len(encoded) == 6
    prompt, answer = encoded[0]
    assert tok.decode(prompt).endswith("<|assistant|>\n") and answer[-1] == tok.eos_token_id
    assert tok.decode(answer[:-1]) == pairs[0][1]
    assert encode_chat(tok, pairs, max_prompt=5) == []  # over-long prompts are left out, not cut


def test_causal_config_errors_are_one_line():
    with pytest.raises(SettingsError, match=r"CausalDemoConfig.hidden_size \(30\) must be divisible"):
        CausalDemoConfig(hidden_size=30, num_heads=4)
    with pytest.raises(SettingsError, match=r"CausalDemoConfig.steps must be an integer >= 1, got 0"):
        CausalDemoConfig(steps=0)
    with pytest.raises(SettingsError, match=r"demo base family must be one of \['seq2seq', 'causal'\]"):
        build_demo_base("unused", family="gpt")


@pytest.mark.slow
def test_quick_causal_demo_prints_base_full_and_lora(harness, prefect_api, tmp_path, monkeypatch, capsys):
    """Tiny base, 2 training steps each: the flow's subprocess trainings take ~40-60 s on 2 busy cores."""
    from lora_pipeline.flows import demo

    # configure_environment fills these with setdefault: set here so that monkeypatch restores them.
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    for key in ("DO_NOT_TRACK", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    settings = {"demo_base": TINY_BASE,
                "data": {"demo_train_size": 16, "demo_validation_size": 4, "demo_test_size": 4},
                "train": ["--trainer.max_steps", "2", "--data.batch_size", "4",
                          "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1"]}
    home = PipelineHome.from_env(tmp_path / "home")

    status = demo.run_demo(home, family="causal", settings=settings)

    out = capsys.readouterr().out
    assert status == 0, out
    assert "Task 'chat_summary': ROUGE (x100) on 4 test examples" in out
    table = out.split("Task 'chat_summary'", 1)[1]
    for row in ("base", "full", "lora"):
        assert re.search(rf"\n\s*\|?\s*{row}\b", table), table[:600]
    assert "registered chat_summary-lora v1" in out
    record = json.loads((home.root / "demo_causal_last_run.json").read_text())
    result = record["summary"]["results"]["chat_summary"]
    assert record["family"] == "causal" and Path(result["base_model"]).name.startswith("demo-llama-")
    adapter = json.loads((Path(result["report"]).parents[1] / "lora" / ADAPTER_DIR / ADAPTER_CONFIG_FILE)
                         .read_text())
    assert adapter["task_type"] == "CAUSAL_LM"
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}  # the all-linear preset, resolved on the Llama
    manifest = json.loads((Path(result["prepared_dir"]) / MANIFEST_FILE).read_text())
    assert manifest["config"]["prompt_format"] == "chat"


def test_demo_tasks_find_their_family_base():
    from lora_pipeline.flows.demo import (
        DEMO_BASE,
        DEMO_CAUSAL_BASE,
        DEMO_DATA,
        FAMILIES,
        demo_base_for,
        demo_data_for,
    )
    from lora_pipeline.flows.specs import check_task_spec, load_task_spec

    assert demo_base_for("chat_summary") == ("demo", DEMO_CAUSAL_BASE)
    assert demo_base_for("summary") == (None, DEMO_BASE)
    # The sweep trains a demo task on the rows its demo family trains on.
    for family in FAMILIES.values():
        assert all(demo_data_for(task) is family["data"] for task in family["tasks"])
    assert demo_data_for("chat_summary") != DEMO_DATA
    spec = load_task_spec("chat_summary")
    assert check_task_spec(spec) == []
    assert spec.base_model == "demo-causal"
