"""Hand-written extraction and scoring tables for GSM8K, ARC, MATH and cls, official quirks
included (spec §3.5, §4.1)."""

import pytest

from t2jax.tasks import Example, get_task, parse_category, reward_of
from t2jax.tasks.arc import extract_letter, format_question, seeded_guess
from t2jax.tasks.gsm8k import gold_answer, last_number
from t2jax.tasks.math_equiv import (
    SymbolicChecker,
    extract_answer,
    is_equiv,
    last_boxed,
    math_equal,
    remove_boxed,
    strip_string,
)


def never_symbolic(left, right):
    return False


# ---------------------------------------------------------------------------------------------
# GSM8K


@pytest.mark.parametrize(
    ("completion", "number"),
    [
        ("The answer is 72.", "72"),
        ("3 + 4 = 7, so 7 apples and 12 pears: 12", "12"),
        ("She pays $1,000 in total.", "000"),  # commas split numbers: official quirk
        ("The temperature is -3 degrees.", "3"),  # minus signs are ignored
        ("That is 0.5 of it", "0.5"),
        ("It costs .75 dollars", ".75"),
        ("no digits here", None),
    ],
)
def test_gsm8k_last_number(completion, number):
    assert last_number(completion) == number


@pytest.mark.parametrize(
    ("gold", "completion", "correct"),
    [
        ("72", "48 + 24 = 72 clips.", True),
        ("72", "The answer is 72.0", True),
        ("1000", "The total is 1,000 dollars.", False),  # "000" -> 0.0
        ("0", "The total is 1,000 dollars.", True),
        ("5", "I think 5, no wait, 6", False),
        ("3", "-3", True),
        ("18", "There is no number.", False),
    ],
)
def test_gsm8k_scoring(gold, completion, correct):
    example = Example(id="x", question="q", answer=gold)
    score = get_task("gsm8k").score(example, completion)
    assert score.correct is correct
    assert get_task("gsm8k").reward(example, completion) == (1.0 if correct else -1.0)
    assert score.reason


def test_gsm8k_gold_is_the_integer_after_the_marks():
    assert gold_answer("He has 3 + 4 = <<3+4=7>>7.\n#### 7") == 7
    assert gold_answer("#### 2.0") == 2


# ---------------------------------------------------------------------------------------------
# ARC


@pytest.mark.parametrize(
    ("completion", "letter"),
    [
        ("Step by step... the answer is (C).", "C"),
        ("the answer is B because", "B"),
        ("So the answer is (A) and not (B). Also the answer is (D)", "A"),  # first match wins
        ("The answer is (c)", None),  # lowercase is no letter; no standalone capital either
        ("Reasoning.\nAnswer: D\nMore text Answer: B", "D"),  # fallback 2: first line with it
        ("I pick option B over A, final: C is right", "C"),  # fallback 3: last standalone capital
        ("Carbon dioxide is needed", None),
        ("The answer is Carbon", "C"),  # official quirk: pattern 1 accepts any word starting A-J
    ],
)
def test_arc_extraction(completion, letter):
    assert extract_letter(completion) == letter


def test_arc_seeded_guess_is_fixed_per_option_count():
    assert [seeded_guess(n) for n in (3, 4, 5)] == ["C", "A", "A"]


def arc_example(answer, num_options=4):
    choices = [{"text": f"t{i}", "label": "ABCDE"[i]} for i in range(num_options)]
    return Example(id="a", question="q", answer=answer, raw={"question": {"choices": choices}})


@pytest.mark.parametrize(
    ("answer", "num_options", "completion", "correct", "extracted"),
    [
        ("C", 4, "the answer is (C)", True, "C"),
        ("C", 4, "the answer is (B)", False, "B"),
        ("A", 4, "no idea", True, None),  # seeded guess is A for 4 options
        ("B", 4, "no idea", False, None),
        ("C", 3, "no idea", True, None),  # seeded guess is C for 3 options
    ],
)
def test_arc_scoring(answer, num_options, completion, correct, extracted):
    score = get_task("arc_easy").score(arc_example(answer, num_options), completion)
    assert (score.correct, score.extracted) == (correct, extracted)


def test_arc_numeric_labels():
    record = next(e for e in get_task("arc_challenge").load("test") if e.raw["answerKey"] == "1")
    mapped = get_task("arc_challenge")
    official = get_task("arc_challenge", map_numeric_labels=False)
    official_example = next(e for e in official.load("test") if e.id == record.id)
    assert record.answer == "A" and mapped.score(record, "the answer is (A)").correct
    assert not official.score(official_example, "the answer is (A)").correct
    assert not official.score(official_example, "the answer is (1)").correct


def test_arc_question_format():
    assert format_question("Why?", ["x", "y"]) == "Why?\nOptions:\nA. x\nB. y\n"


# ---------------------------------------------------------------------------------------------
# MATH


@pytest.mark.parametrize(
    ("text", "boxed"),
    [
        ("so \\boxed{5}.", "\\boxed{5}"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\boxed{\\frac{1}{2}}"),
        (
            "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}",
            "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}",
        ),
        ("\\fbox{7}", "\\fbox{7}"),
        ("\\boxed{unclosed", None),
        ("nothing", None),
    ],
)
def test_math_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("... so $\\boxed{\\frac{3}{4}}$.", "\\frac{3}{4}"),
        ("The answer is: 42.\nExtra \\boxed{7}", "42"),  # the phrase beats the box
        ("The answer is: x = 3", "x = 3"),
        ("The answer is: 1. The answer is: 2.", "2"),  # the last phrase, one "." dropped
        ("\\fbox{7}", None),  # \fbox is found but remove_boxed only unwraps \boxed{
        ("no answer", None),
    ],
)
def test_math_extract_answer(completion, answer):
    assert extract_answer(completion) == answer
    assert remove_boxed("\\boxed{x}") == "x"


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("\\frac12", "\\frac{1}{2}"),
        ("0.5", "\\frac{1}{2}"),
        ("\\dfrac{3}{4}", "\\frac{3}{4}"),
        ("3/4", "\\frac{3}{4}"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("90^\\circ", "90"),
        ("\\$5.00", "5.00"),
        ("50\\%", "50"),
        ("10 \\text{ cm}", "10"),
        ("x = 5", "5"),
        ("\\sqrt2", "\\sqrt{2}"),
        (".5", "\\frac{1}{2}"),
        ("\\frac", "\\frac"),  # the official code crashes here; left unchanged
    ],
)
def test_math_strip_string(raw, normal):
    assert strip_string(raw) == normal


@pytest.mark.parametrize(
    ("gold", "prediction", "equal"),
    [
        ("\\frac12", "0.5", True),
        ("\\frac{1}{2}", "\\dfrac{1}{2}", True),
        ("0.25", "25", True),  # x100 accepted
        ("25", "0.25", True),  # /100 accepted
        ("0.5", "50", False),  # quirk: "0.5" becomes \frac{1}{2} first, so no percent match
        ("1000", "1,000", True),
        ("3.14159", "3.1416", True),  # rel_tol 1e-4
        ("3.14", "3.15", False),
        ("(1,2)", "(1, 2)", True),
        ("[1,2]", "(1,2)", False),  # mixed brackets do not match component-wise
        ("(1,2.0)", "(1, 2)", True),  # tuples compared component by component
        ("(1,\\frac12)", "(1,0.5)", False),  # components are not normalised again (official)
        ("10", "10 \\text{ cm}", True),
        (None, None, True),  # two missing answers count as equal (official)
        ("5", None, False),
        ("\\pi", "3", False),
    ],
)
def test_math_is_equiv_without_sympy(gold, prediction, equal):
    assert is_equiv(gold, prediction, never_symbolic) is equal


def test_math_equal_passes_its_arguments_to_the_symbolic_check():
    calls = []
    assert not math_equal("x+1", "1+x", lambda a, b: calls.append((a, b)) or False)
    assert calls == [("x+1", "1+x")]


@pytest.fixture(scope="module")
def sympy_check():
    checker = SymbolicChecker(timeout=5.0)
    yield checker
    checker.close()


@pytest.mark.parametrize(
    ("left", "right", "equal"),
    [
        ("x**2 - 1", "(x - 1)*(x + 1)", True),
        ("2*sqrt(2)", "sqrt(8)", True),
        ("1/3", "0.3333", True),  # N() within rel_tol 1e-3
        ("x + 1", "x + 2", False),
        ("\\frac{1}{2}", "1/2", False),  # LaTeX is not parsed (see math_equiv docstring)
        ("__import__('os').system('true')", "0", False),  # runs sandboxed: os.system refused
    ],
)
def test_symbolic_check_in_the_sandbox(sympy_check, left, right, equal):
    assert sympy_check(left, right) is equal


def test_symbolic_check_times_out_and_recovers():
    checker = SymbolicChecker(timeout=1.0)
    try:
        assert checker("sum(range(10**12))", "1") is False
        assert checker("2", "1 + 1") is True
    finally:
        checker.close()


def test_math_task_scoring(sympy_check):
    task = get_task("math", symbolic_equal=sympy_check)
    example = Example(id="m", question="q", answer="\\frac{1}{2}")
    assert task.score(example, "so $\\boxed{0.5}$").correct
    assert task.score(example, "The answer is: 1/2").correct
    wrong = task.score(example, "\\boxed{3}")
    assert (wrong.correct, wrong.extracted) == (False, "3")
    assert not task.score(example, "no box").correct
    polynomial = Example(id="p", question="q", answer="x**2+2*x+1")
    assert task.score(polynomial, "\\boxed{(x+1)**2}").correct
    implicit = Example(id="p", question="q", answer="x^2+2x+1")
    assert not task.score(implicit, "\\boxed{(x+1)**2}").correct  # parse_expr cannot read 2x


# ---------------------------------------------------------------------------------------------
# cls


@pytest.mark.parametrize(
    ("completion", "category"),
    [
        ("Classification: \\boxed{math}", "math"),
        ("\\boxed{code} or maybe \\boxed{math}", "code"),  # first box
        ("\\boxed{Reasoning}", "other"),  # case-sensitive
        ("\\boxed{history}", "other"),
        ("no box", "other"),
    ],
)
def test_dispatch_category(completion, category):
    assert parse_category(completion) == category


def test_cls_scoring():
    task = get_task("cls")
    example = Example(id="c", question="q", answer="reasoning")
    assert task.score(example, "Classification: \\boxed{reasoning}").correct
    score = task.score(example, "\\boxed{math}")
    assert (score.correct, score.extracted, reward_of(score)) == (False, "math", -1.0)


@pytest.mark.parametrize("name", ["gsm8k", "arc_easy", "mbpp", "cls"])
def test_reference_completions_get_full_marks_from_the_official_scorer(name):
    """The next-token training targets (spec section 2.5) are answers the task's own scorer
    accepts: every one of the first 50 training items (MBPP: run in the sandbox)."""
    task = get_task(name)
    examples = task.load("train")[:50]
    completions = [task.reference_completion(example) for example in examples]
    scores = task.score_batch(examples, completions)
    wrong = [(e.id, s.reason) for e, s in zip(examples, scores, strict=True) if not s.correct]
    assert not wrong
    assert all(score.extracted is not None for score in scores)


def test_tasks_without_reference_solutions_say_so():
    with pytest.raises(NotImplementedError, match="no reference solutions"):
        get_task("math").reference_completion(Example("m/0", "1+1?", "2"))
