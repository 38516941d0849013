"""The task-classification task that trains the cls expert, and the category parser of the
prompt-based dispatcher (spec §4.1, §4.3; `tasks/cls.py`, `utils.py:166-210`).

Samples are questions labelled "math" (GSM8K), "code" (MBPP+) and "reasoning" (ARC-Challenge,
formatted with its options), taken in dataset order, concatenated in that source order, split by
position (`i % 5 < 4` train pool, else test), and the train pool split even/odd into train/valid.

Recipes:
- "official": 399 per source from the GSM8K *test* split, all MBPP+ problems and the
  ARC-Challenge *test* split (958 train pool / 239 test; 479 train / 479 valid). This leaks the
  evaluation sets into the cls expert's training data (spec §4.3); use it only to reproduce.
- "clean" (default): 300 per source from the GSM8K train file, the 300 MBPP+ problems outside
  the test split and the ARC-Challenge train file (720 / 180; 360 / 360). 300 is what MBPP+ has
  outside its test split, and keeps the three classes balanced as in the official recipe.
"""

from __future__ import annotations

import os
import re
from typing import Literal

from t2jax.tasks.arc import ArcChallengeTask
from t2jax.tasks.base import TEMPLATE_PLAIN, Example, Score, Task
from t2jax.tasks.code_tasks import MbppPlusTask
from t2jax.tasks.data import even_odd_indices
from t2jax.tasks.gsm8k import GSM8KTask
from t2jax.tasks.prompts import CLASSIFICATION_PROMPT

CATEGORIES = ("code", "math", "reasoning")
OTHER = "other"
# How the dispatcher reads a category (t2jax.adaptation.dispatch.classify): the official
# generate-and-parse, the most likely of the four replies CLASSIFICATION_ANSWER asks for, or that
# likelihood calibrated by the replies' likelihood after content-free questions.
DispatchMethod = Literal["generate", "likelihood", "calibrated"]
DISPATCH_METHODS: tuple[str, ...] = ("generate", "likelihood", "calibrated")
CLASSIFICATION_ANSWER = "Classification: \\boxed{{{}}}"
RECIPES = ("clean", "official")
# The official loop breaks when its counter reaches 400, after taking 399 samples per source.
OFFICIAL_PER_SOURCE = 399
CLEAN_PER_SOURCE = 300
_FIRST_BOXED = re.compile(r"\\boxed{([^}]*)}")


def extract_category(text: str) -> str | None:
    """The content of the first `\\boxed{...}` (no nested braces), or None."""
    match = _FIRST_BOXED.search(text)
    return match.group(1) if match else None


def parse_category(text: str) -> str:
    """The dispatcher's reading of a classification: "code", "math", "reasoning" or "other"."""
    category = extract_category(text)
    return category if category in CATEGORIES else OTHER


def _labelled(label: str, examples: list[Example], count: int) -> list[Example]:
    return [
        Example(
            id=f"cls/{label}/{example.id}",
            question=example.question,
            answer=label,
            raw={"label": label, "source_id": example.id},
        )
        for example in examples[:count]
    ]


class ClsTask(Task):
    """Question-category classification. Splits: train, valid, test, all (see module docstring).

    Args:
        recipe: "clean" (training splits only, default) or "official" (the leaking original).
    """

    name = "cls"
    splits = ("train", "valid", "test", "all")
    system_message = CLASSIFICATION_PROMPT
    template = TEMPLATE_PLAIN
    max_new_tokens = 1024
    max_model_len = 2048

    def __init__(self, recipe: str = "clean"):
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
        self.recipe = recipe

    def _load(self, split: str, data_dir: str | os.PathLike | None) -> list[Example]:
        samples = self._samples(data_dir)
        if split == "all":
            return samples
        if split == "test":
            return [sample for index, sample in enumerate(samples) if index % 5 >= 4]
        pool = [sample for index, sample in enumerate(samples) if index % 5 < 4]
        train_indices, valid_indices = even_odd_indices(len(pool))
        return [pool[i] for i in (train_indices if split == "train" else valid_indices)]

    def _samples(self, data_dir: str | os.PathLike | None) -> list[Example]:
        arc = ArcChallengeTask()
        if self.recipe == "official":
            count = OFFICIAL_PER_SOURCE
            sources = (
                GSM8KTask().load("test", data_dir),
                MbppPlusTask().load("all", data_dir),
                arc.load("test", data_dir),
            )
        else:
            count = CLEAN_PER_SOURCE
            sources = (
                GSM8KTask().load("all", data_dir),  # the train file comes first
                MbppPlusTask().load("all", data_dir)[:300],  # everything outside the test split
                arc.load("all", data_dir),  # the train file comes first
            )
        return [
            sample
            for label, examples in zip(("math", "code", "reasoning"), sources, strict=True)
            for sample in _labelled(label, examples, count)
        ]

    def reference_completion(self, example: Example) -> str:
        """The labelled answer the classification prompt asks for, e.g.
        `Classification: \\boxed{math}` (the target of next-token training)."""
        return CLASSIFICATION_ANSWER.format(example.answer)

    def score(self, example: Example, completion: str) -> Score:
        """Correct iff the first boxed content equals the label exactly."""
        category = extract_category(completion)
        correct = category == example.answer
        return Score(correct, category, f"classified {category!r}, label {example.answer!r}")
