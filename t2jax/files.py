"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one.

The new content goes to a temporary file next to the target (same directory, hence same file
system), is flushed to disk, and then renamed over the target (`os.replace` is atomic on POSIX and
Windows). On any error the temporary file is removed and the old file is left as it was.
"""

from __future__ import annotations

import json
import os
import pathlib
import uuid
from collections.abc import Callable
from typing import Any


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
