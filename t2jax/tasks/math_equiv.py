"""MATH answer extraction and equivalence, as the official evaluator does it (spec §3.5;
`fishfarm/tasks/competation_math.py`): Hendrycks's `_strip_string` normalisation, then a
`math_equal` that tries numbers (with x100 and /100), bracketed tuples component-wise, and a sympy
symbolic check, then plain string equality.

The sympy part parses model output with `parse_expr`, which evaluates Python, so it runs in a
sandboxed server (`SymbolicChecker`) with a per-check timeout; the official code ran it in-process
with no timeout. Notes on fidelity:

- the official code tried `parse_latex` before `parse_expr`. In its environment (hydra-core pins
  antlr4 4.9, sympy's LaTeX parser needs 4.11) that call raises and falls through, so only
  `parse_expr` is used here, which keeps results independent of whether antlr4 is installed;
- `_fix_fracs` and `_fix_sqrt` crash the official evaluator (IndexError) on a string ending in
  `\\frac` or `\\sqrt`; here such a string is left unchanged.
"""

from __future__ import annotations

import atexit
import functools
from collections.abc import Callable
from math import isclose

from t2jax.tasks.sandbox import SandboxServer

SymbolicEqual = Callable[[str, str], bool]


# ---------------------------------------------------------------------------------------------
# Extraction.


def last_boxed(text: str) -> str | None:
    """The last `\\boxed{...}` (else `\\fbox...`) in `text`, braces matched, or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for index in range(start, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[start : index + 1]
    return None


def remove_boxed(boxed: str | None) -> str | None:
    """The content of a `\\boxed{...}` string; None for anything else (including `\\fbox`)."""
    prefix = "\\boxed{"
    if boxed is None or not boxed.startswith(prefix) or not boxed.endswith("}"):
        return None
    return boxed[len(prefix) : -1]


def extract_answer(completion: str) -> str | None:
    """The official prediction: the text after the last "The answer is: " up to the first ".\\n"
    (one trailing period dropped) when that phrase occurs, else the last boxed content."""
    marker = "The answer is: "
    if marker not in completion:
        return remove_boxed(last_boxed(completion))
    answer = completion.split(marker)[-1].split(".\n")[0].strip()
    if answer.endswith("."):
        answer = answer[:-1]
    return answer.strip()


# ---------------------------------------------------------------------------------------------
# Hendrycks normalisation.


def _fix_fracs(text: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{2}` -> `\\frac{1}{2}`; other forms unchanged."""
    head, *tails = text.split("\\frac")
    rebuilt = head
    for tail in tails:
        rebuilt += "\\frac"
        if tail.startswith("{"):
            rebuilt += tail
        elif len(tail) < 2:
            return text
        elif tail[1] != "{":
            rebuilt += "{" + tail[0] + "}{" + tail[1] + "}" + tail[2:]
        else:
            rebuilt += "{" + tail[0] + "}" + tail[1:]
    return rebuilt


def _fix_a_slash_b(text: str) -> str:
    """`3/4` (two plain integers) -> `\\frac{3}{4}`."""
    parts = text.split("/")
    if len(parts) != 2:
        return text
    try:
        numerator, denominator = int(parts[0]), int(parts[1])
    except ValueError:
        return text
    if text != f"{numerator}/{denominator}":
        return text
    return "\\frac{" + parts[0] + "}{" + parts[1] + "}"


def _remove_right_units(text: str) -> str:
    """Drops a unit written as `\\text{ ...}`; more than one such unit is an error (as official)."""
    if "\\text{ " not in text:
        return text
    parts = text.split("\\text{ ")
    if len(parts) != 2:
        raise ValueError("more than one \\text{ unit")
    return parts[0]


def _fix_sqrt(text: str) -> str:
    """`\\sqrt3` -> `\\sqrt{3}`."""
    head, *tails = text.split("\\sqrt")
    return head + "".join(
        "\\sqrt" + (tail if tail.startswith("{") or not tail else "{" + tail[0] + "}" + tail[1:])
        for tail in tails
    )


def strip_string(text: str) -> str:
    """Hendrycks's `_strip_string`: the normal form two answers are compared in."""
    for old, new in (
        ("\n", ""),
        ("\\!", ""),
        ("\\\\", "\\"),
        ("tfrac", "frac"),
        ("dfrac", "frac"),
        ("\\left", ""),
        ("\\right", ""),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\$", ""),
    ):
        text = text.replace(old, new)
    text = _remove_right_units(text)
    text = text.replace("\\\\%", "").replace("\\%", "")
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        text = sides[1]
    text = _fix_fracs(_fix_sqrt(text).replace(" ", ""))
    if text == "0.5":
        text = "\\frac{1}{2}"
    return _fix_a_slash_b(text)


# ---------------------------------------------------------------------------------------------
# Equivalence.


def _is_number(value: object) -> bool:
    try:
        float(str(value).replace(",", ""))
    except ValueError:
        return False
    return True


def _numbers_equal(prediction: object, reference: object) -> bool:
    predicted = float(str(prediction).replace(",", ""))
    expected = float(str(reference).replace(",", ""))
    return any(
        isclose(candidate, predicted, rel_tol=1e-4)
        for candidate in (expected / 100, expected, expected * 100)
    )


def _strip_brackets(prediction: str, reference: str) -> tuple[str, str]:
    if (
        prediction.startswith("[") and prediction.endswith("]") and not reference.startswith("(")
    ) or (
        prediction.startswith("(") and prediction.endswith(")") and not reference.startswith("[")
    ):
        prediction, reference = prediction.strip("[]()"), reference.strip("[]()")
    for bracket in "{}()":
        prediction, reference = prediction.replace(bracket, ""), reference.replace(bracket, "")
    return prediction, reference


def _same_bracket_kind(prediction: str, reference: str) -> bool:
    return any(
        prediction.startswith(opening)
        and prediction.endswith(closing)
        and reference.startswith(opening)
        and reference.endswith(closing)
        for opening, closing in ("[]", "()")
    )


def math_equal(prediction: object, reference: object, symbolic_equal: SymbolicEqual) -> bool:
    """The official `math_equal`: numbers (percent-tolerant, rel_tol 1e-4), then bracket-stripped
    strings, then component-wise tuples/intervals, then `symbolic_equal`."""
    if _is_number(prediction) and _is_number(reference):
        return _numbers_equal(prediction, reference)
    if not prediction and prediction not in (0, False):
        return False
    reference, prediction = str(reference).strip(), str(prediction).strip()
    stripped_prediction, stripped_reference = _strip_brackets(prediction, reference)
    if stripped_prediction == stripped_reference:
        return True
    if _same_bracket_kind(prediction, reference):
        predicted_parts = prediction[1:-1].split(",")
        reference_parts = reference[1:-1].split(",")
        if len(predicted_parts) == len(reference_parts) and all(
            math_equal(p, r, symbolic_equal)
            for p, r in zip(predicted_parts, reference_parts, strict=True)
        ):
            return True
    return symbolic_equal(prediction, reference)


def is_equiv(gold: str | None, prediction: str | None, symbolic_equal: SymbolicEqual) -> bool:
    """The official `is_equiv(gold, prediction)`: both normalised, then `math_equal` (with the
    gold in the "prediction" slot, as the official call order has it) or string equality. Two
    missing answers count as equivalent, as in the official code."""
    if gold is None or prediction is None:
        return gold is None and prediction is None
    try:
        gold_normal, prediction_normal = strip_string(gold), strip_string(prediction)
    except ValueError:
        gold_normal, prediction_normal = gold, prediction
    return (
        math_equal(gold_normal, prediction_normal, symbolic_equal)
        or gold_normal == prediction_normal
    )


# ---------------------------------------------------------------------------------------------
# The sandboxed sympy check.

_SYMPY_SERVER_SETUP = """
from math import isclose

from sympy import N, simplify
from sympy.parsing.sympy_parser import parse_expr


def parse(text):
    try:
        return parse_expr(text)
    except Exception:
        return text


def handle(payload):
    left, right = parse(payload["a"]), parse(payload["b"])
    try:
        if simplify(left - right) == 0:
            return True
    except Exception:
        pass
    try:
        if isclose(N(left), N(right), rel_tol=1e-3):
            return True
    except Exception:
        pass
    return False
"""


class SymbolicChecker:
    """The official `symbolic_equal` (sympy `parse_expr`, `simplify(a - b) == 0`, or `N()` values
    within rel_tol 1e-3), run in a `SandboxServer`. A check that errors or exceeds `timeout`
    seconds counts as "not equal"."""

    def __init__(self, timeout: float = 5.0):
        self._server = SandboxServer(_SYMPY_SERVER_SETUP, request_timeout=timeout)

    def __call__(self, left: str, right: str) -> bool:
        outcome = self._server.call({"a": left, "b": right})
        return outcome.error is None and outcome.value is True

    def close(self):
        """Stops the sandboxed sympy server."""
        self._server.close()


@functools.cache
def shared_symbolic_checker() -> SymbolicChecker:
    """One process-wide checker, closed at interpreter exit."""
    checker = SymbolicChecker()
    atexit.register(checker.close)
    return checker
