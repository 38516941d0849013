"""MBPP+ ("MBPP-Pro") and HumanEval: code generation scored by running the program against
tests in the sandbox (spec §3.1, §3.4-3.6; `tasks/mbpp2.py`, `fishfarm/tasks/evalplus/`).

Test suites (`tests=`):
- "base" (default, the official metric `*_base_pass@1` and reward): the evalplus base inputs,
  expected outputs computed by running the canonical solution (cached on disk);
- "plus": base and plus inputs (evalplus's `plus_correct`);
- "original": the original asserts (HumanEval's `check(candidate)`, MBPP+'s `assertion` field).
"""

from __future__ import annotations

import abc
import ast
import concurrent.futures
import functools
import json
import os
import pathlib
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from t2jax.files import cache_dir, write_text_atomically
from t2jax.tasks import evalplus_rules as rules
from t2jax.tasks._sandbox_codec import decode_value, encode_value
from t2jax.tasks.base import TEMPLATE_CODE, Example, Score, Task
from t2jax.tasks.data import data_file, file_sha256, read_jsonl, seeded_shuffle_split
from t2jax.tasks.prompts import CODE_SYSTEM
from t2jax.tasks.sandbox import CallOutcome, SandboxLimits, run_function, run_tests

TEST_SUITES = ("base", "plus", "original")
_GROUND_TRUTH_FORMAT = 1
_GROUND_TRUTH_WALL_SECONDS = 600.0
_STARTUP_ALLOWANCE_SECONDS = 2.0
_ORIGINAL_TESTS_WALL_SECONDS = 10.0
# MBPP's asserts ran after the solution, in its namespace; the modules they use without
# importing them (`math.isclose`, `sys.maxsize`) are imported for them.
_MBPP_TEST_SETUP = "import math\nimport sys\n"


def ground_truth_cache_dir() -> pathlib.Path:
    """Where expected outputs of canonical solutions are cached (`T2JAX_CACHE` overrides)."""
    return cache_dir() / "code_ground_truth"


def default_workers() -> int:
    """Parallel sandboxes for batch scoring: half the CPUs, at least one (as evalplus)."""
    return max(1, (os.cpu_count() or 2) // 2)


class CodeTask(Task):
    """Shared machinery of the evalplus-based tasks.

    Args:
        tests: "base", "plus" or "original" (see the module docstring).
        workers: parallel sandboxes in `score_batch` and ground-truth computation.
        isolation: sandbox isolation ("auto", "namespaces", "process").
    """

    system_message = CODE_SYSTEM
    template = TEMPLATE_CODE
    dataset: str  # evalplus's dataset name: "mbpp" or "humaneval"
    data_path: str | tuple[str, ...]  # file inside the data directory (first existing wins)

    def __init__(self, tests: str = "base", workers: int | None = None, isolation: str = "auto"):
        if tests not in TEST_SUITES:
            raise ValueError(f"tests must be one of {TEST_SUITES}, got {tests!r}")
        self.tests = tests
        self.workers = workers or default_workers()
        self.isolation = isolation
        self._expected: dict[tuple[str, str, str], dict[str, list]] = {}
        self._key_locks: dict[tuple[str, str, str], threading.Lock] = {}
        self._expected_lock = threading.Lock()

    # -- data ----------------------------------------------------------------------------------

    def problems(self, data_dir: str | os.PathLike | None = None) -> list[Example]:
        """Every problem in file order, with inputs deserialized into `raw` (cached per file)."""
        path = data_file(self.data_path, data_dir).resolve()
        return list(_parsed_problems(type(self), path, path.stat().st_mtime_ns))

    def _example(self, record: dict, path: pathlib.Path) -> Example:
        raw = {
            **record,
            "base_input": self._inputs(record, "base_input"),
            "plus_input": self._inputs(record, "plus_input"),
            "source_file": str(path),
        }
        return Example(
            id=record["task_id"],
            question=self.instruction(record["prompt"]),
            answer=record["prompt"] + record["canonical_solution"],
            raw=raw,
        )

    def _inputs(self, record: dict, key: str) -> list[list[Any]]:
        return [list(arguments) for arguments in record[key]]

    # -- prompts and programs --------------------------------------------------------------

    @abc.abstractmethod
    def instruction(self, prompt: str) -> str:
        """The user turn built from the problem's prompt."""

    @abc.abstractmethod
    def program(self, example: Example, completion: str) -> str:
        """The program the official pipeline executes for a completion."""

    @abc.abstractmethod
    def original_tests(self, example: Example) -> tuple[str, str]:
        """(setup, tests): the problem's original asserts as trusted code for `run_tests`, and
        what they need defined first (the entry point itself is bound to the program's)."""

    # -- scoring -------------------------------------------------------------------------------

    def score(self, example: Example, completion: str) -> Score:
        """Builds the official program from the completion and runs the selected tests."""
        return self.check_program(example, self.program(example, completion))

    def score_batch(self, examples: Sequence[Example], completions: Sequence[str]) -> list[Score]:
        """Scores completions in `self.workers` parallel sandboxes (one process per program)."""
        if len(examples) != len(completions):
            raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self.score, examples, completions))

    def check_program(self, example: Example, program: str) -> Score:
        """Runs the selected test suite on a complete program (no fence cutting or sanitizing)."""
        if self.tests == "original":
            setup, tests = self.original_tests(example)
            result = run_tests(
                program,
                tests,
                example.raw["entry_point"],
                setup=setup,
                call_seconds=_ORIGINAL_TESTS_WALL_SECONDS,
                limits=SandboxLimits(wall_seconds=_ORIGINAL_TESTS_WALL_SECONDS),
                isolation=self.isolation,
            )
            passed = result.completed
            return Score(passed, program, "passed the original tests" if passed else result.reason)
        inputs, expected = self._suite(example)
        limits = rules.time_limits(expected["seconds"])
        checker = _OutputChecker(
            self.dataset, example.raw["entry_point"], inputs, expected, example.raw["atol"]
        )
        result = run_function(
            program,
            example.raw["entry_point"],
            inputs,
            limits,
            limits=SandboxLimits(wall_seconds=sum(limits) + 2 + _STARTUP_ALLOWANCE_SECONDS),
            stop=checker.stop,
            isolation=self.isolation,
        )
        if checker.failure is not None:
            return Score(False, program, checker.failure)
        if result.exec_error is not None or not result.completed:
            return Score(False, program, result.reason)
        return Score(True, program, f"passed all {len(inputs)} tests ({self.tests})")

    def _suite(self, example: Example) -> tuple[list[list[Any]], dict[str, list]]:
        base = self.expected_outputs(example, "base")
        if self.tests == "base":
            return example.raw["base_input"], base
        plus = self.expected_outputs(example, "plus")
        inputs = example.raw["base_input"] + example.raw["plus_input"]
        return inputs, {key: base[key] + plus[key] for key in ("outputs", "seconds")}

    # -- ground truth --------------------------------------------------------------------------

    def expected_outputs(self, example: Example, suite: str) -> dict[str, list]:
        """The canonical solution's outputs and run times on the "base" or "plus" inputs.

        Computed in the sandbox on first use, then cached in memory and on disk (one file per
        problem under `ground_truth_cache_dir()`, keyed by the data file's sha256).
        """
        key = (example.raw["source_file"], suite, example.id)
        with self._expected_lock:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._expected:
                self._expected[key] = self._load_or_compute(example, suite)
        return self._expected[key]

    def _load_or_compute(self, example: Example, suite: str) -> dict[str, list]:
        source = pathlib.Path(example.raw["source_file"])
        digest = _file_digest(source, source.stat().st_mtime_ns)
        folder = f"{self.name}-{digest}-v{_GROUND_TRUTH_FORMAT}"
        cache = ground_truth_cache_dir() / folder / suite / f"{example.id.replace('/', '_')}.json"
        if cache.is_file():
            stored = json.loads(cache.read_text())
            return {"outputs": decode_value(stored["outputs"]), "seconds": stored["seconds"]}
        entry = self._run_canonical(example, suite)
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(  # unique temporary: threads may race to fill the same entry
            cache,
            json.dumps({"outputs": encode_value(entry["outputs"]), "seconds": entry["seconds"]}),
        )
        return entry

    def _run_canonical(self, example: Example, suite: str) -> dict[str, list]:
        inputs = example.raw[f"{suite}_input"]
        result = run_function(
            example.answer,
            example.raw["entry_point"],
            inputs,
            [_GROUND_TRUTH_WALL_SECONDS] * len(inputs),
            limits=SandboxLimits(wall_seconds=_GROUND_TRUTH_WALL_SECONDS),
            deepcopy_inputs=True,
            isolation=self.isolation,
        )
        failures = [outcome.error for outcome in result.calls if outcome.error is not None]
        if not result.completed or failures:
            raise RuntimeError(
                f"canonical solution of {example.id} failed on its {suite} inputs: "
                f"{failures[:1] or result.reason}"
            )
        return {
            "outputs": [
                rules.reference_output(example.raw["entry_point"], self.dataset, outcome.value)
                for outcome in result.calls
            ],
            "seconds": [outcome.seconds for outcome in result.calls],
        }


@functools.lru_cache(maxsize=8)
def _file_digest(path: pathlib.Path, mtime_ns: int) -> str:
    del mtime_ns  # cache key only
    return file_sha256(path)[:16]


@functools.lru_cache(maxsize=8)
def _parsed_problems(task_class: type, path: pathlib.Path, mtime_ns: int) -> tuple[Example, ...]:
    del mtime_ns  # cache key only
    parser = task_class()  # parsing depends on the class only, not on the task's options
    return tuple(parser._example(record, path) for record in read_jsonl(path))


class _OutputChecker:
    """Compares each call's output with the expected one as it arrives; stops at the first miss."""

    def __init__(self, dataset, entry_point, inputs, expected, atol):
        self.dataset = dataset
        self.entry_point = entry_point
        self.inputs = inputs
        self.expected = expected["outputs"]
        self.atol = atol
        self.failure: str | None = None

    def stop(self, index: int, outcome: CallOutcome) -> bool:
        if outcome.error is not None:
            self.failure = f"test {index} raised {outcome.error}"
            return True
        if isinstance(outcome.value, np.ndarray) and not isinstance(
            self.expected[index], np.ndarray
        ):  # an array where none is expected (an empty one "matches" any float with allclose)
            self.failure = (
                f"test {index}: an array where {type(self.expected[index]).__name__} is expected"
            )
            return True
        passed, self.atol = rules.outputs_match(
            self.dataset,
            self.entry_point,
            self.inputs[index],
            outcome.value,
            self.expected[index],
            self.atol,
        )
        if not passed:
            self.failure = f"test {index}: wrong output {_short(outcome.value)}"
        return not passed


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


class MbppPlusTask(CodeTask):
    """MBPP+ v0.1.0, the paper's "MBPP-Pro" (399 problems). Splits: train (200) and valid (100),
    the official seed-16 shuffle of the first 300 problems; test (the last 99); all (399).
    Completions start after the prefilled fence opener and are sanitized before execution."""

    name = "mbpp"
    splits = ("train", "valid", "test", "all")
    dataset = "mbpp"
    data_path = ("mbppplus/MbppPlus-v0.1.0.jsonl.gz", "mbppplus/MbppPlus.jsonl")
    transfer_task = "humaneval"

    def _load(self, split: str, data_dir: str | os.PathLike | None) -> list[Example]:
        problems = self.problems(data_dir)
        if split == "all":
            return problems
        if split == "test":
            return problems[300:]
        train_indices, valid_indices = seeded_shuffle_split(300, 200, seed=16)
        return [problems[i] for i in (train_indices if split == "train" else valid_indices)]

    def _inputs(self, record: dict, key: str) -> list[list[Any]]:
        return rules.deserialize_mbpp_inputs(record["task_id"], record[key])

    def instruction(self, prompt: str) -> str:
        return rules.mbpp_instruction(prompt)

    def prefill(self, example: Example) -> str:
        return rules.PYTHON_FENCE

    def reference_completion(self, example: Example) -> str:
        """The canonical solution on the line after the prefilled fence opener, closing it;
        re-rendered with 4-space indents (`ast.unparse`), which the official sanitizer needs
        (it keeps only bodies containing "    return ")."""
        code = ast.unparse(ast.parse(example.raw["canonical_solution"]))
        return f"\n{code}\n```"

    def program(self, example: Example, completion: str) -> str:
        return rules.mbpp_solution(example.raw["prompt"], completion, example.raw["entry_point"])

    def original_tests(self, example: Example) -> tuple[str, str]:
        return _MBPP_TEST_SETUP, example.raw["assertion"]


class HumanEvalTask(CodeTask):
    """HumanEval (164 problems, the evalplus HumanEval+ v0.1.10 prompts). Split: test (= all).
    The prefill ends with the function signature and docstring; the completion is its body."""

    name = "humaneval"
    splits = ("test", "all")
    dataset = "humaneval"
    data_path = "humanevalplus/HumanEvalPlus-v0.1.10.jsonl.gz"

    def _load(self, split: str, data_dir: str | os.PathLike | None) -> list[Example]:
        problems = self.problems(data_dir)
        if self.tests != "original":
            return problems
        originals = {
            record["task_id"]: record["test"]
            for record in read_jsonl(data_file("humaneval/HumanEval.jsonl.gz", data_dir))
        }
        return [
            Example(p.id, p.question, p.answer, {**p.raw, "original_test": originals[p.id]})
            for p in problems
        ]

    def instruction(self, prompt: str) -> str:
        return rules.humaneval_instruction(prompt)

    def prefill(self, example: Example) -> str:
        return rules.humaneval_prefill(example.raw["prompt"])

    def program(self, example: Example, completion: str) -> str:
        return rules.humaneval_solution(example.raw["prompt"], completion)

    def original_tests(self, example: Example) -> tuple[str, str]:
        entry_point = example.raw["entry_point"]
        return example.raw["prompt"], f"{example.raw['original_test']}\ncheck({entry_point})"


__all__ = ["TEST_SUITES", "CodeTask", "HumanEvalTask", "MbppPlusTask"]
