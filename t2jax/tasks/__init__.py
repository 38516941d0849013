"""Benchmarks of Transformer² with the official splits, prompts and scorers (spec §3, §4.3).

    from t2jax.tasks import get_task, render_prompt
    task = get_task("gsm8k")
    examples = task.load("test")                  # data from $T2JAX_DATA or data_dir=...
    messages, prefill = task.messages(examples[0])
    prompt = render_prompt(task, examples[0], tokenizer)
    score = task.score(examples[0], completion)   # Score(correct, extracted, reason)
    reward = task.reward(examples[0], completion)  # +1.0 / -1.0

Generation settings are on the task: `max_new_tokens`, `max_model_len`, `stop_strings`.
"""

from __future__ import annotations

from typing import Any

from t2jax.tasks.arc import ArcChallengeTask, ArcEasyTask
from t2jax.tasks.base import OFFICIAL_STOP_STRINGS, Example, Score, Task, reward_of
from t2jax.tasks.cls import CATEGORIES, ClsTask, parse_category
from t2jax.tasks.code_tasks import HumanEvalTask, MbppPlusTask
from t2jax.tasks.data import DATA_ENV_VAR, DataError, seeded_shuffle_split
from t2jax.tasks.gsm8k import GSM8KTask
from t2jax.tasks.math_task import MathTask
from t2jax.tasks.prompts import CLASSIFICATION_PROMPT, render_prompt

__all__ = [
    "CATEGORIES",
    "CLASSIFICATION_PROMPT",
    "DATA_ENV_VAR",
    "OFFICIAL_STOP_STRINGS",
    "TASK_NAMES",
    "DataError",
    "Example",
    "Score",
    "Task",
    "get_task",
    "parse_category",
    "render_prompt",
    "reward_of",
    "seeded_shuffle_split",
]

_FACTORIES: dict[str, type[Task]] = {
    "gsm8k": GSM8KTask,
    "mbpp": MbppPlusTask,
    "humaneval": HumanEvalTask,
    "arc_easy": ArcEasyTask,
    "arc_challenge": ArcChallengeTask,
    "math": MathTask,
    "cls": ClsTask,
}
TASK_NAMES = tuple(_FACTORIES)


def get_task(name: str, **options: Any) -> Task:
    """Returns a new task by registry name.

    Args:
        name: one of `TASK_NAMES`: gsm8k, mbpp (MBPP+ v0.1.0, the paper's MBPP-Pro), humaneval,
            arc_easy, arc_challenge, math (splits test and math500), cls.
        **options: task options: `tests=`/`workers=`/`isolation=` for mbpp and humaneval,
            `map_numeric_labels=` for ARC, `symbolic_equal=` for math, `recipe=` for cls.

    Raises:
        KeyError: unknown task name.
    """
    if name not in _FACTORIES:
        raise KeyError(f"Unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
    return _FACTORIES[name](**options)
