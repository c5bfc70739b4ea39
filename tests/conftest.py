"""Shared fixtures: tiny models built offline from configs, and a tokenizer trained locally.

Nothing here touches the network. Model folders are written with `save_pretrained` (weights and
tokenizer side by side) so every stage can be handed a path, as in production.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import (  # noqa: E402
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from lora_pipeline.data.tokenizer import train_tokenizer  # noqa: E402

SHARED_DIALOGSUM = Path(__file__).resolve().parents[2] / "shared" / "data" / "dialogsum"

_WORDS = (
    "alice bob carol dave meets at the cafe on monday at nine to talk about the new project "
    "please book a table for two people tomorrow evening the train leaves from platform four "
    "my laptop screen is broken can you repair it by friday the price is twenty dollars "
    "summary dialogue person said agreed will call back later thanks see you soon"
).split()


def tokenizer_corpus(n: int = 400) -> list[str]:
    """Deterministic pseudo-sentences for training the test tokenizers."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        idx = torch.randint(len(_WORDS), (12,), generator=g).tolist()
        out.append(" ".join(_WORDS[i] for i in idx) + ".")
    return out


def tiny_t5_config(vocab_size: int) -> T5Config:
    return T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="relu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False,
    )


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, eos_token_id=1, bos_token_id=3, tie_word_embeddings=False,
    )


def make_tiny_t5(vocab_size: int = 512, seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(tiny_t5_config(vocab_size)).eval()


def make_tiny_llama(vocab_size: int = 512, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size)).eval()


@pytest.fixture(scope="session")
def seq2seq_tokenizer_dir(tmp_path_factory) -> Path:
    return train_tokenizer(tokenizer_corpus(), tmp_path_factory.mktemp("tok_s2s"), 512, "seq2seq")


@pytest.fixture(scope="session")
def causal_tokenizer_dir(tmp_path_factory) -> Path:
    return train_tokenizer(tokenizer_corpus(), tmp_path_factory.mktemp("tok_clm"), 512, "causal")


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory, seq2seq_tokenizer_dir) -> Path:
    """A 2-layer T5 saved with its tokenizer: a local `model_name_or_path`."""
    out = tmp_path_factory.mktemp("tiny_t5")
    tok = AutoTokenizer.from_pretrained(seq2seq_tokenizer_dir)
    make_tiny_t5(len(tok)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, causal_tokenizer_dir) -> Path:
    """A 2-layer Llama-style causal LM saved with its tokenizer."""
    out = tmp_path_factory.mktemp("tiny_llama")
    tok = AutoTokenizer.from_pretrained(causal_tokenizer_dir)
    make_tiny_llama(len(tok)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def tiny_t5() -> T5ForConditionalGeneration:
    return make_tiny_t5()


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def dialogsum_dir() -> Path:
    if not (SHARED_DIALOGSUM / "dialogsum.test.jsonl").exists():
        pytest.skip(f"real DialogSum splits not found at {SHARED_DIALOGSUM} (shared/ folder absent)")
    return SHARED_DIALOGSUM


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """A temporary Prefect server and result storage for this module's flows."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect_storage")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
        with prefect_test_harness(server_startup_timeout=180):
            yield storage
