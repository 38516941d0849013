"""Atomic file and directory writes: a reader sees the old file or the complete new one, never
a torn one; and t2jax's cache directory.

The new content goes to a temporary file next to the target (same directory, hence same file
system), is flushed to disk, and then renamed over the target (`os.replace` is atomic on POSIX and
Windows). On any error the temporary file is removed and the old file is left as it was.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable
from typing import Any

import platformdirs

CACHE_ENV = "T2JAX_CACHE"


def cache_dir() -> pathlib.Path:
    """t2jax's cache (fetched models, SVD factors, compiled kernels, code ground truth):
    `$T2JAX_CACHE`, else the platform's user cache dir."""
    return pathlib.Path(os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("t2jax"))


def write_atomically(path: str | os.PathLike, write: Callable[[pathlib.Path], None]) -> None:
    """Atomically replaces `path` with the file that `write` produces.

    Args:
        path: the file to create or replace.
        write: writes the complete new content to the path it is given (a temporary file in the
            same directory, which does not exist yet).
    """
    path = pathlib.Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # unique per writer
    try:
        write(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Atomically replaces `path` with a UTF-8 text file holding `text`."""
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_json_atomically(path: str | os.PathLike, value: Any) -> None:
    """Atomically replaces `path` with `value` as indented JSON (sorted keys; values JSON cannot
    represent are written as their `str`), ending in a newline."""
    text = json.dumps(value, indent=2, sort_keys=True, default=str) + "\n"
    write_text_atomically(path, text)


class DestinationError(ValueError):
    """An output directory that cannot be written: a file, or not empty without overwrite."""


def check_destination(out: pathlib.Path, overwrite: bool) -> None:
    """Raises `DestinationError` when `out` is a file, or a non-empty directory and not
    `overwrite`."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise DestinationError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DestinationError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")


def write_directory(
    out: pathlib.Path, write: Callable[[pathlib.Path], None], *, overwrite: bool
) -> None:
    """Runs `write` on a fresh temporary directory next to `out`, flushes its files, then renames
    it to `out` (replacing an existing `out` when `overwrite`). On any error the temporary
    directory is removed and `out` is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex
    temporary = out.with_name(f".{out.name}.{tag}.tmp")
    previous = out.with_name(f".{out.name}.{tag}.old")
    temporary.mkdir()
    try:
        write(temporary)
        for file in temporary.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        check_destination(out, overwrite)
        if out.is_dir():
            os.replace(out, previous)
        try:
            os.replace(temporary, out)
        except BaseException:
            if previous.exists():
                os.replace(previous, out)
            raise
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    shutil.rmtree(previous, ignore_errors=True)
