"""The host side of a training batch: which examples each step draws, advantages from rewards,
the token ids a rollout is scored on, and the padded, sharded `PolicyBatch`.

Batches are drawn without replacement within a step by `np.random.RandomState(seed).choice`, one
call per step (official).

Completion tokens. The official code re-tokenizes the prompt string and the prompt + output string
and scores the ids after the prompt's (`completion_tokens="retokenize"`, the default). The
alternative "sampled" scores exactly the ids the sampler produced (cut where the stop string
begins), i.e. the true on-policy sequence. Either way the end-of-sequence token is not scored
(spec section 2.2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from t2jax import parallel
from t2jax.configuration import ConfigError
from t2jax.padding import chunked_length, left_pad
from t2jax.rl.loss import PolicyBatch

Array = jax.Array


def batch_schedule(num_examples: int, batch_size: int, num_iters: int, seed: int) -> np.ndarray:
    """[num_iters, batch] example indices: per step `RandomState(seed).choice(n, b, replace=False)`
    from one generator, as the official code draws its batches (the batch is capped at n)."""
    rng = np.random.RandomState(seed)
    size = min(batch_size, num_examples)
    rows = [rng.choice(num_examples, size, replace=False) for _ in range(num_iters)]
    return np.stack(rows).astype(np.int32)


def compute_advantages(rewards: np.ndarray, group_size: int, kind: str) -> np.ndarray:
    """Per-rollout advantages from rewards [N] (N = prompts * group_size, grouped by prompt).

    Args:
        rewards: [N] rewards, the K rollouts of a prompt adjacent.
        group_size: K rollouts per prompt.
        kind: "none" (the reward itself, official), "normalize" ((r - mean) / std over the
            batch), or "leave_one_out" (r minus the mean reward of the prompt's other rollouts).
    """
    rewards = np.asarray(rewards, np.float32)
    if kind == "none":
        return rewards
    if kind == "normalize":
        return (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    if kind == "leave_one_out":
        groups = rewards.reshape(-1, group_size)  # [prompts, K]
        others = (groups.sum(axis=1, keepdims=True) - groups) / (group_size - 1)  # [prompts, K]
        return (groups - others).reshape(-1)
    raise ConfigError(f"unknown advantage {kind!r}")


def sequence_tokens(
    tokenizer: Any,
    prompt: str,
    completion: str,
    sampled_ids: Sequence[int],
    mode: str,
) -> tuple[list[int], int]:
    """Token ids of prompt + completion for the teacher-forced pass, and the prompt's length.

    Args:
        tokenizer: the model's tokenizer.
        prompt: the rendered prompt (special tokens included as text).
        completion: the generated text, cut before any stop string, without end tokens.
        sampled_ids: the ids the sampler generated (without the end id; may run past a stop
            string, since stop strings are checked between decode chunks).
        mode: "retokenize" (official: tokenize prompt and prompt + completion; the ids after
            the prompt's are the completion) or "sampled" (prompt ids + the sampled ids, cut to
            the longest prefix whose text is a prefix of the completion).
    """
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    if mode == "retokenize":
        return tokenizer.encode(prompt + completion, add_special_tokens=False), len(prompt_ids)
    ids = list(sampled_ids)
    while ids and not completion.startswith(tokenizer.decode(ids, skip_special_tokens=True)):
        ids.pop()
    return prompt_ids + ids, len(prompt_ids)


def assemble_batch(
    sequences: Sequence[tuple[list[int], int]],
    advantages: np.ndarray,
    *,
    chunk: int,
    rows: int,
) -> PolicyBatch:
    """Left-pads (ids, prompt length) pairs into a host `PolicyBatch` of `rows` rows (extra rows
    are padding with zero advantage). Every completion ends its row, so the scored positions lie
    in the last (longest completion + 1) positions: `scored_tail` is that, in whole chunks."""
    length = chunked_length(max(len(ids) for ids, _ in sequences), chunk)
    longest_completion = max(len(ids) - prompt_length for ids, prompt_length in sequences)
    scored_tail = min(chunked_length(longest_completion + 1, chunk), length)
    tokens, token_mask = left_pad([ids for ids, _ in sequences], length, rows)  # [rows, T] each
    completion_mask = np.zeros((rows, length), bool)
    for row, (ids, prompt_length) in enumerate(sequences):
        completion_mask[row, length - len(ids) + prompt_length :] = True
    padded_advantages = np.zeros(rows, np.float32)
    padded_advantages[: len(sequences)] = advantages
    row_mask = np.arange(rows) < len(sequences)
    return PolicyBatch(
        tokens, token_mask, completion_mask, padded_advantages, row_mask, scored_tail
    )


def microbatch_layout(
    rows: int, microbatch_size: int | None, data_parallel: int
) -> tuple[int, int]:
    """(padded row count, number of microbatches): microbatches are a multiple of the
    data-parallel size, and the rows a multiple of the microbatch size."""
    size = rows if microbatch_size is None else min(microbatch_size, rows)
    size = math.ceil(size / data_parallel) * data_parallel
    count = math.ceil(rows / size)
    return count * size, count


def place_batch(batch: PolicyBatch, mesh: jax.sharding.Mesh) -> PolicyBatch:
    """Puts a host batch on the mesh, rows split over the data axes. Every process holds the same
    global batch, so each takes its own shards (works on one host and many)."""
    sharding = parallel.batch_sharding(mesh)

    def put(x: np.ndarray) -> Array:
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, batch)
