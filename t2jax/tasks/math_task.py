"""MATH (Hendrycks, 5,000 test problems) and its MATH-500 subset: boxed answers compared by the
official normalisation and equivalence rules (spec §3.1, §3.3-3.5; `tasks/math.py`).

The gold answer is the last `\\boxed{}` of the reference solution, as in the official code (also
for MATH-500, whose separate `answer` field is kept in `raw`). Problems are in the order of the
local file; the official code read the (now removed) Hugging Face copy, whose order matters only
for the few-shot split.
"""

from __future__ import annotations

import os

from t2jax.tasks.base import TEMPLATE_PLAIN, Example, Score, Task
from t2jax.tasks.data import data_file, read_jsonl
from t2jax.tasks.math_equiv import (
    SymbolicEqual,
    extract_answer,
    is_equiv,
    last_boxed,
    remove_boxed,
    shared_symbolic_checker,
)
from t2jax.tasks.prompts import MATH_SYSTEM


class MathTask(Task):
    """MATH. Splits: test (5,000), math500 (the 500-problem PRM800K subset, with the ids of the
    same problems in test; its `unique_id` stays in `raw`), all (= test).

    Args:
        symbolic_equal: the sympy check; defaults to a shared sandboxed `SymbolicChecker`.
    """

    name = "math"
    splits = ("test", "math500", "all")
    system_message = MATH_SYSTEM
    template = TEMPLATE_PLAIN
    max_new_tokens = 1024
    max_model_len = 2048

    def __init__(self, symbolic_equal: SymbolicEqual | None = None):
        self._symbolic_equal = symbolic_equal

    def _load(self, split: str, data_dir: str | os.PathLike | None) -> list[Example]:
        test = read_jsonl(data_file("math/test.jsonl", data_dir))
        id_of_problem = {record["problem"]: f"math/test/{record['idx']}" for record in test}
        if split == "math500":
            # Every MATH-500 problem is in the full test set: ids are shared between the splits.
            records = read_jsonl(data_file("math/math500_test.jsonl", data_dir))
            ids = [id_of_problem.get(r["problem"], r["unique_id"]) for r in records]
        else:
            records = test
            ids = [f"math/test/{record['idx']}" for record in records]
        return [
            Example(
                id=example_id,
                question=record["problem"],
                answer=remove_boxed(last_boxed(record["solution"])),
                raw=record,
            )
            for example_id, record in zip(ids, records, strict=True)
        ]

    def score(self, example: Example, completion: str) -> Score:
        """Correct iff the extracted answer is equivalent to the gold (`is_equiv`)."""
        prediction = extract_answer(completion)
        symbolic_equal = self._symbolic_equal or shared_symbolic_checker()
        correct = is_equiv(example.answer, prediction, symbolic_equal)
        if prediction is None:
            return Score(correct, None, "no boxed answer or 'The answer is: ' in the completion")
        verdict = "equivalent to" if correct else "not equivalent to"
        return Score(correct, prediction, f"{prediction!r} {verdict} gold {example.answer!r}")
