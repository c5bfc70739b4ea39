"""Small surfaces a new user meets first: serving threads, the mixed-batch equality the README
states, `prepare --json`'s folder, and the wheel name the docs give.

    .venv/bin/pytest tests/test_new_user_surfaces.py -q
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from registry_helpers import PROMPTS, make_adapter
from transformers import AutoTokenizer

from lora_module.serving.cli import ServeSettingsError, serve_command, serve_env, serve_threads
from lora_pipeline.flows.cli import main as lora_pipeline

REPO = Path(__file__).resolve().parents[1]
# What README "Serving" promises of a mixed-task batch against each adapter loaded alone and merged.
LOGIT_TOLERANCE = 1e-4


# ---- serve-model --threads ------------------------------------------------------------------------
def test_serve_threads_default_to_one_per_worker(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = serve_env("http://127.0.0.1:5000", None, None)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    assert serve_env("http://x:1", None, None, threads=4)["MKL_NUM_THREADS"] == "4"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting wins over the default ...
    assert serve_env("http://x:1", None, None)["OMP_NUM_THREADS"] == "3"
    assert serve_env("http://x:1", None, None, threads=2)["OMP_NUM_THREADS"] == "2"  # ... --threads over it
    env = serve_env("http://x:1", None, None, threads=0)  # 0: torch's default, one thread per core
    assert "OMP_NUM_THREADS" not in env and "MKL_NUM_THREADS" not in env
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(ServeSettingsError, match="OMP_NUM_THREADS is 'many'"):
        serve_threads(None)
    assert serve_command("models:/m@champion", "127.0.0.1", 5001, 3)[-2:] == ["-w", "3"]


def test_server_process_runs_torch_with_the_chosen_threads(monkeypatch):
    """What the server's workers inherit is what torch uses (it reads OMP_NUM_THREADS at start-up)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    probe = [sys.executable, "-c", "import torch; print(torch.get_num_threads())"]
    for threads, expected in ((None, "1"), (2, "2")):
        env = serve_env("http://127.0.0.1:5000", None, None, threads)
        done = subprocess.run(probe, env=env, capture_output=True, text=True, check=True)
        assert done.stdout.strip() == expected


def test_serve_model_help_and_bad_threads(capsys, monkeypatch):
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("no server may start"))
    with pytest.raises(SystemExit):
        lora_pipeline(["serve-model", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Serve a registered model" in out and "--threads THREADS" in out and "OMP_NUM_THREADS" in out
    assert lora_pipeline(["serve-model", "models:/m@champion", "--threads", "-1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: lora-pipeline serve-model: argument --threads: '-1' is not an integer >= 0 "
        "(see lora-pipeline serve-model --help)")


def test_register_multitask_help_has_a_description(capsys):
    with pytest.raises(SystemExit):
        lora_pipeline(["register-multitask", "--help"])
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]  # the paragraph after the usage lines
    assert description.startswith("Register one model that serves several tasks' adapters on one base")


# ---- README "Serving": mixed batch vs each adapter alone --------------------------------------------
def test_mixed_batch_logits_match_each_adapter_alone_and_merged(tiny_t5_dir, tmp_path):
    """The README's wording, measured: logits within LOGIT_TOLERANCE of the adapter alone, merged
    (what `predict` runs); greedy tokens equal wherever the top two logits are further apart."""
    from lora_module import LoraModel, load_base_model

    model = LoraModel(load_base_model(str(tiny_t5_dir)), None).eval()
    for seed, name in enumerate(("summary", "topic")):
        model.load_adapter(make_adapter(tiny_t5_dir, tmp_path / name, seed=seed + 7)[0], name)
    tok = AutoTokenizer.from_pretrained(tiny_t5_dir)
    batch = tok(PROMPTS[:6], return_tensors="pt", padding=True)
    decoder = torch.full((6, 5), model.config.decoder_start_token_id)
    decoder[:, 1:] = batch["input_ids"][:, :4]
    names = ["summary", "topic", "topic", "summary", "summary", "topic"]
    with torch.no_grad():
        mixed = model(**batch, decoder_input_ids=decoder, adapter_names=names).logits
        alone = {}
        for name in ("summary", "topic"):
            model.set_adapter(name)
            model.merge_adapter()
            alone[name] = model(**batch, decoder_input_ids=decoder).logits
            model.unmerge_adapter()
    expected = torch.stack([alone[name][i] for i, name in enumerate(names)])
    assert not torch.equal(alone["summary"], alone["topic"])
    assert (mixed - expected).abs().max().item() <= LOGIT_TOLERANCE
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * LOGIT_TOLERANCE
    assert torch.equal(mixed.argmax(-1)[clear], expected.argmax(-1)[clear]) and clear.float().mean() > 0.9


def test_readme_states_the_equality_precisely():
    serving = _section(REPO / "README.md", "## Serving")
    text = " ".join(serving.split())
    assert "equal to each adapter loaded alone" not in text
    assert f"within {LOGIT_TOLERANCE:.0e}".replace("e-0", "e-") in text and "near-ties" in text


# ---- prepare --json -------------------------------------------------------------------------------
def test_prepare_json_names_the_prepared_folder(tmp_path, seq2seq_tokenizer_dir, capsys):
    argv = ["prepare", "--name", "jsonpath", "--demo_train_size", "40", "--demo_validation_size", "8",
            "--demo_test_size", "8", "--tokenizer", str(seq2seq_tokenizer_dir),
            "--output_root", str(tmp_path / "out"), "--json"]
    assert lora_pipeline(argv) == 0
    first = json.loads(capsys.readouterr().out)
    path = Path(first["path"])
    assert path.is_dir() and path.parent == tmp_path / "out" and first["reused"] is False
    manifest = json.loads((path / "manifest.json").read_text())
    assert {k: v for k, v in first.items() if k not in ("path", "reused")} == manifest
    assert lora_pipeline(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["path"], again["reused"]) == (str(path), True)


# ---- the wheel's name -----------------------------------------------------------------------------
def wheel_name() -> str:
    """The file `pip wheel .` writes: distribution name normalised (PEP 427), version, pure Python."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return f"{re.sub(r'[-_.]+', '_', project['name']).lower()}-{project['version']}-py3-none-any.whl"


def test_docs_name_the_real_wheel_file():
    named = {m for doc in ("README.md", "deploy/README.md")
             for m in re.findall(r"[\w.*-]+\.whl", (REPO / doc).read_text())}
    assert named == {wheel_name()}, f"docs name {named}, the build writes {wheel_name()}"


def _section(path: Path, heading: str) -> str:
    """The text of a Markdown section, from `heading` to the next heading of the same level."""
    text = path.read_text()
    start = text.index(f"\n{heading}\n") + 1
    level = heading.split()[0]
    end = text.find(f"\n{level} ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]
