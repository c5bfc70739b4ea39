"""Bad input, tried the way a user would: every case must end in one clear line and write nothing.

    .venv/bin/python -m pytest tests/test_bad_inputs.py -q

A table of cases across the stages. Command cases go through `lora-pipeline` itself
(`lora_pipeline.flows.cli.main`, in-process for speed) and must exit with status 2, print exactly
one `error:` line holding the case's key words (the field or file, and what would be valid), print
no traceback, and leave the folders the command would write unchanged. API cases call the library
and must raise a `PipelineError` with those words, equally writing nothing. Content-addressed input
caches (the datasets cache, the generated demo corpus) may appear: they are reusable, not outputs.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny_t5
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from lora_module import LoraConfig, LoraModel, load_base_model
from lora_module.errors import PipelineError
from lora_pipeline.data import DataConfig, prepare
from lora_pipeline.flows.cli import main as lora_pipeline

REPO = Path(__file__).resolve().parents[1]
FIT_CONFIG = REPO / "deploy" / "configs" / "demo_summary_lora.yaml"
CACHES = ("hf_cache", "tokenizers")  # input caches under an output root, not outputs


@dataclass
class Case:
    """One bad input: its command line or API call, the words its error must hold, where it must not write."""

    id: str
    run: Callable[[dict[str, Any]], Any]
    """env -> argv list for `lora-pipeline`, or a callable (env -> None) for an API case."""
    words: tuple[str, ...]
    watch: Callable[[dict[str, Any]], list[Path]] = field(default=lambda env: [env["out"]])
    """Folders the command would write into; their contents must not change."""
    home: str = "{tmp}/home"
    """$LORA_PIPELINE_HOME during the case (formatted with env)."""
    caches: bool = False
    """The input was found bad only once read: the datasets cache of what was read (and the folder holding
    it) may remain; no other file may."""


# ---- the shared, valid inputs every case spoils one part of -------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_t5_dir) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("bad_inputs")
    tok = AutoTokenizer.from_pretrained(tiny_t5_dir)
    prepared = prepare(DataConfig(
        name="bad", demo_train_size=30, demo_validation_size=5, demo_test_size=5, tokenizer=str(tiny_t5_dir),
        output_root=str(root / "data"), max_source_length=64, max_target_length=16)).path
    adapter = root / "adapter"
    LoraModel(load_base_model(tiny_t5_dir), LoraConfig(r=4, target_modules=["q", "v"])).save_pretrained(
        adapter, base_model_name_or_path=str(tiny_t5_dir))
    nan_adapter = root / "nan_adapter"
    shutil.copytree(adapter, nan_adapter)
    weights = nan_adapter / "adapter_model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(weights).items()}, weights)
    cut_adapter = root / "cut_adapter"
    shutil.copytree(adapter, cut_adapter)
    _truncate(cut_adapter / "adapter_model.safetensors")
    other_base = root / "other_base"
    make_tiny_t5(len(tok), seed=1).save_pretrained(other_base)
    tok.save_pretrained(other_base)
    cut_base = root / "cut_base"
    shutil.copytree(tiny_t5_dir, cut_base)
    _truncate(cut_base / "model.safetensors")
    files = root / "files"
    files.mkdir()
    (files / "bare.json").write_text('["a dialogue", "another one"]')
    (files / "strings.jsonl").write_text('"a dialogue"\n"another one"\n')
    (files / "wrong_columns.jsonl").write_text('{"text": "hi", "label": "x"}\n' * 20)
    (files / "broken.jsonl").write_text('{"dialogue": "a", "summary": "b"}\n{"dialogue": "a", "summ\n')
    (files / "empty.jsonl").write_text("")
    (files / "notes.txt").write_text("hello\n")
    (files / "unknown_key.yaml").write_text("name: x\ncolour: red\n")
    configs = REPO / "deploy" / "configs"
    spec = {"name": "badspec", "data_config": str(configs / "data_demo_summary.yaml"), "base_model": "demo",
            "lora_config": str(configs / "demo_summary_lora.yaml"), "train_overrides": ["--model.bogus", "1"]}
    (files / "bad_override.yaml").write_text(json.dumps(spec))
    (files / "unknown_spec_key.yaml").write_text(json.dumps({**spec, "train_overrides": [], "colour": "red"}))
    (root / "a_file").write_text("a regular file, not a folder\n")
    trained = root / "trained_r8"  # a checkpoint to resume with another r
    rc = lora_pipeline(["fit", "--config", str(FIT_CONFIG), *_fit_paths(tiny_t5_dir, prepared, trained),
                        "--trainer.max_epochs", "-1", "--trainer.max_steps", "1"])
    assert rc == 0 and (trained / "checkpoints" / "last.ckpt").is_file()
    return {"root": root, "base": tiny_t5_dir, "prepared": prepared, "adapter": adapter, "nan": nan_adapter,
            "cut_adapter": cut_adapter, "other_base": other_base, "cut_base": cut_base, "files": files,
            "file": root / "a_file", "trained": trained}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _fit_paths(base: Path, prepared: Path, out: Path) -> list[str]:
    return ["--model.model_name_or_path", str(base), "--data.prepared_dir", str(prepared),
            "--model.output_dir", str(out), "--trainer.logger", "false", "--trainer.enable_progress_bar",
            "false", "--model.lora.lora_dropout", "0.0"]


# ---- argv builders ------------------------------------------------------------------------------
def prep(*args: str) -> Callable[[dict], list[str]]:
    def argv(env: dict) -> list[str]:
        given = [a.format(**env) for a in args]
        sizes = ["--demo_train_size", "30", "--demo_validation_size", "5", "--demo_test_size", "5"]
        out = [] if "--output_root" in given else ["--output_root", str(env["out"])]
        return ["prepare", *sizes, "--tokenizer", str(env["base"]), *out, *given]
    return argv


def files(split_files: str) -> Callable[[dict], list[str]]:
    return prep("--source", "files", "--files", split_files)


def fit(*args: str) -> Callable[[dict], list[str]]:
    def argv(env: dict) -> list[str]:
        base = _fit_paths(env["base"], env["prepared"], env["out"])
        return ["fit", "--config", str(FIT_CONFIG), *base, "--trainer.max_steps", "1",
                *(a.format(**env) for a in args)]
    return argv


def evaluate(*models: str, extra: tuple[str, ...] = ()) -> Callable[[dict], list[str]]:
    def argv(env: dict) -> list[str]:
        given = [a.format(**env) for a in extra]
        defaults = {"--prepared": str(env["prepared"]), "--out": str(env["out"])}
        fixed = [x for k, v in defaults.items() if k not in given for x in (k, v)]
        ms = [x for m in models for x in ("--model", m.format(**env))]
        return ["evaluate", "--task", "t", *fixed, *ms, "--limit", "2", "--max-new-tokens", "4", *given]
    return argv


def registry(command: str, *args: str) -> Callable[[dict], list[str]]:
    def argv(env: dict) -> list[str]:
        uri = f"sqlite:///{env['out']}/mlflow.db"
        return [command, *(a.format(**env) for a in args), "--tracking-uri", uri, "--retries", "0"]
    return argv


def run(*args: str) -> Callable[[dict], list[str]]:
    def argv(env: dict) -> list[str]:
        given = [a.format(**env) for a in args]
        home = [] if "--home" in given else ["--home", str(env["out"])]
        return ["run", *home, "--no-full", *given]
    return argv


def out_parent(env: dict) -> list[Path]:
    return [env["out"], env["file"]]


def trained(env: dict) -> list[Path]:
    return [env["out"], env["trained"]]


# ---- API cases ----------------------------------------------------------------------------------
def api_target_modules(env: dict) -> None:
    LoraModel(load_base_model(env["base"]), LoraConfig(target_modules=["nothing_matches"]))


def api_nan_adapter(env: dict) -> None:
    LoraModel.from_pretrained(load_base_model(env["base"]), env["nan"])


def api_other_base(env: dict) -> None:
    LoraModel.from_pretrained(load_base_model(env["other_base"]), env["adapter"])


def api_prepare_under_file(env: dict) -> None:
    prepare(DataConfig(demo_train_size=30, output_root=str(env["file"] / "data")))


def api_evaluate_under_file(env: dict) -> None:
    from lora_module.evaluation.evaluate import evaluate_models
    from lora_module.evaluation.generation import ModelSpec

    evaluate_models(env["prepared"], [ModelSpec("base", "base", str(env["base"]))], env["file"] / "x", "t")


CASES = [
    # data: lora-pipeline prepare
    Case("prepare-bare-json-array", files("{{train: {files}/bare.json}}"),
         ("bare.json", "one object per row")),
    Case("prepare-jsonl-of-strings", files("{{train: {files}/strings.jsonl}}"), ("strings.jsonl", "object")),
    Case("prepare-missing-file", files("{{train: {files}/missing.jsonl}}"),
         ("file not found", "missing.jsonl")),
    Case("prepare-unsupported-extension", files("{{train: {files}/notes.txt}}"), ("notes.txt", ".jsonl")),
    Case("prepare-unknown-split", files("{{train: {files}/bare.json, dev: {files}/bare.json}}"),
         ("unknown split 'dev'", "valid splits")),
    Case("prepare-wrong-columns", files("{{train: {files}/wrong_columns.jsonl}}"),
         ("no column 'dialogue'", "its columns are"), caches=True),
    Case("prepare-broken-json-line", files("{{train: {files}/broken.jsonl}}"), ("broken.jsonl", "line 2"),
         caches=True),
    Case("prepare-empty-file", files("{{train: {files}/empty.jsonl}}"), ("empty.jsonl", "no rows")),
    Case("prepare-missing-tokenizer", prep("--tokenizer", "{root}/no_tokenizer"),
         ("tokenizer=", "does not exist", "save_pretrained", "'demo'")),
    Case("prepare-tokenizer-is-file", prep("--tokenizer", "{file}"), ("tokenizer=", "is a file")),
    Case("prepare-output-root-under-file", prep("--output_root", "{file}/data"),
         ("output_root:", "under the regular file", "folder path"), out_parent),
    Case("prepare-output-root-is-file", prep("--output_root", "{file}"),
         ("output_root:", "is a regular file"), out_parent),
    Case("prepare-unknown-source", prep("--source", "web"), ("source must be one of", "'files'")),
    Case("prepare-missing-config", prep("--config", "{root}/nope.yaml"),
         ("data config file not found", "nope.yaml")),
    Case("prepare-config-unknown-key", prep("--config", "{files}/unknown_key.yaml"),
         ("unknown data config keys ['colour']", "valid keys")),
    Case("prepare-short-source-length", prep("--max_source_length", "2"), ("max_source_length", ">= 4")),
    Case("prepare-usage-unknown-option", prep("--no-such-option", "1"),
         ("unrecognized arguments: --no-such-option", "--help")),
    Case("prepare-usage-bad-yaml-value", prep("--demo_train_size", "[1, 2"),
         ("lora-pipeline prepare", "--demo_train_size", "not a YAML value")),
    Case("prepare-template-without-input", prep("--prompt_template", "Summarize: {{summary}}"),
         ("prompt_template", "{dialogue}")),
    # training: lora-pipeline fit
    Case("fit-unknown-key", fit("--model.bogus", "1"), ("unrecognized arguments: --model.bogus", "--help")),
    Case("fit-lora-r-zero", fit("--model.lora.r", "0"), ("model.lora", "r must be an integer >= 1")),
    Case("fit-finetune-literal", fit("--model.finetune", "wrong"), ("finetune", "wrong")),
    Case("fit-batch-size-zero", fit("--data.batch_size", "0"), ("data.batch_size must be >= 1",)),
    Case("fit-negative-learning-rate", fit("--model.learning_rate", "-1"),
         ("model.learning_rate must be > 0",)),
    Case("fit-missing-prepared-dir", fit("--data.prepared_dir", "{root}/no_data"),
         ("data.prepared_dir=", "no_data", "lora-pipeline prepare")),
    Case("fit-output-dir-under-file", fit("--model.output_dir", "{file}/run"),
         ("model.output_dir:", "under the regular file"), out_parent),
    Case("fit-target-modules-match-nothing", fit("--model.lora.target_modules", "[nothing]"),
         ("target_modules ['nothing']", "linear layers in this model")),
    Case("fit-missing-base", fit("--model.model_name_or_path", "{root}/no_base"),
         ("model.model_name_or_path", "does not exist", "Hub id")),
    Case("fit-truncated-base", fit("--model.model_name_or_path", "{cut_base}"),
         ("model.safetensors", "truncated or corrupt")),
    Case("fit-base-without-config", fit("--model.model_name_or_path", "{files}"), ("no config.json",)),
    Case("fit-missing-ckpt-file", fit("--ckpt_path", "{root}/nope.ckpt"), ("--ckpt_path", "does not exist")),
    Case("fit-ckpt-last-nothing-to-resume", fit("--ckpt_path", "last"), ("nothing to resume",)),
    Case("fit-ckpt-with-other-r", fit("--model.output_dir", "{trained}", "--model.lora.r", "2",
                                      "--ckpt_path", "last"), ("LoRA r=4", "model.lora.r=2"), trained),
    # evaluation: lora-pipeline evaluate
    Case("evaluate-out-under-file", evaluate("base={base}", extra=("--out", "{file}/eval")),
         ("--out:", "under the regular file"), out_parent),
    Case("evaluate-missing-prepared", evaluate("base={base}", extra=("--prepared", "{root}/no_data")),
         ("no_data", "does not exist")),
    Case("evaluate-unknown-split", evaluate("base={base}", extra=("--split", "dev")),
         ("split 'dev'", "available")),
    Case("evaluate-missing-adapter", evaluate("lora={root}/no_adapter"), ("no_adapter", "does not exist")),
    Case("evaluate-nan-adapter", evaluate("lora={nan}"), ("NaN", "adapter_model.safetensors", "retrain")),
    Case("evaluate-truncated-adapter", evaluate("lora={cut_adapter}"),
         ("adapter_model.safetensors", "truncated or corrupt")),
    Case("evaluate-adapter-on-other-base", evaluate("lora={adapter}", extra=("--lora-base", "{other_base}")),
         ("fingerprint", "--lora-base", "--force")),
    Case("evaluate-missing-base", evaluate("base={root}/no_base"), ("no_base", "does not exist")),
    Case("evaluate-truncated-base", evaluate("base={cut_base}"),
         ("model.safetensors", "truncated or corrupt")),
    Case("evaluate-second-model-missing", evaluate("base={base}", "full={root}/no_full"),
         ("no_full", "does not exist")),
    Case("evaluate-unknown-kind", evaluate("mine={adapter}"), ("cannot tell the kind of 'mine'", "base")),
    Case("evaluate-usage-missing-value", evaluate("base={base}", extra=("--limit",)),
         ("lora-pipeline evaluate", "--limit", "expected one argument", "--help")),
    Case("evaluate-usage-bad-int", evaluate("base={base}", extra=("--batch-size", "eight")),
         ("--batch-size", "invalid int value: 'eight'")),
    Case("evaluate-zero-beams", evaluate("base={base}", extra=("--num-beams", "0")), ("num_beams", ">= 1")),
    # registry: lora-pipeline register / predict
    Case("register-missing-adapter", registry("register", "summary", "{root}/no_adapter"), ("no_adapter",)),
    Case("register-quote-in-model-name",
         registry("register", "summary", "{adapter}", "--model-name", "o'brien"),
         ("registered model name", "o'brien")),
    Case("register-missing-report",
         registry("register", "summary", "{adapter}", "--report", "{root}/no.json"), ("no.json",)),
    Case("predict-nothing-to-predict", registry("predict", "summary"), ("nothing to predict", "--text")),
    Case("predict-missing-file", registry("predict", "summary", "--file", "{root}/no_prompts.txt"),
         ("--file", "no_prompts.txt", "does not exist")),
    # flows: lora-pipeline run
    Case("run-unknown-task", run("--task", "nosuchtask"), ("unknown task 'nosuchtask'", "known tasks")),
    Case("run-negative-eval-limit", run("--task", "summary", "--eval-limit", "-3"),
         ("eval_limit must be an integer >= 1", "-3")),
    Case("run-home-under-file", run("--home", "{file}/home", "--task", "summary"),
         ("pipeline home", "under the regular file"), out_parent),
    Case("run-zero-concurrency", run("--task", "summary", "--max-concurrency", "0"),
         ("--max-concurrency", ">= 1")),
    Case("run-missing-spec-file", run("--task", "{root}/no_task.yaml"), ("task spec file", "no_task.yaml")),
    Case("run-spec-bad-training-override", run("--task", "{files}/bad_override.yaml"),
         ("badspec", "unrecognized arguments: --model.bogus")),
    Case("run-spec-unknown-key", run("--task", "{files}/unknown_spec_key.yaml"),
         ("unknown task spec keys ['colour']", "valid keys")),
    Case("list-home-under-file", lambda env: ["list"],
         ("pipeline home", "$LORA_PIPELINE_HOME", "regular file"), out_parent, home="{file}/home"),
    Case("demo-home-under-file", lambda env: ["demo", "--home", f"{env['file']}/home"],
         ("pipeline home", "under the regular file"), out_parent),
    # the core API
    Case("api-target-modules-match-nothing", api_target_modules,
         ("nothing_matches", "linear layers in this model")),
    Case("api-nan-adapter", api_nan_adapter, ("NaN", "retrain")),
    Case("api-adapter-on-other-base", api_other_base, ("fingerprint", "force=True")),
    Case("api-missing-base", lambda env: load_base_model(env["root"] / "no_base"),
         ("no_base", "does not exist")),
    Case("api-truncated-base", lambda env: load_base_model(env["cut_base"]),
         ("model.safetensors", "truncated")),
    Case("api-lora-r-zero", lambda env: LoraConfig(r=0), ("r must be an integer >= 1",)),
    Case("api-prepare-under-file", api_prepare_under_file, ("output_root:", "under the regular file"),
         out_parent),
    Case("api-evaluate-under-file", api_evaluate_under_file, ("out_dir:", "under the regular file"),
         out_parent),
]


def snapshot(paths: list[Path], folders: bool = True) -> dict[str, tuple[int, int] | None]:
    """Every file (size, mtime) and folder under `paths`, input caches left out (`folders=False`: files)."""
    seen: dict[str, tuple[int, int] | None] = {}
    for top in paths:
        items = [top, *top.rglob("*")] if top.is_dir() else [top] if top.exists() else []
        for p in items:
            if any(part in CACHES or part.startswith("demo-corpus-") for part in p.relative_to(top).parts):
                continue
            if p.is_file() or folders:
                seen[str(p)] = (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
    return seen


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_clear_line_and_writes_nothing(case: Case, env, tmp_path, capfd, monkeypatch):
    env = {**env, "out": tmp_path / "out", "tmp": tmp_path}
    monkeypatch.setenv("LORA_PIPELINE_HOME", case.home.format(**env))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = snapshot(case.watch(env) + [tmp_path], folders=not case.caches)
    if case.id.startswith("api-"):
        with pytest.raises(PipelineError) as raised:
            case.run(env)
        message = str(raised.value)
        assert "\n" not in message, message
    else:
        try:
            status = lora_pipeline(case.run(env))
        except SystemExit as e:  # argparse / the Lightning CLI parser exit by themselves
            status = e.code
        out, err = capfd.readouterr()
        assert "Traceback" not in out + err, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert status == 2 and len(errors) == 1, (status, err[-3000:])
        assert "usage:" not in err, err[-3000:]
        message = errors[0]
    missing = [w for w in case.words if w not in message]
    assert not missing, f"{missing} not in: {message}"
    assert snapshot(case.watch(env) + [tmp_path], folders=not case.caches) == before, "it wrote files"


def test_the_table_is_big_enough():
    stages = {c.id.split("-")[0] for c in CASES}
    assert len(CASES) >= 40 and stages >= {"prepare", "fit", "evaluate", "register", "predict", "run", "api"}
