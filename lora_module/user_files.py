"""Reading a file the user named (a config, a task spec, a checkpoint): one clear line per way it is wrong.

    from lora_module.user_files import check_input_file, read_yaml_file
    path = check_input_file("runs/s1/checkpoints/last.ckpt", "--ckpt_path")
    settings = read_yaml_file("my_data.yaml", "data config file", DataConfigError)

A missing file, a folder, a FIFO (or other special file), a symlink loop, a broken link and an unreadable
file each get their own message, so the user can tell which one they gave; a config that is not UTF-8,
not YAML, or empty (only comments) is refused rather than read as "all defaults". Torch-free.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from lora_module.errors import InputNotFoundError, PipelineError


class InputFileError(InputNotFoundError):
    """A file the user named exists but cannot be read as one: a folder, a FIFO, unreadable, not UTF-8,
    or empty."""


def _special_kind(mode: int) -> str | None:
    """What a non-regular file is, in words; None for a regular file."""
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((kind for test, kind in kinds if test(mode)), None)


def check_input_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path if it is a regular file this process can read; else one line naming `what`, the path
    and which of: missing, a broken symlink, a symlink loop, a folder, a FIFO/socket/device, unreadable."""
    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputFileError(f"{what} {p} is a symlink loop; fix or remove the link") from None
        if e.errno == errno.ENOENT and p.is_symlink():
            raise InputNotFoundError(
                f"{what} {p} is a broken symlink (to {os.readlink(p)}, which does not exist)") from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise InputNotFoundError(f"{what} not found: {p}") from None
        raise InputFileError(f"{what} {p} cannot be read: {e.strerror}") from None
    kind = _special_kind(mode)
    if kind is not None:
        raise InputFileError(f"{what} {p} is {kind}, not a regular file; give the path of a file")
    if not os.access(p, os.R_OK):
        raise InputFileError(f"{what} {p} cannot be read (permission denied)")
    return p


def read_text_file(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of a file checked by `check_input_file`; one line if it is not UTF-8."""
    p = check_input_file(path, what)
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputFileError(
            f"{what} {p} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); save it as UTF-8"
        ) from None


def read_yaml_file(path: str | os.PathLike, what: str, error: type[PipelineError]) -> Any:
    """The YAML document of a config file; `error` (one line) if it is not YAML or holds nothing.

    An empty file, or one of comments only, is refused: read as "every default" it would silently run
    something other than what the user thought they configured.
    """
    p = Path(path).expanduser()
    text = read_text_file(p, what)
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
    if document is None:
        raise error(f"{what} {p} is empty (no settings); write the settings into it, or drop the option")
    return document
