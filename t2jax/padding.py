"""Padding token lists into fixed shapes: the length buckets that keep the number of compiled
shapes small, and left-padding (real tokens at the right end, as the sampler and the
teacher-forced passes expect)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= length; beyond the largest, the next multiple of the largest."""
    for bucket in sorted(buckets):
        if length <= bucket:
            return bucket
    largest = max(buckets)
    return -(-length // largest) * largest


def new_tokens_bucket(max_new_tokens: int) -> int:
    """Output-buffer length for `max_new_tokens`: a power of two, at least 64."""
    return max(64, 1 << (max(max_new_tokens, 1) - 1).bit_length())


def left_pad(
    token_lists: Sequence[Sequence[int]], length: int, rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists into [rows, length] ids and a bool mask (extra rows are all pad)."""
    ids = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), bool)
    for row, tokens in enumerate(token_lists):
        if tokens:
            ids[row, length - len(tokens) :] = tokens
            mask[row, length - len(tokens) :] = True
    return ids, mask


def chunked_length(length: int, chunk: int) -> int:
    """Sequence length of a batch: the smallest chunk * m >= length with m in 1, 2, 3, 4, 6, 8,
    12, 16, ... (steps of at most 1.5x: few distinct shapes to compile, at most 50% padding)."""
    chunks = max(1, math.ceil(length / chunk))
    power = 1 << (chunks - 1).bit_length()  # the next power of two >= chunks
    return chunk * (power * 3 // 4 if chunks <= power * 3 // 4 else power)
