"""Shared fixtures: tiny models built offline from configs, a tokenizer trained locally, and the
servers that integration tests share.

Nothing here touches the network. Model folders are written with `save_pretrained` (weights and
tokenizer side by side) so every stage can be handed a path, as in production.

Servers are started once per session, on first use, and stopped at its end:
- `harness`: Prefect pointed, for this test only, at one temporary Prefect server (`prefect_api`);
- `mlflow_server`: one `mlflow server` for the tests that only need *a* server. Nobody stops it, and
  each test registers under task and model names that no other test uses (so "version 1" and
  "exactly N versions" still hold);
- `restartable_mlflow_server`: another one that fault tests stop, kill and restart; it is running
  again at the start of every test that asks for it.
Prefect settings, `os.environ` and MLflow's process-wide tracking and registry URIs are put back
after every test, so what one test points at never leaks into the next.

Lanes (markers, see pyproject): a test that uses one of these servers is `integration`; a test
that is neither `integration` nor `slow` is `unit`, so `pytest -m unit` (the same tests as
`pytest -m "not integration and not slow"`) is the fast lane and plain `pytest` runs everything.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# rouge_score imports absl, whose logging handler keeps the stderr of the moment it is created (pytest's
# capture file) and closes that stream whenever code reconfigures logging (Prefect's dictConfig closes
# every handler): pytest then died with "lost sys.stderr". The real stderr is one absl never closes.
import absl.logging  # noqa: E402

absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__
from mlflow_server import MlflowServer, free_port  # noqa: E402
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


# A Llama-3-like chat template over the test tokenizer's own specials (no new tokens, so the tiny
# Llama's vocabulary fits): BOS once, a role header per turn, EOS ends every turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="session")
def chat_llama_dir(tmp_path_factory, causal_tokenizer_dir) -> Path:
    """The tiny Llama saved with the causal test tokenizer plus a chat template (`CHAT_TEMPLATE`)."""
    out = tmp_path_factory.mktemp("chat_llama")
    tok = AutoTokenizer.from_pretrained(causal_tokenizer_dir)
    tok.chat_template = CHAT_TEMPLATE
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


SERVER_FIXTURES = frozenset({"prefect_api", "harness", "mlflow_server", "restartable_mlflow_server"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Lanes by construction: what uses a server is `integration`; the rest, unless `slow`, is `unit`."""
    for item in items:
        if SERVER_FIXTURES.intersection(item.fixturenames):
            item.add_marker(pytest.mark.integration)
        if not (item.get_closest_marker("integration") or item.get_closest_marker("slow")):
            item.add_marker(pytest.mark.unit)


def _mlflow_global_uris() -> tuple[str | None, str | None]:
    if "mlflow" not in sys.modules:
        return None, None
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    return tracking._tracking_uri, registry._registry_uri


@pytest.fixture(autouse=True)
def _no_leaks_between_tests() -> Iterator[None]:
    """Put back the environment and MLflow's process-wide tracking and registry URIs after each test.

    In-process code sets both (a fit exports MLFLOW_TRACKING_URI; registration calls
    `mlflow.set_registry_uri`): left behind, a later `MlflowClient(tracking_uri=X)` reads models
    from the previous test's registry instead of X's.
    """
    environ, uris = dict(os.environ), _mlflow_global_uris()
    stray = Path.cwd() / "mlruns"  # MLflow's default artifact root for a new experiment in a sqlite store
    had_stray = stray.exists()
    yield
    assert had_stray or not stray.exists(), f"the test wrote MLflow artifacts into {stray}: give a location"
    if dict(os.environ) != environ:
        os.environ.clear()
        os.environ.update(environ)
    if _mlflow_global_uris() != uris:
        from mlflow.tracking._model_registry import utils as registry
        from mlflow.tracking._tracking_service import utils as tracking

        tracking._tracking_uri, registry._registry_uri = uris


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> Iterator[str]:
    """The API URL of one temporary Prefect server for the session, on its own SQLite file.

    What `prefect_test_harness` starts, without its process-wide settings: those would point every
    later test at this server (a registration would then take Prefect's concurrency limit, which
    the registry race tests must not have). Tests get it through `harness` or pass the URL on.
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings

    db = tmp_path_factory.mktemp("prefect_server") / "prefect.db"
    with temporary_settings({PREFECT_SERVER_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{db}"}):
        server = SubprocessASGIServer(port=free_port())
        server.start(timeout=180)
    # As in prefect_test_harness: Prefect code that asks for "the" temporary server during a flow
    # run finds this one instead of starting a second.
    prior = SubprocessASGIServer._instances.get(None)
    SubprocessASGIServer._instances[None] = server
    try:
        yield server.api_url
    finally:
        if prior is None:
            SubprocessASGIServer._instances.pop(None, None)
        else:
            SubprocessASGIServer._instances[None] = prior
        server.stop()


@pytest.fixture
def harness(prefect_api, tmp_path_factory) -> Iterator[Path]:
    """Prefect settings for this test: the session's server and a fresh result storage (yielded)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    storage = tmp_path_factory.mktemp("prefect_storage")
    with temporary_settings({PREFECT_API_URL: prefect_api, PREFECT_LOCAL_STORAGE_PATH: storage}):
        yield storage
        # Send this test's logs and events now, while its settings hold (as the harness does on exit).
        APILogWorker.drain_all(at_exit=False)
        EventsWorker.drain_all(at_exit=False)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """One `mlflow server` shared by the session's tests that neither stop it nor need it empty."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow_shared") / "server") as server:
        yield server


@pytest.fixture(scope="session")
def _restartable_mlflow(tmp_path_factory) -> Iterator[MlflowServer]:
    with MlflowServer(tmp_path_factory.mktemp("mlflow_restartable") / "server") as server:
        yield server


@pytest.fixture
def restartable_mlflow_server(_restartable_mlflow) -> MlflowServer:
    """The session's `mlflow server` for tests that stop, kill and restart it, running at the start
    of the test (a test that failed mid-outage does not take the next one down with it)."""
    return _restartable_mlflow.start()
