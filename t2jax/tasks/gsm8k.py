"""GSM8K: grade-school math word problems, scored by the last number in the completion
(spec §3.1, §3.3-3.5; `tasks/gsm8k.py`, `fishfarm/tasks/language_restricted_math.py`)."""

from __future__ import annotations

import os
import re

from t2jax.tasks.base import TEMPLATE_PLAIN, Example, Score, Task
from t2jax.tasks.data import data_file, even_odd_indices, read_jsonl
from t2jax.tasks.prompts import GSM8K_SYSTEM

# Unsigned, comma-free numbers: "1,000" yields "1" and "000", "-3" yields "3" (official quirk).
_NUMBER = re.compile(r"\d*\.?\d+")
_CALCULATOR = re.compile(r"<<[^>]*>>")  # the reference rationales' calculator annotations


def last_number(text: str) -> str | None:
    """The last match of the official number pattern in `text`, as written (None if none)."""
    matches = _NUMBER.findall(text)
    return matches[-1] if matches else None


def gold_answer(solution: str) -> int:
    """The official gold answer: int(float(last number of the reference solution))."""
    number = last_number(solution)
    if number is None:
        raise ValueError(f"GSM8K solution without a number: {solution[-80:]!r}")
    return int(float(number))


class GSM8KTask(Task):
    """GSM8K. Splits: train/valid (even/odd indices of the 7,473-item train file, official RL
    split), test (1,319), all (train file then test file)."""

    name = "gsm8k"
    splits = ("train", "valid", "test", "all")
    system_message = GSM8K_SYSTEM
    template = TEMPLATE_PLAIN

    def _load(self, split: str, data_dir: str | os.PathLike | None) -> list[Example]:
        files = {"train": "train", "valid": "train", "test": "test"}
        if split == "all":
            return self._load_file("train", data_dir) + self._load_file("test", data_dir)
        examples = self._load_file(files[split], data_dir)
        if split == "test":
            return examples
        train_indices, valid_indices = even_odd_indices(len(examples))
        return [examples[i] for i in (train_indices if split == "train" else valid_indices)]

    @staticmethod
    def _load_file(stem: str, data_dir: str | os.PathLike | None) -> list[Example]:
        records = read_jsonl(data_file(f"gsm8k/{stem}.jsonl", data_dir))
        return [
            Example(
                id=f"gsm8k/{stem}/{index}",
                question=record["question"],
                answer=str(gold_answer(record["answer"])),
                raw=record,
            )
            for index, record in enumerate(records)
        ]

    def reference_completion(self, example: Example) -> str:
        """The reference rationale without its calculator annotations ("<<48/2=24>>"), ending
        "The answer is N." instead of "#### N"."""
        rationale, _, _ = example.raw["answer"].rpartition("####")
        rationale = _CALCULATOR.sub("", rationale).strip()
        return f"{rationale}\nThe answer is {example.answer}."

    def score(self, example: Example, completion: str) -> Score:
        """Correct iff float(last number of the completion) equals the integer gold answer."""
        number = last_number(completion)
        if number is None:
            return Score(False, None, "no number in the completion")
        correct = int(example.answer) == float(number)
        verdict = "matches" if correct else "differs from"
        return Score(correct, number, f"last number {number} {verdict} gold {example.answer}")
