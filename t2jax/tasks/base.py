"""The task interface shared by every benchmark: examples, scores, splits, messages, rewards
(spec §3; generation settings from §2.4)."""

from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

# Every official task stops generation at EOS or at one of these strings (spec §2.4).
OFFICIAL_STOP_STRINGS = ("Instruction:", "Instruction", "Response:", "Response")

# Official chat-template families (spec §3.2): Llama-3 "plain", Llama-3 with the CoT suffix, and
# the plain-text CODE_PROMPT format.
TEMPLATE_PLAIN = "llama3_plain"
TEMPLATE_COT = "llama3_cot"
TEMPLATE_CODE = "code_prompt"


@dataclasses.dataclass(frozen=True)
class Example:
    """One benchmark item.

    Attributes:
        id: stable identifier, unique within the task (e.g. "gsm8k/test/0", "Mbpp/2").
        question: the user-turn text, which is also what a first-pass classifier sees
            (spec §4.1: the `problem`/`question`/`instruction` field of the official samples).
        answer: the gold answer as text (a number, a letter, a LaTeX string, a category), or a
            reference program for code tasks.
        raw: the source record (plus derived fields a scorer needs).
    """

    id: str
    question: str
    answer: str | None
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class Score:
    """The verdict on one completion.

    Attributes:
        correct: whether the official scorer accepts it.
        extracted: what the scorer extracted (the answer, or the program that was executed).
        reason: a short human-readable explanation.
    """

    correct: bool
    extracted: str | None
    reason: str


Messages = list[dict[str, str]]


class Task(abc.ABC):
    """A benchmark with official splits, prompts and scorer.

    Class attributes:
        name: registry name.
        splits: the split names `load` accepts.
        system_message: the official system prompt, verbatim.
        template: the official chat-template family (`TEMPLATE_*`), used by
            `render_prompt(..., official_quirks=True)` for Llama-3 models.
        max_new_tokens: generation budget (512, or 1024 for MATH and cls).
        max_model_len: prompt + generation cap of the official vLLM engine.
        stop_strings: generation also stops at any of these (the stop text is not part of the
            completion).
        transfer_task: the registry name of the task the official code reports as this task's
            transfer split (MBPP -> HumanEval, ARC-Easy -> ARC-Challenge), if any.
    """

    name: ClassVar[str]
    splits: ClassVar[tuple[str, ...]]
    system_message: ClassVar[str]
    template: ClassVar[str]
    max_new_tokens: ClassVar[int] = 512
    max_model_len: ClassVar[int] = 1024
    stop_strings: ClassVar[tuple[str, ...]] = OFFICIAL_STOP_STRINGS
    transfer_task: ClassVar[str | None] = None

    def load(self, split: str, data_dir: str | os.PathLike | None = None) -> list[Example]:
        """Loads one official split, in the official order.

        Args:
            split: one of `self.splits`. "all" is every record of the task's source files in file
                order; the other splits are subsets of it.
            data_dir: benchmark data directory; defaults to the `T2JAX_DATA` setting.

        Raises:
            ValueError: unknown split.
            DataError: missing data directory or file.
        """
        if split not in self.splits:
            raise ValueError(f"Task {self.name!r} has splits {self.splits}, not {split!r}")
        return self._load(split, data_dir)

    @abc.abstractmethod
    def _load(self, split: str, data_dir: str | os.PathLike | None) -> list[Example]:
        """Loads a split already checked to be valid."""

    def prefill(self, example: Example) -> str:
        """Text the assistant turn starts with (appended right after the generation prompt)."""
        del example
        return ""

    def messages(self, example: Example) -> tuple[Messages, str]:
        """The official conversation for an example.

        Returns:
            ([system message, user message] as role/content dicts, assistant prefill text).
        """
        conversation = [
            {"role": "system", "content": self.system_message},
            {"role": "user", "content": example.question},
        ]
        return conversation, self.prefill(example)

    def reference_completion(self, example: Example) -> str:
        """A reference solution written as a completion in the format the scorer reads (after
        the prompt and prefill): the target of next-token training (spec section 2.5).

        Raises:
            NotImplementedError: the task has no reference solutions.
        """
        raise NotImplementedError(f"{self.name} has no reference solutions for next-token training")

    @abc.abstractmethod
    def score(self, example: Example, completion: str) -> Score:
        """Scores one completion (the generated text after the prompt and prefill)."""

    def score_batch(self, examples: Sequence[Example], completions: Sequence[str]) -> list[Score]:
        """Scores many completions; code tasks run them in parallel sandboxes."""
        if len(examples) != len(completions):
            raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
        return [
            self.score(example, completion)
            for example, completion in zip(examples, completions, strict=True)
        ]

    def reward(self, example: Example, completion: str) -> float:
        """The RL reward: +1.0 if the official scorer accepts the completion, else -1.0."""
        return reward_of(self.score(example, completion))


def reward_of(
    score: Score, incorrect_reward: float = -1.0, require_extracted_answer: bool = False
) -> float:
    """The reward of a scored completion: +1 when correct, `incorrect_reward` otherwise (the
    official unitary reward +1 / -1 by default; spec §2.1).

    With `require_extracted_answer`, a completion the scorer found no answer in earns no credit
    even when its fallback counts it correct (ARC scores an answerless completion by a fixed
    "random guess", A for four options, which RL otherwise learns to exploit by answering
    nothing).
    """
    if score.correct and (score.extracted is not None or not require_extracted_answer):
        return 1.0
    return incorrect_reward
