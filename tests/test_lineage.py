"""Lineage a reviewer can follow in MLflow, and the surfaces they read (issue 16).

    .venv/bin/pytest tests/test_lineage.py -q          # ~1 min: two 2-step trainings on the tiny T5

Two real `lora-pipeline fit` runs (in-process, the shipped demo config) into a temporary SQLite
store, then real registrations: run names are unique and meaningful, training runs carry task /
fingerprint / commit tags and land in the task's experiment, the exported adapter records the
prepared data's prompt settings, the version and its training run link each other, a registration
into another store warns, the version's tags are few and rounded, and the report chart says n and
the number of references. Every tag key is spelled once, in lora_module.contracts: a scan of the
source of lora_module/ and flows/ finds no other spelling of one.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import stat
from pathlib import Path

import pytest
from mlflow_server import client_for
from registry_helpers import make_report
from test_training import prepare_tiny
from test_training_cli import DEMO_CONFIG, overrides

from lora_module import contracts
from lora_module.adapter_io import read_prompt_settings
from lora_module.contracts import run_name
from lora_module.home import PipelineHome
from lora_module.lineage import git_commit, same_store
from lora_module.prompt import PromptSettings
from lora_module.registry.register import register_adapter
from lora_module.training.cli import main as fit_main

TASK = "lineage"
NAME = re.compile(rf"^{TASK}-lora-r4-\d{{8}}T\d{{6}}Z-[0-9a-f]{{6}}$")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_t5_dir, seq2seq_tokenizer_dir) -> dict:
    """Two 2-step fits of task `lineage` (experiment from `--trainer.logger.init_args.task`)."""
    old_umask, old_env = os.umask(0o022), dict(os.environ)
    try:
        home = PipelineHome.from_env(tmp_path_factory.mktemp("home"))
        prepared = prepare_tiny(seq2seq_tokenizer_dir, "seq2seq", home.root / "data")
        outs = []
        for i in range(2):
            out = home.root / f"run{i}"
            fit_main(["fit", "--config", str(DEMO_CONFIG), *overrides(tiny_t5_dir, prepared, out, 2),
                      "--trainer.logger.init_args.task", TASK,
                      "--trainer.logger.init_args.tracking_uri", home.tracking_uri])
            outs.append(out)
    finally:  # MLflow exports the store it was given as MLFLOW_TRACKING_URI: undo it for later tests
        os.umask(old_umask)
        os.environ.clear()
        os.environ.update(old_env)
    metrics = [json.loads((out / "metrics.json").read_text()) for out in outs]
    manifest = json.loads((prepared / "manifest.json").read_text())
    return {"home": home, "outs": outs, "metrics": metrics, "manifest": manifest}


def test_run_name_and_store_identity():
    from datetime import UTC, datetime

    when = datetime(2026, 11, 30, 23, 15, 2, tzinfo=UTC)
    assert run_name("summary", "lora", 8, when, "3fa2c1d0") == "summary-lora-r8-20261130T231502Z-3fa2c1"
    assert run_name("summary", "full", 8, when) == "summary-full-20261130T231502Z"
    assert same_store("sqlite:////a/b/../mlflow.db", "sqlite:////a/mlflow.db")
    assert same_store("http://localhost:5000/", "http://127.0.0.1:5000")
    assert not same_store("sqlite:////a/mlflow.db", "http://127.0.0.1:5000")
    assert not same_store(None, "http://127.0.0.1:5000")


def test_tag_dicts_are_built_from_the_contract():
    assert contracts.training_run_tags("summary", "full", 8, "fp", None, None, "sqlite:///x") == {
        "task": "summary", "finetune": "full", "data_fingerprint": "fp", "tracking_uri": "sqlite:///x"}
    full = {"task": "t", "mode": "lora", "eval.baseline": "base", "rouge.rougeL": "0.333333",
            "rouge.base.rougeL": "0.1", "rouge.base.rouge1": "0.2", "lora.r": "8",
            "data_fingerprint": "a" * 64}
    assert contracts.version_tags(full, ["rougeL"], "rougeL", "http://other:5000") == {
        "task": "t", "mode": "lora", "eval.baseline": "base", "rouge.rougeL": "0.3333",
        "rouge.base.rougeL": "0.1000", "data_fingerprint": "a" * 12, "training_run_id": "none",
        "training_run_store": "http://other:5000"}
    assert contracts.registration_identity("sha", None, "m") == {
        "adapter_sha256": "sha", "training_run_id": "none", "registered_model": "m"}
    assert (contracts.rouge_change_key("rougeL", "base", "lora"), contracts.rouge_ci_key("rouge1")) == (
        "rouge.lora.rougeL.vs_base_points", "rouge.rouge1.ci95")


def test_training_runs_are_named_tagged_and_in_the_task_experiment(trained):
    client = client_for(trained["home"].tracking_uri)
    runs = [client.get_run(m["mlflow_run_id"]) for m in trained["metrics"]]
    names = [r.info.run_name for r in runs]
    assert all(NAME.match(n) for n in names), names
    assert names[0] != names[1]  # seed_everything seeds MLflow's name generator: ours differ
    assert {client.get_experiment(r.info.experiment_id).name for r in runs} == {f"lora-{TASK}"}
    tags = runs[0].data.tags
    assert tags["task"] == TASK and tags["finetune"] == "lora" and tags["lora.r"] == "4"
    assert tags["data_fingerprint"] == trained["manifest"]["fingerprint"]
    assert tags["base_fingerprint"] == trained["metrics"][0]["base_fingerprint"]
    assert tags.get("git_commit") == git_commit()  # omitted outside a git checkout
    assert same_store(tags["tracking_uri"], trained["home"].tracking_uri)


def test_exported_adapter_records_the_prepared_prompt_settings(trained):
    """The export writes the manifest's prompt settings into the adapter's sidecar, so the adapter
    registers (the next tests) and serves without anyone looking for the prepared data."""
    expected = PromptSettings.from_manifest(trained["manifest"])
    assert expected.template and expected.max_source_length == 48  # the demo data's: a real check
    for out in trained["outs"]:
        sidecar = json.loads((out / "adapter" / "lora_pipeline.json").read_text())
        assert sidecar["prompt"] == expected.to_dict()
        assert read_prompt_settings(out / "adapter") == expected


def test_version_and_training_run_link_each_other(trained, tmp_path):
    home, out, metrics = trained["home"], trained["outs"][0], trained["metrics"][0]
    report = make_report(tmp_path / "eval", out / "adapter", lora_hits=6, base_hits=1, task=TASK)
    res = register_adapter(TASK, out / "adapter", report, train_dir=out, home=home, retries=1, backoff=0.1)
    client = client_for(home.tracking_uri)
    mv = client.get_model_version(res.model_name, res.version)
    training = client.get_run(metrics["mlflow_run_id"])
    assert client.get_run(res.run_id).info.experiment_id == training.info.experiment_id
    assert mv.tags["training_run_id"] == training.info.run_id
    link = f"(#/experiments/{training.info.experiment_id}/runs/{training.info.run_id})"
    assert mv.description.startswith("Trained in MLflow run [") and link in mv.description
    assert training.data.tags["registered_version"] == f"{res.model_name}/{res.version}"
    assert f"(#/models/{res.model_name}/versions/{res.version})" in training.data.tags["mlflow.note.content"]
    # Few tags, rounded; everything else in the run's lineage.json.
    assert len(mv.tags) <= 14 and mv.tags["rouge.rougeL"] == "0.7500", sorted(mv.tags)
    assert mv.tags["data_fingerprint"] == metrics["data_fingerprint"][:12]
    lineage = json.loads(Path(client.download_artifacts(res.run_id, "lineage.json", str(tmp_path)))
                         .read_text())
    assert lineage["training_run"] == {"run_id": training.info.run_id, "same_store": True,
                                       "tracking_uri": metrics["mlflow_tracking_uri"]}
    assert lineage["tags"]["lora.targets"] == "q,k,v,o,wi_0,wi_1,wo" and lineage["gate"]["promote"] is True


def test_registration_into_another_store_warns_and_records_it(trained, tmp_path, caplog):
    out, metrics = trained["outs"][1], trained["metrics"][1]
    other = PipelineHome.from_env(tmp_path / "other_home", f"sqlite:///{tmp_path}/other_home/mlflow.db")
    report = make_report(tmp_path / "eval", out / "adapter", lora_hits=6, base_hits=1, task=TASK)
    with caplog.at_level(logging.WARNING, logger="lora_module.registry.register"):
        res = register_adapter(TASK, out / "adapter", report, train_dir=out, home=other, retries=1,
                               backoff=0.1)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert metrics["mlflow_tracking_uri"] in warning and other.tracking_uri in warning
    mv = client_for(other.tracking_uri).get_model_version(res.model_name, res.version)
    assert mv.tags["training_run_store"] == metrics["mlflow_tracking_uri"]
    assert "of another tracking store" in mv.description


def test_training_and_report_files_are_0644(trained, tmp_path):
    out = trained["outs"][0]
    report = make_report(tmp_path / "eval", out / "adapter", lora_hits=6, base_hits=1, task=TASK)
    files = [p for p in [*out.resolve().rglob("*"), *report.parent.rglob("*")]
             if p.is_file() and "checkpoints" not in p.parts]
    modes = {str(p.relative_to(p.parents[1])): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes
    names = {p.name for p in files}
    assert {"adapter_config.json", "lora_pipeline.json", "metrics.json", "report.json"} <= names


def test_chart_names_models_once_and_says_n_and_references(tmp_path, tiny_t5_dir, monkeypatch):
    from matplotlib.figure import Figure

    from lora_module.evaluation.report import _references_text

    figures = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig",
                        lambda fig, *a, **k: (figures.append(fig), real_savefig(fig, *a, **k)))
    from registry_helpers import make_adapter

    adapter, _ = make_adapter(tiny_t5_dir, tmp_path / "adapter", seed=0)
    make_report(tmp_path / "eval", adapter, lora_hits=4, base_hits=1)
    ax = figures[-1].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["base", "lora"]  # not "base (base)"
    assert ax.get_title() == "demo: ROUGE on test (n=8, 1 reference each)"
    assert _references_text([3, 3]) == "3 references each"
    assert _references_text([1, 3]) == "1-3 references each"


# ---- one spelling per tag key --------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
TAG_KEYS = {v for k, v in vars(contracts).items() if k.startswith("TAG_")}
# Keys that are also other files' field names (metrics.json, report.json, adapter_config.json,
# command-line options): outside a tag context they are not tags. Every other key is distinctive.
SHARED_WORDS = {"task", "tasks", "mode", "finetune", "source", "data_fingerprint", "base_fingerprint",
                "base_model", "git_commit", "tracking_uri", "adapter_sha256", "adapter_bytes", "adapter_dir"}
KEY_PREFIXES = tuple(f"{k.split('.')[0]}." for k in TAG_KEYS if "." in k) + (contracts.ROUGE_PREFIX,)


def _strings(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _key_strings(node: ast.AST) -> list[str]:
    """The string constants of `node`, of a dict its keys' only (the values are tag values)."""
    if isinstance(node, ast.Dict):
        return [s for k in node.keys if k is not None for s in _key_strings(k)]
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    return [s for child in ast.iter_child_nodes(node) for s in _key_strings(child)]


def _about_tags(node: ast.AST) -> bool:
    """Whether an expression names tags (`mv.tags`, `run_tags`, `_FINGERPRINT_TAG`; not `STAGES`)."""
    return re.search(r"(?<![a-z])tags?(?![a-z])", ast.unparse(node).lower()) is not None


# Where a setter takes the tag's key.
TAG_SETTERS = {"set_tag": 1, "set_model_version_tag": 2, "set_registered_model_tag": 1, "RunTag": 0}


def _tag_contexts(tree: ast.AST) -> list[ast.AST]:
    """The nodes whose strings are tag keys: tags[...], tags.get(...), tags dicts, a setter's key."""
    out: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and _about_tags(node.value):
            out.append(node.slice)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in TAG_SETTERS:
                out += node.args[TAG_SETTERS[name]:TAG_SETTERS[name] + 1]
            elif name in ("get", "pop", "setdefault", "update") and isinstance(func, ast.Attribute) \
                    and _about_tags(func.value):
                out += node.args[:1]
            out += [k.value for k in node.keywords if k.arg == "tags"]
        elif isinstance(node, ast.Assign | ast.AnnAssign) and _about_tags(
                node.targets[0] if isinstance(node, ast.Assign) else node.target):
            out.append(node.value)
        elif isinstance(node, ast.FunctionDef) and _about_tags(ast.Name(node.name)):
            out += [r.value for r in ast.walk(node) if isinstance(r, ast.Return)]
    return [n for n in out if n is not None]


def _spelled_tag_keys(source: str) -> list[str]:
    """The tag keys (and key prefixes, `tags.<key>` filters) a module's source spells itself."""
    tree = ast.parse(source)
    strings = _strings(tree)
    found = {s for s in strings if s in TAG_KEYS - SHARED_WORDS or s.startswith(KEY_PREFIXES)}
    found |= {s for s in strings if (m := re.search(r"\btags\.(\w+)", s)) and m.group(1) in TAG_KEYS}
    found |= {s for node in _tag_contexts(tree) for s in _key_strings(node) if s in TAG_KEYS}
    return sorted(found)


def test_the_scan_finds_each_way_of_spelling_a_tag_key():
    source = ("def f(mv, client, run, experiment, task, fp):\n"
              "    mv.tags.get('mode')\n"
              "    client.set_tag(run, 'registered_version', 'x')\n"
              "    client.create_registered_model('m', tags={'task': task})\n"
              "    _FINGERPRINT_TAG = 'base_fingerprint'\n"
              "    client.search_runs([experiment], f\"tags.adapter_sha256 = '{fp}'\")\n"
              "    return f'rouge.{task}', 'eval_data_fingerprint'\n"
              "def metrics(task, report):\n"
              "    report.get('mode')\n"
              "    return {'task': task, 'data_fingerprint': 'x'}  # a file's fields, not tags\n")
    assert _spelled_tag_keys(source) == ["base_fingerprint", "eval_data_fingerprint", "mode",
                                         "registered_version", "rouge.", "tags.adapter_sha256 = '", "task"]


def test_no_module_outside_contracts_spells_a_tag_key():
    files = [f for folder in ("lora_module", "flows") for f in sorted((ROOT / folder).rglob("*.py"))
             if f.name != "contracts.py"]
    assert len(files) > 40
    hits = [f"{f.relative_to(ROOT)}: {key!r}" for f in files for key in _spelled_tag_keys(f.read_text())]
    assert hits == []
