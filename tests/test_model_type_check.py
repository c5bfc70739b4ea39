"""The data's model_type comes from the base model's config and must agree with it.

    .venv/bin/pytest tests/test_model_type_check.py -q

Flows pass the base model as the data config's `tokenizer`; its `AutoConfig` (is_encoder_decoder)
gives the default model_type and refuses a declared one that disagrees, in one line and before any
work (no output folder). Without a model config there (a tokenizer-only folder) it stays "seq2seq".
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_pipeline.data import DataConfig, DataConfigError, prepare


def demo_config(tmp_path: Path, tokenizer: Path, **kw) -> DataConfig:
    return DataConfig(name="mt", demo_train_size=12, demo_validation_size=2, demo_test_size=2,
                      tokenizer=str(tokenizer), output_root=str(tmp_path / "out"), max_source_length=64,
                      max_target_length=16, **kw)


@pytest.mark.parametrize("base, expected", [("tiny_llama_dir", "causal"), ("tiny_t5_dir", "seq2seq"),
                                            ("causal_tokenizer_dir", "seq2seq")])
def test_default_model_type_is_the_bases(tmp_path, request, base, expected):
    prepared = prepare(demo_config(tmp_path, request.getfixturevalue(base)))
    assert prepared.manifest["model_type"] == expected
    assert prepared.manifest["config"]["model_type"] == expected


@pytest.mark.parametrize("base, declared, valid", [("tiny_llama_dir", "seq2seq", "causal"),
                                                   ("tiny_t5_dir", "causal", "seq2seq")])
def test_declared_model_type_that_disagrees_is_refused_before_any_work(tmp_path, request, base, declared,
                                                                      valid):
    with pytest.raises(DataConfigError, match=rf"model_type='{declared}' disagrees with the base .* "
                                              rf"model_type must be '{valid}'") as e:
        prepare(demo_config(tmp_path, request.getfixturevalue(base), model_type=declared))
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_chat_needs_a_causal_base(tmp_path, tiny_t5_dir):
    (tmp_path / "c.jsonl").write_text('{"dialogue": "hi", "summary": "yo"}\n' * 3)
    cfg = DataConfig(name="c", source="files", files={"train": str(tmp_path / "c.jsonl")},
                     prompt_format="chat", tokenizer=str(tiny_t5_dir), output_root=str(tmp_path / "out"))
    with pytest.raises(DataConfigError, match="prompt_format='chat' needs a causal .* is an encoder-decoder"):
        prepare(cfg)
    with pytest.raises(DataConfigError, match="needs model_type='causal'"):
        DataConfig(prompt_format="chat", tokenizer=str(tiny_t5_dir), model_type="seq2seq")
