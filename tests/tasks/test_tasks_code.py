"""Code tasks: sanitizer, MBPP+ input types, evalplus output checks, and every canonical solution
of HumanEval (164) and MBPP+ (399) passing in the sandbox while wrong programs fail (spec §3.5)."""

import concurrent.futures

import numpy as np
import pytest

from t2jax.tasks import evalplus_rules as rules
from t2jax.tasks import get_task

WORKERS = 2


@pytest.fixture(scope="module", autouse=True)
def private_ground_truth_cache(tmp_path_factory):
    """Ground truth is recomputed from the canonical solutions, not read from a user cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("T2JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def check_all(task, examples, programs):
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(task.check_program, examples, programs))


@pytest.mark.parametrize("name", ["humaneval", "mbpp"])
def test_every_canonical_solution_passes_and_wrong_programs_fail(name):
    task = get_task(name, workers=WORKERS)
    problems = task.load("all")
    scores = check_all(task, problems, [problem.answer for problem in problems])
    failures = [(p.id, s.reason) for p, s in zip(problems, scores, strict=True) if not s.correct]
    assert failures == []
    assert len(scores) == {"humaneval": 164, "mbpp": 399}[name]
    # Every fifth problem again, with the entry point replaced by one returning a fresh object.
    accept_anything = {"are_equivalent", *rules.MBPP_OUTPUT_NOT_NONE}
    wrong = [p for p in problems[::5] if p.raw["entry_point"] not in accept_anything]
    programs = [
        f"{p.answer}\ndef {p.raw['entry_point']}(*args, **kwargs):\n    return object()\n"
        for p in wrong
    ]
    assert not any(score.correct for score in check_all(task, wrong, programs))


def test_scoring_a_model_completion_end_to_end():
    mbpp = get_task("mbpp")
    problem = mbpp.load("all")[0]
    completion = (
        "\ndef similar_elements(a, b):\n    return tuple(set(a) & set(b))\n```\n"
        "This uses set intersection. Response: done"
    )
    score = mbpp.score(problem, completion)
    assert score.correct, score.reason
    assert score.extracted.endswith("return tuple(set(a) & set(b))")
    assert mbpp.reward(problem, completion) == 1.0
    wrong = mbpp.score(problem, "\ndef similar_elements(a, b):\n    return tuple(a)\n```")
    assert not wrong.correct and "wrong output" in wrong.reason
    humaneval = get_task("humaneval")
    first = humaneval.load("test")[0]
    assert humaneval.score(first, first.raw["canonical_solution"] + "```\nexplanation").correct
    assert not humaneval.score(first, "    return True\n```").correct


def test_batch_scoring_matches_single_scoring():
    task = get_task("humaneval", workers=WORKERS)
    problems = task.load("test")[:4]
    completions = [p.raw["canonical_solution"] for p in problems[:2]] + ["    pass\n"] * 2
    assert [s.correct for s in task.score_batch(problems, completions)] == [
        True,
        True,
        False,
        False,
    ]
    with pytest.raises(ValueError, match="completions"):
        task.score_batch(problems, completions[:1])


def test_plus_tests_catch_what_base_tests_miss():
    problem = get_task("mbpp").load("all")[0]  # Mbpp/2; the plus inputs include empty tuples
    fragile = problem.answer.replace(
        "return tuple(set(test_tup1) & set(test_tup2))",
        "return tuple(set(test_tup1) & set(test_tup2)) if test_tup1 else None",
    )
    assert get_task("mbpp").check_program(problem, fragile).correct
    assert get_task("mbpp", tests="plus").check_program(problem, problem.answer).correct
    plus = get_task("mbpp", tests="plus").check_program(problem, fragile)
    assert not plus.correct and "wrong output None" in plus.reason


@pytest.mark.parametrize("name", ["humaneval", "mbpp"])
def test_original_asserts(name):
    task = get_task(name, tests="original")
    problems = task.load("all")[:6]
    assert all(s.correct for s in check_all(task, problems, [p.answer for p in problems]))
    broken = [p.answer + f"\n{p.raw['entry_point']} = lambda *args: None\n" for p in problems]
    assert not any(s.correct for s in check_all(task, problems, broken))


# ---------------------------------------------------------------------------------------------
# Sanitizer, prompts, inputs, output checks.

PROMPT = '"""\nWrite a function f.\nassert f(1) == 2\n"""\n'


@pytest.mark.parametrize(
    ("completion", "program"),
    [
        (  # trailing prints and prose after the function are removed
            "\ndef f(x):\n    return x + 1\n\nprint(f(1))\nmore",
            PROMPT.strip() + "\n\n\ndef f(x):\n    return x + 1",
        ),
        (  # helpers and imports before the function are kept, prose after it is not
            "\nimport math\n\ndef g(x):\n    return x\n\ndef f(x):\n    return g(x) + 1\nDone.",
            PROMPT.strip() + "\n\n\nimport math\n\ndef g(x):\n    return x\n\ndef f(x):\n"
            "    return g(x) + 1",
        ),
        (  # everything after the first fence is ignored
            "\ndef f(x):\n    return x + 1\n```\n```python\ndef f(x):\n    return 0\n```",
            PROMPT.strip() + "\n\n\ndef f(x):\n    return x + 1",
        ),
        (  # a body without a 4-space `return ` is dropped (evalplus quirk)
            "\ndef f(x):\n  return x + 1\n",
            PROMPT.strip(),
        ),
        (  # an `if __name__` block ends the program
            "\ndef f(x):\n    return x + 1\n\nif __name__ == '__main__':\n    f(1)\n",
            PROMPT.strip() + "\n\n\ndef f(x):\n    return x + 1",
        ),
    ],
)
def test_mbpp_sanitizer(completion, program):
    assert rules.mbpp_solution(PROMPT, completion, "f") == program


def test_fence_cutting_and_humaneval_program():
    assert rules.cut_at_fence("a\n```\nb") == "a\n"
    assert rules.cut_at_fence("no fence") == "no fence"
    prompt = "def f():\n    '''doc'''\n"
    assert rules.humaneval_solution(prompt, "    return 1\n```\nwhy") == prompt + "    return 1\n"


def test_mbpp_instruction_appends_a_period():
    prompt = '"""\nWrite a function to add one\nassert add_one(1) == 2\n"""\n'
    assert rules.mbpp_instruction(prompt).startswith("Write a function to add one. Your code")


def test_mbpp_inputs_get_their_python_types_back():
    problems = {p.id: p for p in get_task("mbpp").load("all")}
    assert problems["Mbpp/2"].raw["base_input"][0] == [(3, 4, 5, 6), (5, 7, 4, 10)]
    assert isinstance(problems["Mbpp/124"].raw["base_input"][0][1], complex)
    assert problems["Mbpp/63"].raw["base_input"][0][0][0] == (3, 5)
    assert rules.deserialize_mbpp_inputs("Mbpp/115", [[[[1], []]]]) == [[[{1}, {}]]]
    assert rules.deserialize_mbpp_inputs("Mbpp/580", [[[1, [2, 3]], 4]]) == [[(1, (2, 3)), 4]]
    assert rules.deserialize_mbpp_inputs("Mbpp/3", [[1, 2]]) == [[1, 2]]


@pytest.mark.parametrize(
    ("dataset", "entry_point", "arguments", "output", "expected", "atol", "passed"),
    [
        ("mbpp", "f", [1], (1, 2), (1, 2), 0, True),
        ("mbpp", "f", [1], [1, 2], (1, 2), 0, False),  # a list is not a tuple
        ("mbpp", "f", [1], 0.1 + 0.2, 0.3, 0, True),  # float outputs get atol 1e-6
        ("mbpp", "f", [1], 0.3001, 0.3, 0, False),
        ("mbpp", "f", [1], [0.1 + 0.2, 1.0], [0.3, 1.0], 0, True),
        ("mbpp", "f", [1], "0.3", 0.3, 0, False),
        ("mbpp", "are_equivalent", [1, 2], "anything", True, 0, True),
        ("mbpp", "sum_div", [8], 0, 7, 0, True),
        ("mbpp", "sum_div", [8], 6, 7, 0, False),
        ("mbpp", "check_str", ["a"], "a match object", True, 0, True),
        ("mbpp", "check_str", ["a"], None, True, 0, False),
        ("mbpp", "check_str", ["b"], False, False, 0, True),
        ("humaneval", "find_zero", [[-6, 11, -6, 1]], 1.0, 1.0000001, 1e-4, True),
        ("humaneval", "find_zero", [[-6, 11, -6, 1]], 5.0, 1.0, 1e-4, False),
        ("humaneval", "f", [1], np.array([1.0, 2.0]), [1.0, 2.0], 0, False),  # ambiguous truth
    ],
)
def test_outputs_match(dataset, entry_point, arguments, output, expected, atol, passed):
    assert rules.outputs_match(dataset, entry_point, arguments, output, expected, atol)[0] is passed


def test_float_tolerance_sticks_to_later_inputs():
    _, atol = rules.outputs_match("mbpp", "f", [1], 0.5, 0.5, 0)
    assert atol == rules.FLOAT_ATOL
    assert rules.outputs_match("mbpp", "f", [1], [1, 2.0000001], [1, 2], atol)[0]


def test_time_limits():
    assert rules.time_limits([0.0, 0.1]) == [0.2, 0.4]
