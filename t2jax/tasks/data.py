"""Local benchmark files: where they live, how they are read, and the official split recipes.

Every loader reads from one data directory laid out like `../shared/data` (spec §3.1):

    gsm8k/train.jsonl, gsm8k/test.jsonl
    mbppplus/MbppPlus-v0.1.0.jsonl.gz        (or the uncompressed mbppplus/MbppPlus.jsonl)
    humanevalplus/HumanEvalPlus-v0.1.10.jsonl.gz, humaneval/HumanEval.jsonl.gz
    arc/ARC-{Easy,Challenge}-{Train,Dev,Test}.jsonl
    math/test.jsonl, math/math500_test.jsonl

The directory is the `data_dir` argument, else the `T2JAX_DATA` environment variable.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import pathlib
import random
from collections.abc import Sequence
from typing import Any

DATA_ENV_VAR = "T2JAX_DATA"

EXPECTED_LAYOUT = """\
  gsm8k/train.jsonl  gsm8k/test.jsonl
  mbppplus/MbppPlus-v0.1.0.jsonl.gz
  humanevalplus/HumanEvalPlus-v0.1.10.jsonl.gz  humaneval/HumanEval.jsonl.gz
  arc/ARC-Easy-{Train,Dev,Test}.jsonl  arc/ARC-Challenge-{Train,Dev,Test}.jsonl
  math/test.jsonl  math/math500_test.jsonl"""


class DataError(FileNotFoundError):
    """A benchmark file or the data directory is missing or malformed."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Returns the benchmark data directory.

    Args:
        data_dir: explicit directory; when None, the `T2JAX_DATA` environment variable is used.

    Raises:
        DataError: neither is set, or the directory does not exist.
    """
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_ENV_VAR)
    if not chosen:
        raise DataError(
            f"No benchmark data directory: pass data_dir=... or set {DATA_ENV_VAR} to a folder "
            f"laid out like this:\n{EXPECTED_LAYOUT}"
        )
    path = pathlib.Path(chosen).expanduser()
    if not path.is_dir():
        raise DataError(
            f"Benchmark data directory {str(path)!r} (from "
            f"{'data_dir' if data_dir is not None else DATA_ENV_VAR}) does not exist. "
            f"Expected layout:\n{EXPECTED_LAYOUT}"
        )
    return path


def data_file(
    relative: str | Sequence[str], data_dir: str | os.PathLike | None = None
) -> pathlib.Path:
    """Returns the path of a benchmark file, trying each candidate name in order.

    Args:
        relative: a path inside the data directory, or several alternatives (first found wins).
        data_dir: see `resolve_data_dir`.

    Raises:
        DataError: no candidate exists; the message names the directory and the expected layout.
    """
    root = resolve_data_dir(data_dir)
    candidates = [relative] if isinstance(relative, str) else list(relative)
    for candidate in candidates:
        path = root / candidate
        if path.is_file():
            return path
    raise DataError(
        f"Missing benchmark file {' or '.join(candidates)} in {str(root)!r} (set {DATA_ENV_VAR} "
        f"or data_dir). Expected layout:\n{EXPECTED_LAYOUT}"
    )


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a JSON-lines file (gzip-compressed when the name ends in .gz), skipping blank lines.

    Parsed files are cached while unchanged (same size and mtime): the records are shared between
    callers and must be treated as read-only.
    """
    path = pathlib.Path(path).resolve()
    status = path.stat()
    return list(_parse_jsonl(path, status.st_mtime_ns, status.st_size))


@functools.lru_cache(maxsize=32)
def _parse_jsonl(path: pathlib.Path, mtime_ns: int, size: int) -> tuple[dict[str, Any], ...]:
    del mtime_ns, size  # cache key only
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        try:
            return tuple(json.loads(line) for line in handle if line.strip())
        except json.JSONDecodeError as error:
            raise DataError(f"{path} is not valid JSON lines: {error}") from error


def file_sha256(path: str | os.PathLike) -> str:
    """Returns the hex sha256 of a file's bytes (used as a cache key for derived data)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def even_odd_indices(count: int) -> tuple[list[int], list[int]]:
    """The official train/valid split of a training pool: even indices train, odd indices valid.

    Used for GSM8K (`tasks/gsm8k.py:45-52`), ARC (`tasks/arc.py:32-40`) and the cls task
    (spec §3.1).
    """
    return list(range(0, count, 2)), list(range(1, count, 2))


def seeded_shuffle_split(count: int, first: int, seed: int) -> tuple[list[int], list[int]]:
    """The official shuffled split: shuffle `range(count)` with `random.seed(seed)`, cut at `first`.

    Reproduces MBPP's 200/100 split with seed 16 (`tasks/mbpp2.py:30-44`) and the few-shot
    shots/held-out split of the CEM strategy (seeds 27/16/38, spec §4.4). A private
    `random.Random(seed)` draws the same permutation as seeding the global generator.

    Returns:
        (the first `first` shuffled indices, the remaining shuffled indices).
    """
    indices = list(range(count))
    random.Random(seed).shuffle(indices)
    return indices[:first], indices[first:]
