"""Every `lora-pipeline ...` hint in the docs and config comments names a real command and real options.

    .venv/bin/pytest tests/test_doc_hints.py -q

Where hints are read: README.md and deploy/README.md (fenced shell blocks, line by line with `\\`
continuations joined, and inline `code` spans), and the comments of every YAML file under deploy/.
What counts as a hint, and how it is checked against `lora-pipeline COMMAND --help` (the real
parsers, argparse and Lightning CLI alike):
- text after a `lora-pipeline` program name (`.venv/bin/lora-pipeline`, env assignments before it
  are fine): the next word must be a command and every `--option` one of that command's options;
- an inline span starting with a command name and more words (`register-multitask --tasks a b`: the
  README's command table leaves out the program name) is read the same way;
- an inline span or comment word that is a bare `--option`: it must be an option of some command
  (in a YAML comment, of a command that file's comments name).
Placeholders are skipped by rule: an all-capitals command or option (`COMMAND`, `--FIELD`). A dotted
Lightning option (`--trainer.logger.init_args.task`) is accepted when its first two parts are an
option, since the options of a class chosen at run time are listed only once the class is given.
Lines of other programs (`mlflow`, `prefect`, `pip`, `curl`, ...) are not checked.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from lora_pipeline.flows.cli import COMMANDS
from lora_pipeline.flows.cli import main as lora_pipeline

REPO = Path(__file__).resolve().parents[1]
MARKDOWN = ("README.md", "deploy/README.md")
PROGRAM = re.compile(r"(?:^|[\s/(=])lora-pipeline(?=\s|$)")
OPTION = re.compile(r"(?<![\w-])--[A-Za-z][\w.+-]*")
STOP = {"|", "||", "&&", ";", "&", ">", "2>&1"}
PLACEHOLDER = re.compile(r"--?[A-Z][A-Z_]*")
# A comment line or span that is another program's command line: its options are not ours.
OTHER_PROGRAM = re.compile(r"(?:\S*/)?(?:prefect|mlflow|pip|python3?|curl|uvicorn|docker|run\.sh)")


@dataclass(frozen=True)
class Hint:
    """One command line or option mention found in a file."""

    where: str
    command: str | None
    options: tuple[str, ...]


@functools.cache
def options_of(command: str) -> frozenset[str]:
    """The options `lora-pipeline COMMAND --help` lists (the option column only, not the help text)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        lora_pipeline([command, "--help"])
    assert e.value.code in (0, None), f"lora-pipeline {command} --help exited with {e.value.code}"
    found = {"--help"}
    for line in out.getvalue().splitlines():
        if line.lstrip().startswith("-"):
            found.update(OPTION.findall(line.strip().split("  ")[0]))
    return frozenset(found)


def all_options(commands) -> frozenset[str]:
    return frozenset().union(*(options_of(c) for c in commands))


def known(option: str, options: frozenset[str]) -> bool:
    """Whether `option` is listed, a dotted one also by its first two parts (module docstring)."""
    parts = option.split(".")
    return option in options or (len(parts) > 2 and ".".join(parts[:2]) in options)


def _words(text: str) -> list[str]:
    try:
        words = shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in prose: plain words are enough to find options
        words = text.split()
    out = []
    for word in words:
        if word in STOP:
            break
        out.append(word.strip("[](),"))
    return [w for w in out if w]


def _hint(where: str, words: list[str]) -> Hint | None:
    """A hint from the words after `lora-pipeline` (None: no command, e.g. `lora-pipeline --help`)."""
    if not words or words[0].startswith("-") or words[0].isupper():
        return None
    options = tuple(o for w in words[1:] for o in OPTION.findall(w.split("=")[0])[:1]
                    if w.startswith("--") and not PLACEHOLDER.fullmatch(o))
    return Hint(where, words[0], options)


def hints_in_text(where: str, text: str, kind: str) -> list[Hint]:
    """Hints of one line of a shell block (`kind` "shell"), an inline span ("inline") or a line of
    comment prose ("prose")."""
    match = PROGRAM.search(text)
    if match:
        return [h for h in [_hint(where, _words(text[match.end():]))] if h]
    words = _words(text)
    if kind == "shell" or not words or OTHER_PROGRAM.fullmatch(words[0]):
        return []
    if kind == "inline" and len(words) > 1 and words[0] in COMMANDS:
        return [h for h in [_hint(where, words)] if h]
    loose = [w for w in words if w.startswith("--") and not PLACEHOLDER.fullmatch(w.split("=")[0])]
    if loose and (kind == "prose" or words[0].startswith("--")):
        return [Hint(where, None, tuple(OPTION.findall(w.split("=")[0])[0] for w in loose))]
    return []


def markdown_hints(path: Path) -> list[Hint]:
    found: list[Hint] = []
    fence: str | None = None
    pending = ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        where = f"{path.relative_to(REPO)}:{number}"
        if line.lstrip().startswith("```"):
            fence = None if fence is not None else (line.strip()[3:] or "sh")
            continue
        if fence is not None:
            if fence in ("bash", "sh", "shell", "console"):
                pending += line.rstrip().removesuffix("\\") + " "
                if not line.rstrip().endswith("\\"):
                    found += hints_in_text(where, pending, "shell")
                    pending = ""
            continue
        for span in re.findall(r"`([^`]+)`", line):
            found += hints_in_text(where, span, "inline")
    return found


def yaml_hints(path: Path) -> tuple[list[Hint], set[str]]:
    """Hints of a YAML file's comments, and the commands they name (a bare option must be theirs)."""
    found: list[Hint] = []
    pending = ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        comment = line.split("#", 1)[1] if "#" in line and line.lstrip().startswith("#") else ""
        if not comment:
            continue
        pending += comment.rstrip().removesuffix("\\") + " "
        if comment.rstrip().endswith("\\"):
            continue
        where = f"{path.relative_to(REPO)}:{number}"
        spans = re.findall(r"`([^`]+)`", pending)
        outside = re.sub(r"`[^`]*`", " ", pending)
        for text in [*spans, outside]:
            found += hints_in_text(where, text, "inline" if text in spans else "prose")
        pending = ""
    return found, {h.command for h in found if h.command}


def problems(hints: list[Hint], commands_for_loose: set[str]) -> list[str]:
    """What is wrong with `hints`; a bare option is checked against `commands_for_loose`."""
    out = []
    for h in hints:
        if h.command is not None and h.command not in COMMANDS:
            out.append(f"{h.where}: no command {h.command!r}")
            continue
        if h.command is not None:
            out += [f"{h.where}: {h.command} has no option {o}" for o in h.options
                    if not known(o, options_of(h.command))]
        else:
            options = all_options(commands_for_loose)
            out += [f"{h.where}: none of {sorted(commands_for_loose)} has an option {o}" for o in h.options
                    if not known(o, options)]
    return out


def test_markdown_hints_are_real_commands_and_options():
    hints = [h for doc in MARKDOWN for h in markdown_hints(REPO / doc)]
    assert sum(h.command is not None for h in hints) >= 30  # the extraction finds the docs' commands
    used = {h.command for h in hints if h.command in COMMANDS}
    assert problems(hints, used) == []


def test_yaml_comment_hints_are_real_commands_and_options():
    files = sorted((REPO / "deploy").rglob("*.yaml"))
    bad, count = [], 0
    for path in files:
        hints, named = yaml_hints(path)
        count += len(hints)
        bad += problems(hints, named & set(COMMANDS) or set(COMMANDS))
    assert count >= 10 and bad == []


def test_the_checker_catches_stale_hints():
    """The rules above on the stale hints that were in the docs, and on fixed ones."""
    bad = hints_in_text("x", "lora-pipeline prepare --config c.yaml --set tokenizer=<folder>", "shell")
    assert problems(bad, set()) == ["x: prepare has no option --set"]
    assert problems(hints_in_text("x", "lora-pipeline serve-modle URI", "shell"), set()) == [
        "x: no command 'serve-modle'"]
    loose = hints_in_text("x", "pass its folder instead: --set tokenizer=<demo base folder>", "prose")
    assert problems(loose, {"prepare"}) == ["x: none of ['prepare'] has an option --set"]
    assert problems(hints_in_text("x", "fit ... --trainer.logger.init_args.task summary", "inline"),
                    set()) == []
    assert hints_in_text("x", "prepare [--FIELD VALUE ...]", "inline") == [Hint("x", "prepare", ())]
    assert hints_in_text("x", "mlflow models serve --env-manager local", "inline") == []


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"fit", "validate", "test", "predict-ckpt"}))
def test_every_command_help_has_a_description(command):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        lora_pipeline([command, "--help"])
    paragraphs = out.getvalue().split("\n\n")
    assert len(paragraphs) > 2 and not paragraphs[1].lstrip().startswith(("positional", "options")), (
        f"`lora-pipeline {command} --help` has no description:\n{out.getvalue()[:400]}")
