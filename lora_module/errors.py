"""Exceptions of the pipeline, and how a command reports them (kept torch-free so importing is cheap).

Every error a user can cause with bad input, or a stage that cannot go on, derives from
`PipelineError`: the command line prints it as one `error: ...` line (no traceback) and exits with
status 2, whichever stage raised it. The classes keep their older bases too (ValueError,
RuntimeError), so code that catches those still works.

    from lora_module.errors import run_cli
    raise SystemExit(run_cli(main, sys.argv[1:]))
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# The exit status of a command stopped by bad input (argparse uses it for usage errors too).
BAD_INPUT_STATUS = 2


class PipelineError(Exception):
    """Bad input or a failed stage, reported to the user as one line naming what, where and what is valid."""


class LoraConfigError(PipelineError, ValueError):
    """A LoRA setting is invalid, or no module of the model can take the adapter as configured."""


class SettingsError(PipelineError, ValueError):
    """A setting holds a value that is not allowed, or a settings mapping has an unknown key (a training
    config's model.* / data.* value, a GenerationConfig or DemoBaseConfig field, ...)."""


class AdapterLoadError(PipelineError, RuntimeError):
    """An adapter folder cannot be loaded onto this model; the model was left unchanged."""


class FingerprintMismatchError(AdapterLoadError):
    """The adapter was trained on a different base model (`force=True` / `--force` loads it anyway)."""


class BaseModelError(PipelineError, OSError):
    """A base or fine-tuned model folder is missing, incomplete or corrupt (names the file)."""


def one_line(message: str) -> str:
    """The message as one line: line breaks (a list of problems) become '; '."""
    parts = [p.strip() for p in str(message).splitlines() if p.strip()]
    return "; ".join(parts).replace(":;", ":")


def report_error(error: BaseException | str) -> int:
    """Print `error: <message>` as one line on stderr; returns the bad-input exit status."""
    print(f"error: {one_line(str(error)) or type(error).__name__}", file=sys.stderr)
    return BAD_INPUT_STATUS


def run_cli(main: Callable[[list[str]], int | None], argv: Sequence[str]) -> int:
    """Run a command's `main(argv)`; a PipelineError becomes one `error:` line and exit status 2.

    So does `SystemExit("message")`, Python's idiom for "stop with this message" (status 1 otherwise),
    so every bad input of the one command line ends with the same status.
    """
    try:
        return main(list(argv)) or 0
    except PipelineError as e:
        return report_error(e)
    except SystemExit as e:
        if isinstance(e.code, str):
            return report_error(e.code.removeprefix("error: "))
        raise


class UsageError(PipelineError, ValueError):
    """A command line argparse refuses (unknown option, missing argument, bad value)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors raise UsageError, so `run_cli` prints them as every other
    bad input: one `error: ...` line naming the command, exit status 2 (argparse prints the whole
    usage block instead)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


class InputNotFoundError(PipelineError, FileNotFoundError):
    """A file or folder the user named does not exist or is not what the stage reads (names the path)."""


class OutputPathError(PipelineError, NotADirectoryError):
    """A folder to write into cannot be created: it or one of its parents is a regular file."""


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path, if it is a folder or can be created as one; else OutputPathError naming `what`.

    Called before a stage does any work, so a bad output location fails at once and writes nothing.
    """
    p = Path(path).expanduser()
    for folder in (p, *p.parents):
        if folder.exists():
            if not folder.is_dir():
                where = "is a regular file" if folder == p else f"is under the regular file {folder}"
                raise OutputPathError(f"{what}: {str(p)!r} {where}; give a folder path (existing or new)")
            return p
    return p
