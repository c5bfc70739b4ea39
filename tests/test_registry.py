"""Registry tests on the embedded default (SQLite file + local artifact folder), plus the pure
promotion gate and retry policy. The real `mlflow server` tests are in test_registry_server.py.
Registered adapters carry their prompt settings (registry_helpers writes them, as the training
export does); one without them is refused unless `--prepared` supplies them.

    .venv/bin/pytest tests/test_registry.py -q
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
from mlflow_server import client_for
from registry_helpers import PROMPTS, generate_texts, make_adapter, make_candidate, weights_sha
from transformers import AutoTokenizer

from lora_module import FingerprintMismatchError
from lora_module.adapter_io import read_prompt_settings, write_prompt_settings
from lora_module.errors import run_cli
from lora_module.home import PipelineHome
from lora_module.prompt import PromptSettings
from lora_module.registry.cli import main as cli_main
from lora_module.registry.gate import decide_promotion
from lora_module.registry.inputs import RegistrationInputError
from lora_module.registry.register import register_adapter
from lora_module.registry.retry import RegistryUnavailableError, RetryPolicy
from lora_module.registry.store import download_adapter
from lora_module.registry.tracking import configure_tracking
from lora_module.serving import MultiTaskPredictor, TaskRef, load_registered
from lora_module.serving.cli import main as serving_main

TEXTS = PROMPTS[:4]


# ---- promotion gate (pure) ----------------------------------------------------------------------
def _champ(value, fp="A", version="1"):
    return {"rougeL": value, "data_fingerprint": fp, "version": version}


@pytest.mark.parametrize(
    ("cand", "base", "champ", "promote", "words"),
    [
        (0.30, 0.20, None, True, "no current champion"),
        (0.20, 0.20, None, False, "does not beat the base"),
        (0.10, 0.20, _champ(0.05), False, "does not beat the base"),
        (0.30, 0.20, _champ(0.30), True, ">= the current champion v1"),
        (0.29, 0.20, _champ(0.30), False, "below the current champion v1"),
        (0.25, 0.20, _champ(0.90, fp="B"), True, "other test data"),
        (0.25, 0.20, _champ(None), True, "has no rougeL"),
        (0.25, None, None, False, "no base-model rougeL"),
        (None, 0.20, None, False, "no evaluation report"),
    ],
)
def test_gate_rule(cand, base, champ, promote, words):
    d = decide_promotion({"rougeL": cand, "data_fingerprint": "A"}, {"rougeL": base}, champ, "rougeL")
    assert d.promote is promote
    assert d.alias == ("champion" if promote else "challenger")
    assert words in d.reason
    tags = d.as_tags()
    assert tags["gate.decision"] == ("promoted" if promote else "not_promoted")
    assert json.loads(tags["gate.json"])["candidate"] == cand


def test_gate_reads_string_tags_and_comparability():
    d = decide_promotion({"rouge1": 0.4, "data_fingerprint": "A"}, {"rouge1": "0.1"},
                         {"rouge1": "0.5", "data_fingerprint": "A", "version": "7"}, "rouge1")
    assert not d.promote and d.champion == 0.5 and d.champion_version == "7" and d.champion_comparable


# ---- retries ------------------------------------------------------------------------------------
def test_retry_policy_retries_transient_then_names_uri():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise MlflowException("API request to http://x failed with exception boom")  # INTERNAL_ERROR
        return "ok"

    assert RetryPolicy(retries=3, backoff=0).call(flaky, "op", "http://x") == "ok"
    assert len(calls) == 3

    def down():
        raise ConnectionError("refused")

    with pytest.raises(RegistryUnavailableError, match=r"http://reg:5000 unreachable: op failed 3 time"):
        RetryPolicy(retries=2, backoff=0).call(down, "op", "http://reg:5000")

    def bad():
        calls.append(1)
        raise MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST)

    calls.clear()
    with pytest.raises(MlflowException):
        RetryPolicy(retries=5, backoff=0).call(bad, "op", "u")
    assert len(calls) == 1  # not transient: no retry
    with pytest.raises(ValueError, match="RetryPolicy.retries"):
        RetryPolicy(retries=-1)


# ---- embedded default: SQLite + local artifacts ---------------------------------------------------
@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A fresh pipeline home; the registry uses its default SQLite store there."""
    root = tmp_path_factory.mktemp("registry_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("LORA_PIPELINE_HOME", str(root))
        yield root


@pytest.fixture(scope="module")
def registered(home, tiny_t5_dir, tmp_path_factory):
    """Task `demo`: v1 (rougeL 4/8, promoted), v2 (2/8, challenger), v3 (6/8, promoted)."""
    out = tmp_path_factory.mktemp("candidates")
    cands, results = {}, {}
    for version, (seed, hits) in enumerate([(1, 4), (2, 2), (3, 6)], start=1):
        adapter, report, model = make_candidate(out / f"c{version}", tiny_t5_dir, seed, hits)
        cands[version] = (adapter, report, model)
        results[version] = register_adapter("demo", adapter, report, retries=1, backoff=0.1)
    return cands, results


def test_versions_gate_tags_and_run(registered, home, tiny_t5_dir):
    cands, results = registered
    assert [r.version for r in results.values()] == ["1", "2", "3"]
    assert [r.alias for r in results.values()] == ["champion", "challenger", "champion"]
    assert results[2].decision["champion"] == 0.5
    assert "below the current champion v1" in results[2].decision["reason"]
    uri = configure_tracking()
    assert uri == f"sqlite:///{home / 'mlflow.db'}"
    client = client_for(uri)
    assert str(client.get_model_version_by_alias("demo-lora", "champion").version) == "3"
    assert str(client.get_model_version_by_alias("demo-lora", "challenger").version) == "2"
    mv = client.get_model_version("demo-lora", "2")
    tags = mv.tags
    # A dozen tags a reviewer reads (and the gate / `list` read back); the rest is in lineage.json.
    assert tags["task"] == "demo" and tags["mode"] == "lora" and len(tags) <= 14, sorted(tags)
    assert tags["data_fingerprint"] == tags["eval_data_fingerprint"] == "data-A"
    assert tags["rouge.rougeL"] == "0.2500" and tags["rouge.base.rougeL"] == "0.1250"
    assert tags["gate.decision"] == "not_promoted" and "below the current champion v1" in tags["gate.reason"]
    lineage = client.download_artifacts(mv.run_id, "lineage.json", str(home / "dl"))
    full = json.loads(Path(lineage).read_text())
    assert full["tags"]["base_model"] == str(tiny_t5_dir) and full["gate"]["champion_version"] == "1"
    lora = (full["tags"]["lora.r"], full["tags"]["lora.alpha"], full["tags"]["lora.targets"])
    assert lora == ("4", "8", "q,v")
    assert len(full["tags"]["base_fingerprint"]) >= 16 and full["tags"]["git_commit"]
    assert "# ROUGE evaluation" in mv.description and "| model |" in mv.description
    run = client.get_run(mv.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["adapter.r"] == "4"
    assert run.data.metrics["rouge.lora.rougeL"] == pytest.approx(0.25)
    assert "compare.lora_vs_base.rougeL.mean_diff" in run.data.metrics
    files = {a.path for a in client.list_artifacts(mv.run_id, "evaluation")}
    assert files == {f"evaluation/{f}" for f in ("report.json", "report.md", "rouge.png", "predictions.csv")}
    # Artifacts live in the local folder beside the SQLite file, not in ./mlruns.
    assert (home / "mlartifacts" / "lora-demo").is_dir() and not Path("mlruns").exists()


def test_load_by_alias_and_pyfunc_generate_like_in_memory(registered, tiny_t5_dir):
    cands, _ = registered
    in_memory = cands[3][2]
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5_dir)
    expected = generate_texts(in_memory, tokenizer, TEXTS)
    model, tok = load_registered("models:/demo-lora@champion")
    assert generate_texts(model, tok, TEXTS) == expected
    older, _ = load_registered("demo", version=2)
    assert generate_texts(older, tok, TEXTS) == generate_texts(cands[2][2], tokenizer, TEXTS)
    assert generate_texts(older, tok, TEXTS) != expected  # different adapters really differ
    pyfunc = mlflow.pyfunc.load_model("models:/demo-lora@champion")
    params = {"max_new_tokens": 12}
    assert pyfunc.predict(pd.DataFrame({"text": TEXTS}), params=params) == expected
    assert pyfunc.predict({"text": TEXTS}, params=params) == expected
    sig = pyfunc.metadata.signature
    assert sig.inputs.input_names() == ["text", "messages"] and sig.outputs.to_dict()[0]["type"] == "string"


def test_peft_loads_registry_files_same_logits(registered, tiny_t5_dir, tmp_path):
    from peft import PeftModel

    from lora_module import load_base_model

    cands, _ = registered
    reg = download_adapter("demo", tmp_path, alias="champion")
    assert reg.version == "3"
    peft_model = PeftModel.from_pretrained(load_base_model(str(tiny_t5_dir)), str(reg.adapter_dir)).eval()
    ids = torch.tensor([[5, 17, 42, 99, 1]])
    dec = torch.tensor([[0, 7, 8]])
    with torch.no_grad():
        ours = cands[3][2](input_ids=ids, decoder_input_ids=dec).logits
        theirs = peft_model(input_ids=ids, decoder_input_ids=dec).logits
        base = load_base_model(str(tiny_t5_dir))(input_ids=ids, decoder_input_ids=dec).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert (ours - base).abs().max() > 1e-3  # the adapter changes the output


def test_multi_task_one_base_matches_each_alone(registered, tiny_t5_dir, tmp_path):
    adapter, report, _ = make_candidate(tmp_path / "other", tiny_t5_dir, seed=11, lora_hits=5)
    register_adapter("other", adapter, report, retries=1, backoff=0.1)
    alone = {task: generate_texts(*load_registered(task), TEXTS) for task in ("demo", "other")}
    mt = MultiTaskPredictor.load([TaskRef.parse("demo"), TaskRef.parse("other")], base=str(tiny_t5_dir),
                                 refresh_seconds=None)
    assert sorted(mt.versions) == ["demo", "other"]
    params = {"max_new_tokens": 12}
    for _ in range(2):  # one adapter after the other
        for task in ("other", "demo"):
            assert mt.predict([task] * len(TEXTS), TEXTS, params) == alone[task]
    tasks = ["demo", "other"] * (len(TEXTS) // 2)  # rows of both tasks in one batch
    assert mt.predict(tasks, TEXTS, params) == [alone[t][i] for i, t in enumerate(tasks)]
    assert alone["demo"] != alone["other"]


def test_fingerprint_mismatch_refused_unless_forced(registered, tmp_path, seq2seq_tokenizer_dir):
    from conftest import make_tiny_t5

    other = tmp_path / "other_base"
    tok = AutoTokenizer.from_pretrained(seq2seq_tokenizer_dir)
    make_tiny_t5(len(tok), seed=123).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(FingerprintMismatchError, match="force=True"):
        load_registered("demo", base=str(other))
    model, _ = load_registered("demo", base=str(other), force=True)
    assert model.active_adapter == "default"
    assert run_cli(serving_main, ["predict", "demo", "--base", str(other), "--text", "hi"]) == 2


def test_cli_list_show_promote_demote_predict(registered, capsys, tmp_path, tiny_t5_dir):
    cands, _ = registered
    assert cli_main(["list"]) == 0
    out = capsys.readouterr().out
    assert "demo-lora (task demo): 3 version(s)" in out and "champion" in out and "challenger" in out
    assert cli_main(["show", "demo", "@champion", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "3" and shown["tags"]["gate.decision"] == "promoted"

    assert cli_main(["promote", "demo", "1", "--reason", "human review"]) == 0
    client = client_for(configure_tracking())
    assert str(client.get_model_version_by_alias("demo-lora", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("demo-lora", "challenger").version) == "3"  # newest other
    manual = client.get_model_version("demo-lora", "1").tags["manual.last"]
    assert manual == "promoted to champion: human review"
    assert run_cli(cli_main, ["demote", "demo", "2", "--reason", "x"]) == 2  # champion is v1, not v2
    assert "not v2" in capsys.readouterr().err
    assert cli_main(["demote", "demo", "--reason", "regression"]) == 0
    with pytest.raises(LookupError, match="no alias 'champion'"):
        load_registered("demo")
    assert cli_main(["promote", "demo", "3", "--reason", "restore"]) == 0
    # The challenger promoted to champion gives @challenger up (to the newest other version).
    assert client.get_model_version("demo-lora", "3").aliases == ["champion"]
    assert str(client.get_model_version_by_alias("demo-lora", "challenger").version) == "2"
    assert cli_main(["list", "demo"]) == 0
    assert "0.7500  0.1250" in capsys.readouterr().out  # v3's rougeL and its base, rounded

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TEXTS[:2]) + "\n")
    capsys.readouterr()
    assert serving_main(["predict", "demo", "--file", str(prompts), "--max-new-tokens", "12", "--json"]) == 0
    outputs = [row["output"] for row in json.loads(capsys.readouterr().out)]
    assert outputs == generate_texts(cands[3][2], AutoTokenizer.from_pretrained(tiny_t5_dir), TEXTS[:2])


def test_four_concurrent_registrations_embedded(home, tiny_t5_dir, tmp_path):
    """Threads sharing the SQLite file: four distinct complete versions, the best one champion."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    hits = [3, 7, 5, 4]
    cands = [make_candidate(tmp_path / f"c{i}", tiny_t5_dir, seed=40 + i, lora_hits=h)
             for i, h in enumerate(hits)]
    barrier = threading.Barrier(len(cands))

    def register(c):
        barrier.wait()
        return register_adapter("conc", c[0], c[1], retries=6, backoff=0.2)

    with ThreadPoolExecutor(len(cands)) as pool:
        results = list(pool.map(register, cands))
    assert sorted(int(r.version) for r in results) == [1, 2, 3, 4]
    client = client_for(configure_tracking())
    for r, c in zip(results, cands, strict=True):
        mv = client.get_model_version("conc-lora", r.version)
        assert mv.tags["adapter_sha256"] == weights_sha(c[0])
        assert "gate.decision" in mv.tags and "\n# ROUGE evaluation" in mv.description
        assert client.get_run(r.run_id).info.status == "FINISHED"
    best = results[hits.index(7)]
    assert str(client.get_model_version_by_alias("conc-lora", "champion").version) == best.version


def test_bad_inputs_fail_before_touching_the_registry(home, tiny_t5_dir, tmp_path):
    with pytest.raises(RegistrationInputError, match="not a PEFT-format adapter folder"):
        register_adapter("demo", tmp_path, retries=0)
    adapter, _ = make_adapter(tiny_t5_dir, tmp_path / "a", seed=5)
    other, _ = make_adapter(tiny_t5_dir, tmp_path / "b", seed=6)
    _, report, _ = make_candidate(tmp_path / "c", tiny_t5_dir, seed=7, lora_hits=3)
    with pytest.raises(RegistrationInputError, match="not about it"):
        register_adapter("demo", other, report, retries=0)  # report scored another adapter
    with pytest.raises(RegistrationInputError, match="metric 'rouge3'"):
        register_adapter("demo", tmp_path / "c" / "adapter", report, metric="rouge3", retries=0)
    assert adapter.is_dir()


TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "
MANIFEST = {"fingerprint": "f" * 64, "model_type": "seq2seq",
            "config": {"prompt_template": TEMPLATE, "input_column": "dialogue", "max_source_length": 256,
                       "max_target_length": 12}}


def test_an_adapter_without_prompt_settings_is_registered_only_with_prepared(home, tiny_t5_dir, tmp_path,
                                                                             capsys):
    """Refused in one line naming --prepared; with it, the registered adapter's sidecar holds the
    prepared data's settings (the given folder is left as it was) and the served model applies them."""
    torch.manual_seed(0)  # lora_A's init: outputs that tell a templated prompt from a bare one
    _, model = make_adapter(tiny_t5_dir, tmp_path / "made", seed=12)
    bare = model.save_pretrained(tmp_path / "bare", base_model_name_or_path=str(tiny_t5_dir))
    assert read_prompt_settings(bare) is None  # saved as a pre-sidecar-prompt export would be
    before = {f.name: f.read_bytes() for f in bare.iterdir()}
    capsys.readouterr()
    assert run_cli(cli_main, ["register", "bare", str(bare)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "--prepared DIR" in err, err
    assert "records no prompt settings" in err
    assert not client_for(configure_tracking()).search_registered_models("name = 'bare-lora'")

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "manifest.json").write_text(json.dumps(MANIFEST))
    assert run_cli(cli_main, ["register", "bare", str(bare), "--prepared", str(prepared)]) == 0
    assert {f.name: f.read_bytes() for f in bare.iterdir()} == before
    reg = download_adapter("bare", tmp_path / "dl", version=1)
    assert read_prompt_settings(reg.adapter_dir) == PromptSettings.from_manifest(MANIFEST)
    client = client_for(configure_tracking())
    run_id = client.get_model_version("bare-lora", "1").run_id
    lineage = json.loads(Path(client.download_artifacts(run_id, "lineage.json", str(tmp_path))).read_text())
    assert lineage["prompt"] == {"settings": PromptSettings.from_manifest(MANIFEST).to_dict(),
                                 "from": str(prepared.resolve())}
    served = mlflow.pyfunc.load_model("models:/bare-lora/1").predict({"text": TEXTS[:2]},
                                                                      params={"max_new_tokens": 12})
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5_dir)
    templated = generate_texts(model, tokenizer, [TEMPLATE.format(dialogue=t) for t in TEXTS[:2]])
    assert served == templated and served != generate_texts(model, tokenizer, TEXTS[:2])

    # An adapter that records other settings than the prepared folder's is refused, not overridden.
    own = Path(shutil.copytree(bare, tmp_path / "own"))
    write_prompt_settings(own, PromptSettings(template="{dialogue} =>"))
    with pytest.raises(RegistrationInputError, match=r"differ from .*'template'\]: leave out --prepared"):
        register_adapter("bare", own, prepared_dir=prepared, retries=0)


def test_explicit_home_wins_over_the_environment(home, tiny_t5_dir, tmp_path):
    """register_adapter(home=...) uses that home's store, experiment artifact root and lock folder."""
    other = PipelineHome.from_env(tmp_path / "other")
    adapter, report, _ = make_candidate(tmp_path / "c", tiny_t5_dir, seed=5, lora_hits=4)
    res = register_adapter("explicit", adapter, report, retries=0, home=other)
    assert res.tracking_uri == other.tracking_uri != configure_tracking(None)
    client = client_for(other.tracking_uri)
    experiment = client.get_experiment(client.get_run(res.run_id).info.experiment_id)
    assert experiment.name == "lora-explicit"
    assert experiment.artifact_location == other.artifact_location("lora-explicit")
    assert (other.locks_dir / "explicit-lora.lock").is_file()
    assert not (home / "locks" / "explicit-lora.lock").exists()


def test_register_without_report_reads_training_outputs(home, tiny_t5_dir, tmp_path, capsys):
    client = client_for(configure_tracking())
    # The training CLI logs its loss curves to MLflow and records that run in metrics.json.
    train_run = client.create_run(client.create_experiment("training-test")).info.run_id
    for step, loss in enumerate([2.5, 2.0, 1.6]):
        client.log_metric(train_run, "train/loss", loss, step=step * 10)
    train = tmp_path / "run"
    make_adapter(tiny_t5_dir, train / "adapter", seed=9)
    (train / "config.yaml").write_text(
        "model:\n  finetune: lora\n  lora:\n    r: 4\ndata:\n  batch_size: 2\n")
    (train / "metrics.json").write_text(json.dumps({
        "finetune": "lora", "train_loss": 1.5, "steps": 3, "loss_history": [2.0, 1.7, 1.5],
        "mlflow_run_id": train_run, "mlflow_tracking_uri": configure_tracking()}))
    before = weights_sha(train / "adapter")
    res = register_adapter("notes", train, train_dir=train, data_fingerprint="fp-x", retries=0)
    assert res.alias == "challenger" and "no evaluation report" in res.decision["reason"]
    run = client.get_run(res.run_id)
    assert run.data.params["model.lora.r"] == "4" and run.data.params["data.batch_size"] == "2"
    assert run.data.metrics["training.train_loss"] == 1.5
    curve = client.get_metric_history(res.run_id, "training/loss_history")
    assert [(m.step, m.value) for m in curve] == [(0, 2.0), (1, 1.7), (2, 1.5)]
    copied = client.get_metric_history(res.run_id, "training/train/loss")
    assert [(m.step, m.value) for m in copied] == [(0, 2.5), (10, 2.0), (20, 1.6)]
    tags = client.get_model_version("notes-lora", res.version).tags
    assert tags["data_fingerprint"] == "fp-x" and tags["training_run_id"] == train_run
    assert {a.path for a in client.list_artifacts(res.run_id, "training")} == {
        "training/config.yaml", "training/metrics.json"}
    assert weights_sha(train / "adapter") == before
    # The same from the command line: a second version.
    capsys.readouterr()
    assert cli_main(["register", "notes", str(train / "adapter"), "--train-dir", str(train)]) == 0
    out = json.loads(capsys.readouterr().out.split("\n", 1)[1])  # after the gate's printed line
    assert out["model_uri"] == "models:/notes-lora/2" and out["alias"] == "challenger"
    assert os.environ["LORA_PIPELINE_HOME"] == str(home)


_SELF_CONTAINED = """
import json, sys
# Hide this project: the editable-install finder and the working tree.
sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path = [p for p in sys.path if p not in ("", ".", sys.argv[1])]
try:
    import lora_module  # noqa: F401
    sys.exit("lora_module is still importable: the test proves nothing")
except ImportError:
    pass
import mlflow
mlflow.set_tracking_uri(sys.argv[2])
model = mlflow.pyfunc.load_model("models:/demo-lora@champion")
print(json.dumps(model.predict({"text": json.loads(sys.argv[3])}, params={"max_new_tokens": 12})))
"""


@pytest.mark.slow
def test_pyfunc_loads_without_the_project(registered, tiny_t5_dir, tmp_path):
    """The logged model ships the lora_module files it imports (code_paths)."""
    import subprocess
    import sys

    cands, _ = registered
    expected = generate_texts(cands[3][2], AutoTokenizer.from_pretrained(tiny_t5_dir), TEXTS)
    project = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run(
        [sys.executable, "-c", _SELF_CONTAINED, project, configure_tracking(), json.dumps(TEXTS)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected
