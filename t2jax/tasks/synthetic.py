"""Synthetic tasks whose reward a tiny model can learn: smoke tests of the whole training loop
(rollout -> score -> REINFORCE update -> evaluation) in seconds, without benchmark data.

`FirstLetterTask` rewards a completion (+1, else -1; spec section 2.1) iff its first non-blank
character is one of a few letters. Its examples are generated, so it needs no data directory.
`load_task` resolves these names first and every other name through `t2jax.tasks.get_task`.
"""

from __future__ import annotations

import os
import random
from typing import Any, ClassVar

from t2jax.tasks import Task, get_task
from t2jax.tasks.base import TEMPLATE_PLAIN, Example, Score

_WORDS = (
    "river",
    "stone",
    "cloud",
    "maple",
    "ember",
    "quartz",
    "violet",
    "harbor",
    "lantern",
    "meadow",
    "copper",
    "falcon",
)


class FirstLetterTask(Task):
    """Reward +1 iff the completion starts (after whitespace) with one of `letters`.

    Splits: train, valid and test, each of `split_size` generated questions (distinct word
    sequences per split, drawn with fixed seeds).

    Args:
        letters: the accepted first characters.
        split_size: questions per split.
    """

    name = "synthetic_letter"
    splits = ("train", "valid", "test")
    system_message = "Answer with a single capital letter."
    template = TEMPLATE_PLAIN
    max_new_tokens: ClassVar[int] = 4
    max_model_len: ClassVar[int] = 128
    stop_strings: ClassVar[tuple[str, ...]] = ()

    def __init__(self, letters: str = "AEIOU", split_size: int = 64):
        if not letters or split_size < 1:
            raise ValueError("FirstLetterTask needs letters and a positive split_size")
        self.letters = letters
        self.split_size = split_size

    def _load(self, split: str, data_dir: str | os.PathLike | None) -> list[Example]:
        del data_dir  # generated
        rng = random.Random(f"{self.name}/{split}")
        return [
            Example(
                id=f"{self.name}/{split}/{index}",
                question=" ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 5))) + "?",
                answer=self.letters,
            )
            for index in range(self.split_size)
        ]

    def reference_completion(self, example: Example) -> str:
        """The first accepted letter."""
        return self.letters[0]

    def score(self, example: Example, completion: str) -> Score:
        """Correct iff the first non-blank character is an accepted letter."""
        first = completion.lstrip()[:1]
        return Score(first != "" and first in self.letters, first or None, f"starts with {first!r}")


SYNTHETIC_TASKS: dict[str, type[Task]] = {FirstLetterTask.name: FirstLetterTask}


def load_task(name: str, **options: Any) -> Task:
    """A synthetic task by name, else the benchmark task of `t2jax.tasks.get_task`.

    Raises:
        KeyError: unknown name.
    """
    if name in SYNTHETIC_TASKS:
        return SYNTHETIC_TASKS[name](**options)
    return get_task(name, **options)
