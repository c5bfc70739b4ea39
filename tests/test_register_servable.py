"""The registry registers only what can be served (issue #27 item 1) and says so in one line.

The tests share one embedded store (SQLite under a pipeline home of this module), each under task
names of its own, and check both sides: what serving loads back after a good registration, and that
a refused one left no registered model, no experiment and no run of its task.

    .venv/bin/pytest tests/test_register_servable.py -q
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow_server import client_for, embedded_store_home
from registry_helpers import PROMPTS, generate_texts, make_adapter, make_candidate
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from lora_module import contracts as c
from lora_module.contracts import TAG_TASK_MISMATCH
from lora_module.errors import PipelineError, run_cli
from lora_module.home import PipelineHome
from lora_module.registry.cli import main as cli_main
from lora_module.registry.register import register_adapter
from lora_module.registry.servable import ServabilityError, TaskMismatchError
from lora_module.registry.store import download_adapter
from lora_module.serving import load_registered


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Iterator[Path]:
    """A pipeline home whose embedded SQLite store is the registry."""
    with embedded_store_home(tmp_path_factory.mktemp("servable_home")) as root:
        yield root


def _client(home: Path):
    """A client of the store under `home` (the environment the fixture set points there)."""
    return client_for(PipelineHome.from_env().tracking_uri)


def _assert_store_untouched(home: Path, task: str) -> None:
    """No registered model, experiment or run of `task`: the refused registration wrote nothing."""
    client = _client(home)
    assert client.search_registered_models(f"name='{task}-lora'") == []
    assert client.get_experiment_by_name(f"lora-{task}") is None
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], f"tags.task = '{task}'")
    assert runs == []


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


# ---- any folder name ------------------------------------------------------------------------------
def test_an_adapter_folder_of_any_name_is_registered_as_the_loaders_read_it(home, tiny_t5_dir, tmp_path):
    """`my_adapter_v2/` and a tokenizer in `mytok/`: stored as `adapter/` and `tokenizer/` (before, the
    version held `artifacts/my_adapter_v2` and every loader failed), and serving generates like the
    adapter in memory."""
    adapter, report, model = make_candidate(tmp_path / "c", tiny_t5_dir, seed=1, lora_hits=5)
    renamed = adapter.rename(tmp_path / "c" / "my_adapter_v2")
    tokenizer = shutil.copytree(tiny_t5_dir, tmp_path / "mytok",
                                ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    res = register_adapter("anyname", renamed, report, tokenizer_dir=tokenizer, retries=0)
    assert res.alias == "champion"
    reg = download_adapter("anyname", tmp_path / "dl")
    assert (reg.adapter_dir / c.ADAPTER_WEIGHTS_FILE).is_file()
    assert reg.tokenizer_dir is not None and reg.tokenizer_dir.name == c.TOKENIZER_ARTIFACT
    served, served_tok = load_registered("anyname")
    expected = generate_texts(model, AutoTokenizer.from_pretrained(tiny_t5_dir), PROMPTS[:2])
    assert generate_texts(served, served_tok, PROMPTS[:2]) == expected
    assert renamed.is_dir() and not (tmp_path / "c" / c.ADAPTER_DIR).exists()  # the caller's folder as it was


# ---- adapters that cannot be served ---------------------------------------------------------------
def _truncate(adapter: Path) -> str:
    weights = adapter / c.ADAPTER_WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return "truncated or corrupt"


def _nan(adapter: Path) -> str:
    weights = adapter / c.ADAPTER_WEIGHTS_FILE
    tensors = load_file(str(weights))
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(weights))
    return key


def _incomplete(adapter: Path) -> str:
    weights = adapter / c.ADAPTER_WEIGHTS_FILE
    tensors = load_file(str(weights))
    gone = sorted(k for k in tensors if ".v.lora_" in k)
    save_file({k: v for k, v in tensors.items() if k not in gone}, str(weights))
    return "incomplete"


def _other_base(adapter: Path) -> str:
    sidecar = adapter / c.ADAPTER_SIDECAR_FILE
    data = json.loads(sidecar.read_text())
    data["base_fingerprint"] = "0" * 64
    sidecar.write_text(json.dumps(data))
    return "fingerprint"


@pytest.mark.parametrize("damage", [_truncate, _nan, _incomplete, _other_base],
                         ids=["truncated", "nan", "missing-layers", "other-base"])
def test_an_adapter_that_cannot_be_served_is_refused_before_anything_is_written(home, tiny_t5_dir, tmp_path,
                                                                                damage):
    """Before: each of these registered (one became champion); now one line naming what is wrong, and
    the store holds no run, no model, no version."""
    adapter, _ = make_adapter(tiny_t5_dir, tmp_path / "adapter", seed=3)
    expected = damage(adapter)
    task = f"broken{damage.__name__.replace('_', '')}"
    with pytest.raises(ServabilityError) as info:
        register_adapter(task, adapter, retries=0)
    assert expected in _one_line(info.value)
    assert str(adapter) in str(info.value)
    _assert_store_untouched(home, task)


def test_a_failing_generate_registers_nothing(home, tiny_t5_dir, tmp_path, monkeypatch):
    """The load-and-generate check runs before the registry is touched: its failure leaves no version."""
    from lora_module.serving.predictor import AdapterPredictor

    def broken(self, texts, params=None):
        raise RuntimeError("probability tensor contains inf\nsecond line")

    monkeypatch.setattr(AdapterPredictor, "predict", broken)
    adapter, report, _ = make_candidate(tmp_path / "c", tiny_t5_dir, seed=4, lora_hits=6)
    with pytest.raises(ServabilityError, match="fails to generate.*tensor contains inf second line"):
        register_adapter("nogen", adapter, report, retries=0)
    _assert_store_untouched(home, "nogen")


def test_the_cli_refuses_an_unservable_adapter_in_one_line(home, tiny_t5_dir, tmp_path, capsys):
    adapter, _ = make_adapter(tiny_t5_dir, tmp_path / "adapter", seed=5)
    _nan(adapter)
    assert run_cli(cli_main, ["register", "clinan", str(adapter), "--retries", "0"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error:") and "NaN" in errors[0]  # one line
    _assert_store_untouched(home, "clinan")


# ---- task against model name ----------------------------------------------------------------------
def test_another_tasks_model_is_refused_unless_allowed_and_then_recorded(home, tiny_t5_dir, tmp_path, capsys):
    """`register topic ADAPTER --model-name summary-lora` made a topic adapter summary's champion."""
    a1, r1, _ = make_candidate(tmp_path / "s", tiny_t5_dir, seed=6, lora_hits=3)
    a2, r2, _ = make_candidate(tmp_path / "t", tiny_t5_dir, seed=7, lora_hits=7)
    assert register_adapter("summary", a1, r1, retries=0).version == "1"
    with pytest.raises(TaskMismatchError) as info:
        register_adapter("topic", a2, r2, model_name="summary-lora", retries=0)
    assert "'summary'" in _one_line(info.value) and "--allow-task-mismatch" in str(info.value)
    argv = ["register", "topic", str(a2), "--report", str(r2), "--model-name", "summary-lora",
            "--retries", "0"]
    assert run_cli(cli_main, argv) == 2
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")
            and "task 'summary'" in line]
    client = _client(home)
    assert [str(mv.version) for mv in client.search_model_versions("name='summary-lora'")] == ["1"]
    assert str(client.get_model_version_by_alias("summary-lora", "champion").version) == "1"

    assert run_cli(cli_main, [*argv, "--allow-task-mismatch"]) == 0
    v2 = client.get_model_version("summary-lora", "2")
    assert "'topic'" in v2.tags[TAG_TASK_MISMATCH] and "'summary'" in v2.tags[TAG_TASK_MISMATCH]


def test_an_adapter_whose_sidecar_names_another_task_is_refused(home, tiny_t5_dir, tmp_path):
    adapter, _ = make_adapter(tiny_t5_dir, tmp_path / "adapter", seed=8)
    sidecar = adapter / c.ADAPTER_SIDECAR_FILE
    data = json.loads(sidecar.read_text())
    data["lora_pipeline"]["task"] = "topic"
    sidecar.write_text(json.dumps(data))
    with pytest.raises(TaskMismatchError, match="sidecar says task 'topic'"):
        register_adapter("sidecar", adapter, retries=0)
    assert _client(home).search_registered_models("name='sidecar-lora'") == []
    res = register_adapter("sidecar", adapter, retries=0, allow_task_mismatch=True)
    assert TAG_TASK_MISMATCH in _client(home).get_model_version(res.model_name, res.version).tags


def test_refusals_are_pipeline_errors():
    assert issubclass(ServabilityError, PipelineError) and issubclass(TaskMismatchError, PipelineError)
