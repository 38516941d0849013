"""One training step's data, and greedy evaluation during training: rollouts generated with the
trained adapter (SVF's W'(z), or a LoRA / IA3 / DoRA adapter) merged into the weights (one
greedy completion per prompt, official), scored by the task's official scorer into rewards
(`t2jax.tasks.reward_of`), and turned into the placed teacher-forcing batch.
"""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from t2jax import parallel
from t2jax.adapted import Choice
from t2jax.evaluation import evaluate_model, standard_error
from t2jax.rl.batch import (
    assemble_batch,
    compute_advantages,
    microbatch_layout,
    place_batch,
    sequence_tokens,
)
from t2jax.rl.loss import PolicyBatch
from t2jax.rl.setup import Setup
from t2jax.sampler import Generation
from t2jax.tasks import Example, reward_of


@dataclasses.dataclass
class Rollouts:
    """Completions of one training batch (the K rollouts of an example adjacent) and scores."""

    examples: list[Example]
    prompts: list[str]
    generation: Generation
    rewards: np.ndarray | None = None  # [N]
    correct: np.ndarray | None = None  # [N] bool: the official scorer's verdict
    answered: np.ndarray | None = None  # [N] bool: the scorer extracted an answer


def generate_rollouts(
    setup: Setup, choice: Choice, examples: Sequence[Example], seed: int
) -> Rollouts:
    """Generates `samples_per_prompt` completions per example with the adapter `choice` merged
    into the weights (greedy by default, as in the official code)."""
    rl = setup.config.rl
    repeated = [example for example in examples for _ in range(rl.samples_per_prompt)]
    prompts = [setup.prompt(example) for example in repeated]
    generation = setup.model.generate(
        prompts,
        [choice],
        [0] * len(prompts),
        max_new_tokens=setup.max_new_tokens,
        stop_strings=setup.task.stop_strings,
        rows_per_call=rl.rows_per_call,
        temperature=rl.temperature,
        top_p=rl.top_p,
        seed=seed,
    )
    return Rollouts(repeated, prompts, generation)


def score_rollouts(setup: Setup, rollouts: Rollouts) -> Rollouts:
    """Scores completions with the task's official scorer and turns the scores into rewards."""
    rl = setup.config.rl
    scores = setup.task.score_batch(rollouts.examples, rollouts.generation.texts)
    rewards = [
        reward_of(score, rl.incorrect_reward, rl.require_extracted_answer) for score in scores
    ]
    return dataclasses.replace(
        rollouts,
        rewards=np.asarray(rewards, np.float32),
        correct=np.asarray([score.correct for score in scores], bool),
        answered=np.asarray([score.extracted is not None for score in scores], bool),
    )


def rollout_metrics(rollouts: Rollouts) -> dict[str, Any]:
    """Mean reward, accuracy, answered fraction, completion length and truncated fraction of a
    step's scored rollouts."""
    lengths = np.asarray(rollouts.generation.lengths)
    reasons = rollouts.generation.finish_reasons
    return {
        "rollout/reward": float(rollouts.rewards.mean()),
        "rollout/accuracy": float(rollouts.correct.mean()),
        "rollout/answered": float(rollouts.answered.mean()),
        "rollout/completion_tokens": float(lengths.mean()),
        "rollout/truncated": reasons.count("length") / len(reasons),
    }


def policy_batch(setup: Setup, rollouts: Rollouts) -> tuple[PolicyBatch, int]:
    """The placed teacher-forcing batch of a step's rollouts and its number of microbatches."""
    rl = setup.config.rl
    tokenizer = setup.model.tokenizer
    sequences = [
        sequence_tokens(tokenizer, prompt, text, ids, rl.completion_tokens)
        for prompt, text, ids in zip(
            rollouts.prompts,
            rollouts.generation.texts,
            rollouts.generation.token_ids,
            strict=True,
        )
    ]
    advantages = compute_advantages(rollouts.rewards, rl.samples_per_prompt, rl.advantage)
    return _placed_batch(setup, sequences, advantages)


def reference_batch(setup: Setup, examples: Sequence[Example]) -> tuple[PolicyBatch, int]:
    """The placed teacher-forcing batch of next-token training: each example's prompt followed
    by its reference solution (`Task.reference_completion`), and its number of microbatches."""
    tokenizer = setup.model.tokenizer
    sequences = [
        sequence_tokens(
            tokenizer,
            setup.prompt(example),
            setup.task.reference_completion(example),
            (),
            "retokenize",
        )
        for example in examples
    ]
    return _placed_batch(setup, sequences, np.ones(len(sequences), np.float32))


def _placed_batch(
    setup: Setup, sequences: list[tuple[list[int], int]], advantages: np.ndarray
) -> tuple[PolicyBatch, int]:
    """(ids, prompt length) pairs laid out in microbatches and placed on the mesh."""
    rl = setup.config.rl
    data_parallel = parallel.data_parallel_size(setup.model.mesh)
    rows, num_microbatches = microbatch_layout(len(sequences), rl.microbatch_size, data_parallel)
    batch = assemble_batch(sequences, advantages, chunk=rl.logprob_chunk, rows=rows)
    return place_batch(batch, setup.model.mesh), num_microbatches


def evaluate_split(
    setup: Setup,
    choice: Choice,
    split: str,
    examples: Sequence[Example],
    out_dir: pathlib.Path,
) -> dict[str, float]:
    """Greedy accuracy of the adapter `choice` merged into the weights on examples, with
    per-sample records in `out_dir` (main process; the others write to a temporary directory).
    Returns accuracy, reward, standard error, n."""
    with tempfile.TemporaryDirectory() as scratch:
        summary = evaluate_model(
            setup.model.sampler_for(choice),
            setup.task,
            examples,
            out_dir if parallel.is_main_process() else scratch,
            setup.config.task.rows_per_call,
            setup.max_new_tokens,
            official_quirks=setup.config.task.official_quirks,
            config={"split": split},
            show_progress=False,
        )
    accuracy = summary["accuracy"]
    incorrect = setup.config.rl.incorrect_reward
    return {
        f"eval/{split}/accuracy": accuracy,
        f"eval/{split}/reward": accuracy + (1.0 - accuracy) * incorrect,
        f"eval/{split}/standard_error": standard_error(summary["correct"], summary["n"]),
        f"eval/{split}/n": summary["n"],
    }
