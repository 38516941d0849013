"""ARC-Easy and ARC-Challenge: multiple choice with chain of thought (spec §3.1, §3.3-3.5;
`tasks/arc.py`, `fishfarm/tasks/ai2_arc.py`).

Options are lettered A-E by position. The completion's letter is found by three patterns in turn;
when none matches, the official scorer compares the gold letter with a "random guess" drawn right
after `random.seed(42)`, i.e. always the same letter for a given number of options (C for 3, A
for 4 or 5).

About 2% of ARC items (the `NYSEDREGENTS_*_8_*` ones) label their options "1"-"4". The official
code compares the letter with that raw label, so those items can never be scored correct. By
default the gold label is mapped to the letter of its position (1 -> A, ...);
`map_numeric_labels=False` reproduces the official behaviour exactly.
"""

from __future__ import annotations

import os
import random
import re
from typing import ClassVar

from t2jax.tasks.base import TEMPLATE_COT, Example, Score, Task
from t2jax.tasks.data import data_file, even_odd_indices, read_jsonl
from t2jax.tasks.prompts import ARC_SYSTEM

LETTERS = "ABCDE"
_ANSWER_IS = re.compile(r"answer is \(?([A-J])\)?")
_ANSWER_COLON = re.compile(r".*[aA]nswer:\s*([A-J])")
_LAST_STANDALONE_LETTER = re.compile(r"\b[A-J]\b(?!.*\b[A-J]\b)", re.DOTALL)
_GUESS_SEED = 42


def format_question(stem: str, options: list[str]) -> str:
    """The official user turn: stem, "Options:", then "A. text" lines, each ending in a newline."""
    lines = "".join(f"{LETTERS[index]}. {option}\n" for index, option in enumerate(options))
    return f"{stem}\nOptions:\n{lines}"


def extract_letter(completion: str) -> str | None:
    """The official extraction: (1) first "answer is (X)"; (2) first line with "answer: X";
    (3) the last standalone capital letter A-J. None when all three fail."""
    for pattern in (_ANSWER_IS, _ANSWER_COLON):
        match = pattern.search(completion)
        if match:
            return match.group(1)
    match = _LAST_STANDALONE_LETTER.search(completion)
    return match.group(0) if match else None


def seeded_guess(num_options: int) -> str:
    """The official fallback guess: `random.seed(42); randint(0, n - 1)` as a letter."""
    return LETTERS[random.Random(_GUESS_SEED).randint(0, num_options - 1)]


def gold_letter(record: dict, map_numeric_labels: bool) -> str:
    """The gold answer: the raw answerKey, or the letter of its position when mapping labels."""
    labels = [choice["label"] for choice in record["question"]["choices"]]
    key = record["answerKey"]
    if map_numeric_labels and key not in LETTERS:
        return LETTERS[labels.index(key)]
    return key


class ArcTask(Task):
    """ARC. Splits: train/valid (even/odd indices of the official train file, the official RL
    split), dev (the official validation file), test, all (train, dev, test files).

    Args:
        map_numeric_labels: map "1"-"4" answer keys to letters (default) or keep the official
            behaviour that scores those items wrong whatever the model says.
    """

    subset: ClassVar[str]  # "Easy" or "Challenge": the file names' middle part
    splits = ("train", "valid", "dev", "test", "all")
    system_message = ARC_SYSTEM
    template = TEMPLATE_COT

    def __init__(self, map_numeric_labels: bool = True):
        self.map_numeric_labels = map_numeric_labels

    def _load(self, split: str, data_dir: str | os.PathLike | None) -> list[Example]:
        if split == "all":
            return [
                example
                for part in ("Train", "Dev", "Test")
                for example in self._load_file(part, data_dir)
            ]
        if split in ("dev", "test"):
            return self._load_file(split.capitalize(), data_dir)
        examples = self._load_file("Train", data_dir)
        train_indices, valid_indices = even_odd_indices(len(examples))
        return [examples[i] for i in (train_indices if split == "train" else valid_indices)]

    def _load_file(self, part: str, data_dir: str | os.PathLike | None) -> list[Example]:
        records = read_jsonl(data_file(f"arc/ARC-{self.subset}-{part}.jsonl", data_dir))
        return [
            Example(
                id=record["id"],
                question=format_question(
                    record["question"]["stem"],
                    [choice["text"] for choice in record["question"]["choices"]],
                ),
                answer=gold_letter(record, self.map_numeric_labels),
                raw=record,
            )
            for record in records
        ]

    def reference_completion(self, example: Example) -> str:
        """The gold letter in the format the system prompt asks for."""
        return f"The answer is ({example.answer})."

    def score(self, example: Example, completion: str) -> Score:
        """Correct iff the extracted letter (or, if none, the seeded guess) equals the gold."""
        letter = extract_letter(completion)
        if letter is not None:
            correct = letter == example.answer
            return Score(correct, letter, f"answer {letter}, gold {example.answer}")
        guess = seeded_guess(len(example.raw["question"]["choices"]))
        correct = guess == example.answer
        return Score(correct, None, f"no letter found; seeded guess {guess}, gold {example.answer}")


class ArcEasyTask(ArcTask):
    """ARC-Easy (2,251 / 570 / 2,376); the official code reports ARC-Challenge as its transfer."""

    name = "arc_easy"
    subset = "Easy"
    transfer_task = "arc_challenge"


class ArcChallengeTask(ArcTask):
    """ARC-Challenge (1,119 / 299 / 1,172)."""

    name = "arc_challenge"
    subset = "Challenge"
