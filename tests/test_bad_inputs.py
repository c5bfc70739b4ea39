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

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny_t5
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

import lora_pipeline.flows.pipeline  # noqa: F401  (why: see below)
from lora_module import LoraConfig, LoraModel, load_base_model
from lora_module.errors import PipelineError
from lora_pipeline.data import DataConfig, prepare
from lora_pipeline.flows.cli import main as lora_pipeline

# Importing the flows sets up Prefect's console log handler on the root logger, bound to the stderr of the
# moment: imported at collection, that is pytest's session-long stream. Imported first by a `run` case, it
# would be that case's captured stderr, closed after it, and every later Lightning log line a "Logging error".
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
    """The input was found bad only once read, or the fault came part-way: folders may remain (the datasets
    cache of what was read, a run's empty checkpoints/); no other file may."""
    needs: str = ""
    """"ro" or "full": the case writes into the read-only folder or onto the full disk of `mounts`."""
    patch: Callable[[pytest.MonkeyPatch, dict[str, Any]], None] | None = None
    """Sets up a fault the command meets part-way (a write that finds the disk full)."""
    marks: tuple[Any, ...] = ()


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
    _odd_files(files, spec)
    trained = root / "trained_r8"  # a checkpoint to resume with another r
    rc = lora_pipeline(["fit", "--config", str(FIT_CONFIG), *_fit_paths(tiny_t5_dir, prepared, trained),
                        "--trainer.max_epochs", "-1", "--trainer.max_steps", "1"])
    assert rc == 0 and (trained / "checkpoints" / "last.ckpt").is_file()
    checkpoint = (trained / "checkpoints" / "last.ckpt").read_bytes()
    (files / "cut.ckpt").write_bytes(checkpoint[: len(checkpoint) // 2])
    return {"root": root, "base": tiny_t5_dir, "prepared": prepared, "adapter": adapter, "nan": nan_adapter,
            "cut_adapter": cut_adapter, "other_base": other_base, "cut_base": cut_base, "files": files,
            "file": root / "a_file", "trained": trained}


@pytest.fixture(scope="module")
def mounts(tmp_path_factory) -> Any:
    """{"ro": a read-only folder, "full": a folder on a full disk}: tiny tmpfs mounts (read-only; filled to
    the last byte), so the file system refuses as a real one would. Mounting needs root; without it the
    read-only folder is one without write permission and "full" is None; where root cannot mount, both are
    None (their cases skip, saying why)."""
    root = tmp_path_factory.mktemp("mounts")
    ro, full = root / "ro", root / "full"
    ro.mkdir()
    full.mkdir()
    mounted = []
    try:
        for folder, options in ((ro, "ro,size=64k"), (full, "size=64k")):
            command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]
            if os.geteuid() == 0 and subprocess.run(command, capture_output=True).returncode == 0:
                mounted.append(folder)
        read_only = ro in mounted or os.geteuid() != 0  # root writes into a folder without permissions
        if ro not in mounted:
            ro.chmod(0o555)
        if full in mounted:
            _fill(full / "filler")
        yield {"ro": ro if read_only else None, "full": full if full in mounted else None}
    finally:
        for folder in mounted:
            subprocess.run(["umount", str(folder)], check=True)
        ro.chmod(0o755)


def _fill(path: Path) -> None:
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e


def _odd_files(files: Path, spec: dict[str, Any]) -> None:
    """Things given where a file is expected: a symlink loop, a folder, a FIFO; and files that are not
    UTF-8, empty, or hold a NaN or a string where a boolean belongs."""
    for name in ("loop.yaml", "loop.ckpt", "loop_dir", "loop.jsonl"):
        (files / name).symlink_to(files / name)
    for name in ("dir.yaml", "dir.ckpt", "dir.jsonl"):
        (files / name).mkdir()
    for name in ("fifo.yaml", "fifo.ckpt", "fifo.jsonl"):
        os.mkfifo(files / name)
    (files / "latin1.yaml").write_bytes("name: café\n".encode("latin-1"))
    (files / "empty.yaml").write_text("")
    (files / "comments.yaml").write_text("# all settings left out\n")
    (files / "string_bool.yaml").write_text('name: x\ngroup_test_references: "no"\n')
    (files / "nan_size.yaml").write_text("name: x\nvalidation_size: .nan\n")
    (files / "notes.ckpt").write_text("not a checkpoint\n")
    (files / "empty.ckpt").write_bytes(b"")
    (files / "string_bool_spec.yaml").write_text(json.dumps(
        {**spec, "train_overrides": [], "data_overrides": {"group_test_references": "no"}}))


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
    Case("prepare-data-file-is-a-folder", files("{{train: {files}/dir.jsonl}}"),
         ("dir.jsonl", "is a folder")),
    Case("prepare-data-file-is-a-fifo", files("{{train: {files}/fifo.jsonl}}"), ("fifo.jsonl", "FIFO")),
    Case("prepare-data-file-symlink-loop", files("{{train: {files}/loop.jsonl}}"),
         ("loop.jsonl", "symlink loop")),
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
    Case("run-bogus-tracking-uri", run("--task", "summary", "--tracking-uri", "bogus://x"),
         ("scheme 'bogus'", "sqlite://", "http://")),
    Case("run-tracking-uri-credentials-masked", run("--task", "summary", "--tracking-uri", "ftp://al:PW@h/x"),
         ("scheme 'ftp'", "ftp://***@h/x")),
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


# ---- round two (#27 item 7): file system faults, odd files, NaN/zero settings, strings for booleans ----
def stage(command: str, *args: str) -> Callable[[dict], list[str]]:
    """`lora-pipeline validate|test ...` with the fit paths (no training settings needed)."""
    def argv(env: dict) -> list[str]:
        base = _fit_paths(env["base"], env["prepared"], env["out"])
        return [command, "--config", str(FIT_CONFIG), *base, *(a.format(**env) for a in args)]
    return argv


def cmd(*args: str) -> Callable[[dict], list[str]]:
    return lambda env: [a.format(**env) for a in args]


def no_space(monkeypatch: pytest.MonkeyPatch, what: str, target: Any, name: str) -> None:
    """`target.name` raises ENOSPC as a disk that fills up part-way through a stage would."""
    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what)
    monkeypatch.setattr(target, name, full)


def full_while_saving_data(monkeypatch: pytest.MonkeyPatch, env: dict) -> None:
    import datasets

    no_space(monkeypatch, str(env["out"] / "dataset"), datasets.DatasetDict, "save_to_disk")


def full_while_saving_checkpoint(monkeypatch: pytest.MonkeyPatch, env: dict) -> None:
    no_space(monkeypatch, str(env["out"] / "checkpoints" / "last.ckpt"), torch, "save")


def full_while_writing_report(monkeypatch: pytest.MonkeyPatch, env: dict) -> None:
    import lora_module.evaluation.evaluate as evaluation

    no_space(monkeypatch, str(env["out"] / "base.eval.json"), evaluation, "write_json_atomic")


def api_rank_beyond_width(env: dict) -> None:
    LoraModel(load_base_model(env["base"]), LoraConfig(r=64, target_modules=["q", "v"]))


def api_data_config(**fields: Any) -> Callable[[dict], Any]:
    return lambda env: DataConfig(**fields)


def api_read_yaml(name: str) -> Callable[[dict], Any]:
    from lora_module.user_files import read_yaml_file

    return lambda env: read_yaml_file(env["files"] / name, "config file", PipelineError)


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(),
                            reason="a CUDA GPU is present: the case needs a machine without one")
WRITABLE = "choose a writable folder"
FULL = "no space left on device"
LOOP = "symlink loop"

CASES += [
    # a read-only output folder (a read-only mount; without root, a folder without write permission)
    Case("prepare-output-root-read-only", prep("--output_root", "{ro}/data"), ("output_root:", WRITABLE),
         needs="ro"),
    Case("prepare-output-root-is-read-only", prep("--output_root", "{ro}"), ("output_root:", WRITABLE),
         needs="ro"),
    Case("fit-output-dir-read-only", fit("--model.output_dir", "{ro}/run"), ("model.output_dir:", WRITABLE),
         needs="ro"),
    Case("evaluate-out-read-only", evaluate("base={base}", extra=("--out", "{ro}/eval")), ("--out:",
         WRITABLE),
         needs="ro"),
    Case("run-home-read-only", run("--home", "{ro}/home", "--task", "summary"), ("pipeline home", WRITABLE),
         needs="ro"),
    Case("demo-corpus-out-read-only", cmd("demo-corpus", "--out", "{ro}/corpus", "--n", "3"), ("--out:",
         WRITABLE),
         needs="ro"),
    Case("demo-base-out-read-only", cmd("demo-base", "{ro}/base", "--steps", "1"), ("OUT_DIR", WRITABLE),
         needs="ro"),
    Case("api-prepare-read-only", lambda env: prepare(DataConfig(demo_train_size=30,
         output_root=str(env["ro"]))),
         ("output_root:", WRITABLE), needs="ro"),
    # a full disk: refused before any work; or met part-way, one line naming the path
    Case("prepare-output-root-full-disk", prep("--output_root", "{full}/data"), ("output_root:", FULL),
         needs="full"),
    Case("fit-output-dir-full-disk", fit("--model.output_dir", "{full}/run"), ("model.output_dir:", FULL),
         needs="full"),
    Case("evaluate-out-full-disk", evaluate("base={base}", extra=("--out", "{full}/eval")), ("--out:", FULL),
         needs="full"),
    Case("run-home-full-disk", run("--home", "{full}/home", "--task", "summary"), ("pipeline home", FULL),
         needs="full"),
    Case("demo-corpus-out-full-disk", cmd("demo-corpus", "--out", "{full}/corpus", "--n", "3"), ("--out:",
         FULL),
         needs="full"),
    Case("prepare-disk-fills-while-saving", prep(), ("dataset", FULL), patch=full_while_saving_data,
         caches=True),
    Case("fit-disk-fills-while-checkpointing", fit("--trainer.max_epochs", "-1"), ("last.ckpt", FULL),
         patch=full_while_saving_checkpoint, caches=True),
    Case("evaluate-disk-fills-while-writing", evaluate("base={base}"), ("base.eval.json", FULL),
         patch=full_while_writing_report, caches=True),
    # a symlink loop where a folder to write is expected
    Case("prepare-output-root-symlink-loop", prep("--output_root", "{files}/loop_dir/data"),
         ("output_root:", LOOP),
         watch=out_parent),
    Case("fit-output-dir-symlink-loop", fit("--model.output_dir", "{files}/loop_dir"), ("model.output_dir:",
         LOOP),
         watch=out_parent),
    Case("evaluate-out-symlink-loop", evaluate("base={base}", extra=("--out", "{files}/loop_dir")),
         ("--out:", LOOP),
         watch=out_parent),
    Case("run-home-symlink-loop", run("--home", "{files}/loop_dir", "--task", "summary"), ("loop_dir", LOOP),
         watch=out_parent),
    Case("demo-corpus-out-symlink-loop", cmd("demo-corpus", "--out", "{files}/loop_dir"), ("--out:", LOOP)),
    # a symlink loop, a folder, a FIFO, non-UTF-8, empty: where a config file is expected
    Case("prepare-config-symlink-loop", prep("--config", "{files}/loop.yaml"), ("loop.yaml", LOOP)),
    Case("prepare-config-is-a-folder", prep("--config", "{files}/dir.yaml"), ("dir.yaml", "is a folder")),
    Case("prepare-config-is-a-fifo", prep("--config", "{files}/fifo.yaml"), ("fifo.yaml", "FIFO")),
    Case("prepare-config-not-utf8", prep("--config", "{files}/latin1.yaml"), ("latin1.yaml", "not UTF-8")),
    Case("prepare-config-empty", prep("--config", "{files}/empty.yaml"), ("empty.yaml", "is empty")),
    Case("prepare-config-only-comments", prep("--config", "{files}/comments.yaml"), ("comments.yaml",
         "is empty")),
    Case("fit-config-symlink-loop", fit("--config", "{files}/loop.yaml"), ("--config", LOOP)),
    Case("fit-config-is-a-folder", fit("--config", "{files}/dir.yaml"), ("--config", "is a folder")),
    Case("fit-config-is-a-fifo", fit("--config", "{files}/fifo.yaml"), ("--config", "FIFO")),
    Case("fit-config-not-utf8", fit("--config", "{files}/latin1.yaml"), ("latin1.yaml", "not UTF-8")),
    Case("fit-config-empty", fit("--config", "{files}/empty.yaml"), ("empty.yaml", "is empty")),
    Case("run-spec-symlink-loop", run("--task", "{files}/loop.yaml"), ("task spec file", LOOP)),
    Case("run-spec-is-a-folder", run("--task", "{files}/dir.yaml"), ("task spec file", "is a folder")),
    Case("run-spec-is-a-fifo", run("--task", "{files}/fifo.yaml"), ("task spec file", "FIFO")),
    Case("run-spec-not-utf8", run("--task", "{files}/latin1.yaml"), ("latin1.yaml", "not UTF-8")),
    Case("run-spec-empty", run("--task", "{files}/empty.yaml"), ("empty.yaml", "is empty")),
    # NaN, infinity and zero settings
    Case("prepare-validation-size-nan", prep("--validation_size", ".nan"), ("validation_size", "nan")),
    Case("prepare-test-size-inf", prep("--test_size", ".inf"), ("test_size", "inf")),
    Case("prepare-config-validation-size-nan", prep("--config", "{files}/nan_size.yaml"),
         ("nan_size.yaml", "validation_size", "nan")),
    Case("fit-accumulate-grad-batches-zero", fit("--trainer.accumulate_grad_batches", "0"),
         ("trainer.accumulate_grad_batches", ">= 1")),
    Case("fit-max-steps-zero", fit("--trainer.max_steps", "0"), ("trainer.max_steps", "0 trains nothing")),
    Case("fit-max-epochs-zero", fit("--trainer.max_epochs", "0"), ("trainer.max_epochs", "0 trains nothing")),
    Case("fit-limit-train-batches-zero", fit("--trainer.limit_train_batches", "0"),
         ("trainer.limit_train_batches", "> 0")),
    Case("fit-check-val-every-zero", fit("--trainer.check_val_every_n_epoch", "0"),
         ("trainer.check_val_every_n_epoch", ">= 1")),
    Case("fit-adam-epsilon-negative", fit("--model.adam_epsilon", "-1"), ("model.adam_epsilon must be > 0",)),
    Case("fit-adam-epsilon-zero", fit("--model.adam_epsilon", "0"), ("model.adam_epsilon must be > 0",)),
    Case("fit-weight-decay-negative", fit("--model.weight_decay", "-0.1"),
         ("model.weight_decay must be >= 0",)),
    Case("fit-learning-rate-nan", fit("--model.learning_rate", ".nan"), ("model.learning_rate", "nan")),
    Case("fit-learning-rate-inf", fit("--model.learning_rate", ".inf"), ("model.learning_rate", "finite")),
    Case("fit-weight-decay-nan", fit("--model.weight_decay", ".nan"), ("model.weight_decay", "finite")),
    Case("fit-gradient-clip-nan", fit("--trainer.gradient_clip_val", ".nan"), ("trainer.gradient_clip_val",
         "finite")),
    Case("fit-lora-alpha-inf", fit("--model.lora.lora_alpha", ".inf"), ("lora_alpha", "finite")),
    Case("fit-lora-dropout-nan", fit("--model.lora.lora_dropout", ".nan"), ("lora_dropout", "0 <= p < 1")),
    Case("fit-warmup-ratio-nan", fit("--model.warmup_ratio", ".nan"), ("model.warmup_ratio", "[0, 1)")),
    # strings where a boolean belongs
    Case("prepare-config-string-bool", prep("--config", "{files}/string_bool.yaml"),
         ("group_test_references must be true or false", "'no'")),
    Case("prepare-option-string-bool", prep("--group_test_references", '"yes"'),
         ("group_test_references must be true or false", "'yes'")),
    Case("prepare-option-number-bool", prep("--group_test_references", "1"),
         ("group_test_references must be true or false", "1")),
    Case("run-spec-string-bool-override", run("--task", "{files}/string_bool_spec.yaml"),
         ("badspec", "group_test_references must be true or false")),
    # a rank beyond the width of the layers it targets (the tiny T5's projections are 32 wide)
    Case("fit-lora-r-beyond-width", fit("--model.lora.r", "100000"), ("r=100000", "width 32", "use r <= 32")),
    Case("fit-rank-pattern-beyond-width", fit("--model.lora.rank_pattern", "{{v: 64}}"),
         ("r=64", ".v's width 32")),
    Case("api-lora-r-beyond-width", api_rank_beyond_width, ("r=64", "width 32")),
    # --ckpt_path that is not a checkpoint
    Case("fit-ckpt-not-a-checkpoint", fit("--ckpt_path", "{files}/notes.ckpt"), ("notes.ckpt",
         "is not a checkpoint")),
    Case("fit-ckpt-truncated", fit("--ckpt_path", "{files}/cut.ckpt"), ("cut.ckpt", "truncated")),
    Case("fit-ckpt-empty-file", fit("--ckpt_path", "{files}/empty.ckpt"), ("empty.ckpt",
         "is not a checkpoint")),
    Case("fit-ckpt-is-a-folder", fit("--ckpt_path", "{files}/dir.ckpt"), ("dir.ckpt", "is a folder")),
    Case("fit-ckpt-is-a-fifo", fit("--ckpt_path", "{files}/fifo.ckpt"), ("fifo.ckpt", "FIFO")),
    Case("fit-ckpt-symlink-loop", fit("--ckpt_path", "{files}/loop.ckpt"), ("loop.ckpt", LOOP)),
    Case("validate-ckpt-not-a-checkpoint", stage("validate", "--ckpt_path", "{files}/notes.ckpt"),
         ("notes.ckpt", "is not a checkpoint")),
    Case("test-ckpt-is-a-folder", stage("test", "--ckpt_path", "{files}/dir.ckpt"), ("dir.ckpt",
         "is a folder")),
    # a GPU asked for where there is none
    Case("fit-accelerator-cuda", fit("--trainer.accelerator", "cuda"), ("trainer.accelerator='cuda'",
         "no usable"),
         marks=(NO_GPU,)),
    Case("fit-accelerator-gpu", fit("--trainer.accelerator", "gpu"), ("trainer.accelerator='gpu'", "'cpu'"),
         marks=(NO_GPU,)),
    # serve-model's options, checked by its parser before MLflow is asked anything
    Case("serve-model-port-too-big", cmd("serve-model", "models:/x@champion", "--port", "99999"),
         ("--port", "'99999' is not a TCP port", "1 to 65535")),
    Case("serve-model-port-negative", cmd("serve-model", "models:/x@champion", "--port", "-1"),
         ("--port", "1 to 65535")),
    Case("serve-model-port-not-a-number", cmd("serve-model", "models:/x@champion", "--port", "http"),
         ("--port", "'http' is not a TCP port")),
    Case("serve-model-workers-zero", cmd("serve-model", "models:/x@champion", "--workers", "0"),
         ("--workers", "integer >= 1")),
    Case("serve-model-threads-negative", cmd("serve-model", "models:/x@champion", "--threads", "-2"),
         ("--threads", "integer >= 0")),
    # demo-corpus and demo-base arguments
    Case("demo-corpus-n-zero", cmd("demo-corpus", "--out", "{out}", "--n", "0"), ("--n 0", "--n >= 1")),
    Case("demo-corpus-n-negative", cmd("demo-corpus", "--out", "{out}", "--n", "-5"),
         ("corpus size n", "-5")),
    Case("demo-corpus-n-not-a-number", cmd("demo-corpus", "--out", "{out}", "--n", "many"),
         ("--n", "invalid int value: 'many'")),
    Case("demo-corpus-out-missing", cmd("demo-corpus", "--n", "3"),
         ("the following arguments are required: --out",)),
    Case("demo-corpus-out-is-file", cmd("demo-corpus", "--out", "{file}"), ("--out:", "is a regular file"),
         out_parent),
    Case("demo-base-out-is-file", cmd("demo-base", "{file}", "--steps", "1"), ("OUT_DIR",
         "is a regular file"),
         out_parent),
    Case("demo-base-out-under-file", cmd("demo-base", "{file}/base", "--steps", "1"),
         ("OUT_DIR", "under the regular file"), out_parent),
    Case("demo-base-steps-zero", cmd("demo-base", "{out}", "--steps", "0"),
         ("steps must be a positive integer",)),
    Case("demo-base-corpus-size-negative", cmd("demo-base", "{out}", "--corpus-size", "-1"),
         ("corpus_size must be a positive integer", "-1")),
    Case("demo-base-instruction-steps-negative", cmd("demo-base", "{out}", "--instruction-steps", "-1"),
         ("instruction_steps must be an integer >= 0",)),
    Case("demo-base-seed-not-a-number", cmd("demo-base", "{out}", "--seed", "x"), ("--seed",
         "invalid int value")),
    Case("demo-base-out-dir-missing", cmd("demo-base"), ("the following arguments are required: out_dir",)),
    # run: bad values past the up-front check are still refused before Prefect starts
    Case("run-base-model-missing", run("--task", "summary", "--base-model", "{root}/nonexistent"),
         ("base_model", "nonexistent", "does not exist")),
    Case("run-base-model-is-a-file", run("--task", "summary", "--base-model", "{file}"),
         ("base_model", "no config.json")),
    # the library, called directly
    Case("api-alpha-pattern-inf", lambda env: LoraConfig(alpha_pattern={"q": float("inf")}),
         ("alpha_pattern['q']", "a number > 0", "inf")),
    Case("api-lora-alpha-nan", lambda env: LoraConfig(lora_alpha=float("nan")), ("lora_alpha", "finite")),
    Case("api-data-config-nan", api_data_config(validation_size=float("nan")), ("validation_size", "nan")),
    Case("api-data-config-string-bool", api_data_config(group_test_references="no"),
         ("group_test_references must be true or false",)),
    Case("api-read-empty-yaml", api_read_yaml("empty.yaml"), ("empty.yaml", "is empty")),
    Case("api-read-yaml-fifo", api_read_yaml("fifo.yaml"), ("fifo.yaml", "FIFO")),
    Case("api-read-missing-yaml", api_read_yaml("missing.yaml"), ("missing.yaml", "not found")),
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


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_gives_one_clear_line_and_writes_nothing(case: Case, env, mounts, tmp_path, capfd,
                                                           monkeypatch):
    env = {**env, **mounts, "out": tmp_path / "out", "tmp": tmp_path}
    if case.needs and env[case.needs] is None:
        what = "full disk" if case.needs == "full" else "read-only folder"
        pytest.skip(f"the {what} is a tmpfs mount, and mounting failed here (it needs root, or CAP_SYS_ADMIN "
                    "in a container)")
    if case.patch is not None:
        case.patch(monkeypatch, env)
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
    assert len(CASES) >= 160 and stages >= {"prepare", "fit", "evaluate", "register", "predict", "run", "api",
                                            "demo", "serve", "validate", "test"}


def test_prefect_gets_a_longer_start_up_timeout_unless_the_user_set_one(monkeypatch):
    from lora_pipeline.flows.cli import STARTUP_TIMEOUT_ENV, prefect_defaults

    monkeypatch.delenv(STARTUP_TIMEOUT_ENV, raising=False)
    prefect_defaults()
    assert int(os.environ[STARTUP_TIMEOUT_ENV]) >= 120  # Prefect's own default, 20 s, is too short under load
    monkeypatch.setenv(STARTUP_TIMEOUT_ENV, "7")
    prefect_defaults()
    assert os.environ[STARTUP_TIMEOUT_ENV] == "7"


@pytest.mark.slow  # a process of its own that imports Prefect, torch and Lightning: 10-20 s
def test_prefect_server_that_does_not_start_is_one_line(tmp_path):
    """`run` whose temporary Prefect server does not come up in time (a timeout of 0 s stands in for a
    machine too loaded to start it): one `error:` line saying what to do, not Prefect's 30-line traceback.
    Its own process: Prefect reads the setting when imported."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update({"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "0", "HF_HUB_OFFLINE": "1",
                "PREFECT_HOME": str(tmp_path / "prefect"), "DO_NOT_TRACK": "1"})
    code = "import sys; from lora_pipeline.flows.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = ["run", "--home", str(tmp_path / "home"), "--task", "summary", "--no-full"]
    done = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True,
                          timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "did not start within 0 s" in errors[0] and "PREFECT_API_URL" in errors[0], errors[0]
    assert not (tmp_path / "home" / "runs").exists()
