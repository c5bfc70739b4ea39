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
import errno
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
    so every bad input of the one command line ends with the same status. So does a file system that
    refuses a write or a read anywhere in the stage (full, read-only, no permission, a symlink loop):
    one line naming the path, from `file_system_problem`.
    """
    try:
        return main(list(argv)) or 0
    except PipelineError as e:
        return report_error(e)
    except SystemExit as e:
        if isinstance(e.code, str):
            return report_error(e.code.removeprefix("error: "))
        raise
    except Exception as e:
        message = file_system_problem(e)
        if message is None:
            raise
        return report_error(message)


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

    Called before a stage does any work, so a bad output location fails at once and writes nothing: a
    regular file on the way, a symlink loop or broken link, or a nearest existing folder that is read-only,
    not writable or on a full disk.
    """
    p = Path(path).expanduser()
    for folder in (p, *p.parents):
        if folder.is_symlink() and not folder.exists():
            kind = "a symlink loop" if _stat_errno(folder) == errno.ELOOP else "a broken symlink"
            where = f"is {kind}" if folder == p else f"is under {kind}, {folder}"
            raise OutputPathError(f"{what}: {str(p)!r} {where}; fix or remove the link, or give another "
                                  "folder")
        if folder.exists():
            if not folder.is_dir():
                where = "is a regular file" if folder == p else f"is under the regular file {folder}"
                raise OutputPathError(f"{what}: {str(p)!r} {where}; give a folder path (existing or new)")
            _check_writable(folder, p, what)
            return p
    return p


def _stat_errno(path: Path) -> int | None:
    try:
        path.stat()
    except OSError as e:
        return e.errno
    return None


def _check_writable(folder: Path, path: Path, what: str) -> None:
    """OutputPathError unless `folder` (the existing folder at or above `path`) takes new files."""
    where = "" if folder == path else f" (its existing parent {folder})"
    if not os.access(folder, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
        problem = "is on a read-only file system" if read_only else "is not writable (permission denied)"
        raise OutputPathError(f"{what}: {str(path)!r}{where} {problem}; choose a writable folder")
    disk = os.statvfs(folder)
    if disk.f_blocks and not disk.f_bavail:  # f_blocks 0: a file system that reports no sizes
        raise OutputPathError(f"{what}: {str(path)!r}{where}: no space left on device; free some space "
                              "or choose a folder on another disk")



# What the file system says, in words, and what the user can do about it. Errors of these kinds are the
# machine's, not the pipeline's: no stage handles them, so `run_cli` reports them wherever they arise.
_FS_ERRORS: dict[int, str] = {
    errno.ENOSPC: "no space left on device; free some space or choose a folder on another disk",
    errno.EDQUOT: "disk quota exceeded; free some space or choose a folder on another disk",
    errno.EROFS: "read-only file system; choose a writable folder",
    errno.EACCES: "permission denied; choose a folder you can write (and files you can read)",
    errno.EPERM: "operation not permitted; choose a folder you can write (and files you can read)",
    errno.ELOOP: "symlink loop (too many levels of symbolic links); fix or remove the link",
}


def file_system_problem(error: BaseException) -> str | None:
    """One line naming the path and the problem when `error` (or an error it was raised from) is the file
    system refusing a read or write (full, read-only, no permission, a symlink loop); else None."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FS_ERRORS:
            where = current.filename if current.filename is not None else "a file the stage writes"
            return f"{where}: {_FS_ERRORS[current.errno]}"
        if isinstance(current, RuntimeError) and str(current).startswith("Symlink loop from "):
            return f"{str(current).removeprefix('Symlink loop from ')}: {_FS_ERRORS[errno.ELOOP]}"
        current = current.__cause__ or current.__context__
    return None


def port_number(text: str) -> int:
    """argparse `type` of a TCP port to listen on: an integer from 1 to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port: give an integer from 1 to 65535")
    return port


def whole_number(minimum: int) -> Callable[[str], int]:
    """argparse `type` of an integer option that must be >= `minimum` (a count, a seed)."""

    def parse(text: str) -> int:
        value = int(text)  # not a number: argparse's own "invalid int value: 'x'", as for every int option
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {minimum}")
        return value

    parse.__name__ = "int"
    return parse
