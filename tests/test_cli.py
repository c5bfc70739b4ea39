"""`lora-pipeline`: one console script, every command reachable, every option documented."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lora_pipeline.data.cli import field_docs
from lora_pipeline.data.config import DataConfig
from lora_pipeline.flows.cli import COMMANDS, main

SCRIPT = Path(sys.executable).parent / "lora-pipeline"
LIGHTNING = {"fit", "validate", "test", "predict-ckpt"}


def test_console_script_lists_every_command_without_heavy_imports():
    res = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    listed = [line.split()[0] for line in res.stdout.split("commands:\n")[1].splitlines() if line.strip()]
    assert listed == list(COMMANDS)
    probe = ("import sys; from lora_pipeline.flows.cli import main; main(['--help']); "
             "print(sorted(m for m in ('torch', 'lightning', 'mlflow', 'prefect') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_unknown_command_is_one_line_listing_valid_commands():
    res = subprocess.run([str(SCRIPT), "trian"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1
    assert "unknown command 'trian'" in res.stderr and ", ".join(COMMANDS) in res.stderr


def test_no_command_prints_usage_and_fails(capsys):
    assert main([]) == 2
    assert "commands:" in capsys.readouterr().out


def test_console_script_runs_a_stage(tmp_path):
    res = subprocess.run([str(SCRIPT), "demo-corpus", "--out", str(tmp_path), "--n", "3", "--seed", "1"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert len([json.loads(x) for x in (tmp_path / "demo.jsonl").read_text().splitlines()]) == 3


def _undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """Options whose help lacks a meaning, or a default where the option is optional."""
    bad = []
    formatter = parser.formatter_class(prog=parser.prog)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        # The help as printed: ArgumentDefaultsHelpFormatter appends "(default: ...)" here.
        text = formatter._get_help_string(action) if action.help else ""
        if not text:
            bad.append(f"{name}: no help")
        # argparse marks a `nargs="*"` positional required; it still has a default.
        optional = (action.option_strings and not action.required) or action.nargs in ("?", "*")
        if optional and not any(w in text.lower() for w in ("default", "none:", "if not given")):
            bad.append(f"{name}: no default in {text!r}")
    return bad


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_help_exits_0_and_documents_options(command, capsys, monkeypatch):
    parsers: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_known_args

    def recording(self, *args, **kwargs):
        parsers.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", recording)
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    if command in LIGHTNING:  # jsonargparse documents Lightning's fields from their docstrings
        assert "--model.lora" in out and "--data.prepared_dir" in out and "default: " in out
    else:
        parser = parsers[-1]  # the command's own parser (a subparser where the stage has several)
        assert parser.prog == f"lora-pipeline {command}"
        assert _undocumented(parser) == []


def test_prepare_help_documents_every_data_config_field(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    docs = field_docs(DataConfig)
    for f in dataclasses.fields(DataConfig):
        assert f"--{f.name}" in out
        assert " ".join(docs[f.name].split()[:4]) in out, f.name
    assert "(default: 3000)" in out and "(default: 'demo_summary')" in out


def test_field_docs_reads_every_field_docstring():
    assert set(field_docs(DataConfig)) == {f.name for f in dataclasses.fields(DataConfig)}
    assert field_docs(DataConfig)["demo_train_size"] == 'source="demo": generated training rows.'


# Commands whose parser is lora_module.errors.ArgumentParser: a usage error is one `error:` line, status 2.
ARGPARSE_USAGE_ERRORS = {
    "prepare": (["--demo_train_size", "[1, 2"], "not a YAML value"),
    "inspect": ([], "the following arguments are required: PATH_OR_HUB_NAME"),
    "demo-corpus": (["--n", "many"], "argument --n: invalid int value: 'many'"),
    "evaluate": (["--task", "t"], "the following arguments are required: --prepared, --model, --out"),
    "demo-base": (["--steps"], "argument --steps: expected one argument"),
    "run": (["--max-concurrency", "two"], "argument --max-concurrency: invalid int value: 'two'"),
    "demo": (["--bogus"], "unrecognized arguments: --bogus"),
    "sweep": (["--targets", "mlp"], "argument --targets: invalid choice: 'mlp'"),
    "serve": (["--bogus"], "unrecognized arguments: --bogus"),
}


@pytest.mark.parametrize("command", list(ARGPARSE_USAGE_ERRORS))
def test_usage_error_is_one_error_line_with_status_2(command, capsys):
    args, words = ARGPARSE_USAGE_ERRORS[command]
    assert main([command, *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith("error: lora-pipeline") and words in err, err
    assert f"(see lora-pipeline {command} --help)" in err or "(see lora-pipeline --help)" in err, err


def test_console_script_usage_errors_of_prepare_and_evaluate_are_one_line():
    for argv, words in ((["prepare", "--no-such-option"], "unrecognized arguments: --no-such-option"),
                        (["evaluate", "--prepared", "p", "--out", "o", "--task", "t", "--model"],
                         "argument --model: expected one argument")):
        res = subprocess.run([str(SCRIPT), *argv], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and res.stdout == "", res.stderr
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
        assert words in res.stderr and "usage:" not in res.stderr and "Traceback" not in res.stderr
