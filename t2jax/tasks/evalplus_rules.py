"""The evalplus conventions the official code relies on for MBPP+ and HumanEval (spec §3.4, §3.5).

Reimplemented from their documented behaviour (no evalplus dependency), as of the evalplus commit
the official code pins (`1895d2f6`, a 0.3.0 development version between the 0.2.0 and 0.2.1
releases):

- prompts: the MBPP+ docstring becomes "<description>. Your code should satisfy the following
  assertion:" plus the first assert in a python fence, prefilled with the fence opener; HumanEval
  asks "Write a solution to the following problem:" and prefills the fence plus the prompt;
- completions are cut at the first ``` fence; MBPP+ solutions are then sanitized with evalplus's
  legacy sanitizer (`sanitize_solution`); HumanEval solutions are prompt + completion, unsanitized;
- tests are differential: the canonical solution's outputs on `base_input` (and `plus_input`)
  are the expected values; a candidate passes when every output matches (`outputs_match`),
  each call limited to max(0.2 s, 4 x the canonical solution's time).

Two oracle details changed around the pinned commit and cannot be pinned down exactly from public
sources; both follow evalplus 0.2.1: the MBPP "output is not None" tasks compare booleans directly,
and HumanEval/32's root check evaluates the polynomial at the returned point (0.2.0 had the
arguments swapped, failing every solution of that problem).
"""

from __future__ import annotations

import ast
import math
import re
from typing import Any

import numpy as np

MIN_TIME_LIMIT = 0.2
TIME_LIMIT_FACTOR = 4.0
FLOAT_ATOL = 1e-6

MBPP_OUTPUT_NOT_NONE = frozenset({"check_str", "text_match_three", "text_starta_endb"})
FENCE = "```"
PYTHON_FENCE = "```python"


# ---------------------------------------------------------------------------------------------
# Prompts.


def mbpp_instruction(prompt: str) -> str:
    """The MBPP+ user turn: the docstring's description and first assertion, reformatted."""
    docstring = prompt[prompt.index('"""') + 3 : prompt.rindex('"""')]
    assert_at = docstring.index("assert")
    description = docstring[:assert_at].strip()
    if not description.endswith("."):
        description += "."
    assertion = docstring[assert_at:].strip()
    return (
        f"{description} Your code should satisfy the following assertion:\n"
        f"{PYTHON_FENCE}\n{assertion}\n{FENCE}"
    )


def humaneval_instruction(prompt: str) -> str:
    """The HumanEval user turn: the stripped prompt in a python fence."""
    return f"Write a solution to the following problem:\n{PYTHON_FENCE}\n{prompt.strip()}\n{FENCE}"


def humaneval_prefill(prompt: str) -> str:
    """The HumanEval assistant prefill: the fence opener and the stripped prompt."""
    return f"{PYTHON_FENCE}\n{prompt.strip()}"


def cut_at_fence(completion: str) -> str:
    """The code part of a completion: everything before the first ``` (all of it if none)."""
    index = completion.find(FENCE)
    return completion if index == -1 else completion[:index]


# ---------------------------------------------------------------------------------------------
# Legacy evalplus sanitizer (MBPP only).


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, MemoryError, ValueError):
        return False
    return True


def _pad_three_space_indents(code: str) -> str:
    lines = []
    for line in code.splitlines():
        indent = len(line) - len(line.lstrip())
        lines.append((" " if indent == 3 else "") + line + "\n")
    return "".join(lines)


def _drop_top_level_junk(code: str, protected_prefix: str) -> str:
    """Drops unindented lines other than defs/imports; cuts everything from the first unindented
    line that starts with `\"\"\"`, `if` or `print`. The first line starting with
    `protected_prefix` is kept."""
    lines = code.splitlines()
    dropped: set[int] = set()
    protected_seen = False
    for index, line in enumerate(lines):
        if not protected_seen and line.startswith(protected_prefix):
            protected_seen = True
            continue
        if not line.strip() or line.startswith(("def ", "import ", "from ")):
            continue
        if len(line) == len(line.lstrip()):
            dropped.add(index)
        if line.rstrip().startswith(('"""', "if", "print")):
            dropped.update(range(index, len(lines)))
            break
    return "\n".join(line for index, line in enumerate(lines) if index not in dropped)


def sanitize_solution(code: str, entry_point: str) -> str:
    """evalplus's legacy sanitizer, applied by the official code to MBPP+ solutions.

    Keeps the fenced chunk that defines `entry_point`, keeps only the `def entry_point(` bodies
    that contain `    return `, normalises 3-space indents, removes unindented junk, and keeps
    the preamble plus every later def that is the entry point or parses on its own.
    """
    code = ("\n" + code).replace("\n```python\n", "\n```\n")
    definition = "def " + entry_point
    code = next((chunk for chunk in code.split("\n```\n") if definition in chunk), code)
    preamble, *bodies = re.split(rf"{definition}\s*\(", code)
    bodies = [body for body in bodies if "    return " in body.split("\ndef")[0]]
    opener = definition + "("
    code = opener + opener.join(bodies) if bodies else ""
    code = _drop_top_level_junk(_pad_three_space_indents(code), protected_prefix=opener)
    head, *functions = (preamble + code).split("\ndef ")
    kept = [head] + [
        function
        for function in functions
        if function.strip().startswith((entry_point + " ", entry_point + "("))
        or _parses("\ndef " + function)
    ]
    return "\ndef ".join(kept).strip()


def mbpp_solution(prompt: str, completion: str, entry_point: str) -> str:
    """The program evalplus runs for an MBPP+ completion (fence cut, then sanitized)."""
    return sanitize_solution(
        (prompt + "\n" + cut_at_fence(completion)).strip(), entry_point
    ).strip()


def humaneval_solution(prompt: str, completion: str) -> str:
    """The program evalplus runs for a HumanEval completion: prompt + fence-cut completion."""
    return prompt + cut_at_fence(completion)


# ---------------------------------------------------------------------------------------------
# MBPP+ input deserialization: JSON cannot hold tuples, sets or complex numbers.


def _tuples(argument):
    return tuple(argument)


def _list_of_tuples(argument):
    return [tuple(item) for item in argument]


def _tuple_of_tuples(argument):
    return tuple(tuple(item) for item in argument)


def _deep_tuples(value):
    return tuple(_deep_tuples(item) for item in value) if isinstance(value, list) else value


def _sets_or_empty_dicts(argument):
    # evalplus writes an empty literal `{}` (a dict) for empty sets; kept for fidelity.
    return [set(item) if isinstance(item, list) and item else {} for item in argument]


def _dict_of_tuples(argument):
    return {key: tuple(value) for key, value in argument.items()}


def _map_all(function):
    return lambda arguments: [function(argument) for argument in arguments]


def _map_first(function):
    return lambda arguments: [function(arguments[0]), *arguments[1:]]


_MBPP_INPUT_CONVERTERS: dict[int, Any] = {
    **dict.fromkeys(
        (
            2,
            116,
            132,
            143,
            222,
            261,
            273,
            394,
            399,
            421,
            424,
            429,
            470,
            560,
            579,
            596,
            616,
            630,
            726,
            740,
            744,
            809,
        ),
        _map_all(_tuples),
    ),
    **dict.fromkeys(
        (63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780),
        _map_all(_list_of_tuples),
    ),
    **dict.fromkeys((75, 413, 444, 753), _map_first(_list_of_tuples)),
    **dict.fromkeys(
        (106, 750), lambda arguments: [arguments[0], tuple(arguments[1]), *arguments[2:]]
    ),
    115: _map_first(_sets_or_empty_dicts),
    124: lambda arguments: [float(arguments[0]), complex(arguments[1])],
    **dict.fromkeys((250, 405, 446, 617, 720, 763, 808), _map_first(_tuples)),
    **dict.fromkeys((259, 401, 445), _map_all(_tuple_of_tuples)),
    278: _map_first(
        lambda argument: tuple(tuple(item) if isinstance(item, list) else item for item in argument)
    ),
    307: _map_first(_tuples),
    722: _map_first(_dict_of_tuples),
    252: lambda arguments: [complex(arguments[0])],
    **dict.fromkeys((580, 615, 791), lambda arguments: list(_deep_tuples(arguments))),
}


def deserialize_mbpp_inputs(task_id: str, inputs: list[list[Any]]) -> list[list[Any]]:
    """Restores the Python types of MBPP+ test inputs (tuples, sets, complex) by task number."""
    converter = _MBPP_INPUT_CONVERTERS.get(int(task_id.split("/")[-1]))
    return (
        [list(arguments) for arguments in inputs]
        if converter is None
        else [list(converter(arguments)) for arguments in inputs]
    )


# ---------------------------------------------------------------------------------------------
# Output comparison.


def time_limits(reference_seconds: list[float]) -> list[float]:
    """Per-call limits: max(0.2 s, 4 x the canonical solution's time on that input)."""
    return [max(MIN_TIME_LIMIT, TIME_LIMIT_FACTOR * seconds) for seconds in reference_seconds]


def is_floats(value: Any) -> bool:
    """A float, a list/tuple of floats, or a float numpy array (evalplus's float detection)."""
    if isinstance(value, float):
        return True
    if isinstance(value, (list, tuple)):
        return all(isinstance(item, float) for item in value)
    if isinstance(value, np.ndarray):
        return value.dtype in (np.float64, np.float32)
    return False


def _polynomial(coefficients: list, x: float) -> float:
    return sum(coefficient * math.pow(x, power) for power, coefficient in enumerate(coefficients))


def reference_output(entry_point: str, dataset: str, value: Any) -> Any:
    """The expected value evalplus stores for a canonical output (a bool for "not None" tasks)."""
    if dataset == "mbpp" and entry_point in MBPP_OUTPUT_NOT_NONE:
        return value is not None
    return value


def outputs_match(
    dataset: str, entry_point: str, arguments: list, output: Any, expected: Any, atol: float
) -> tuple[bool, float]:
    """evalplus's check of one output, including its special oracles.

    Returns:
        (passed, atol to use for the following inputs): evalplus raises atol to 1e-6 once it meets
        a float expected value and keeps it for the rest of the inputs.
    """
    try:
        exact = output == expected
        if dataset == "mbpp":
            if entry_point == "are_equivalent":
                exact = True
            elif entry_point == "sum_div":
                exact = exact or output == 0
            elif entry_point in MBPP_OUTPUT_NOT_NONE:
                exact = (
                    output == expected
                    if isinstance(output, bool)
                    else (expected == (output is not None))
                )
        if (
            dataset == "humaneval"
            and entry_point == "find_zero"
            and not (_polynomial(*arguments, output) <= atol)
        ):
            return False, atol
        if atol == 0 and is_floats(expected):
            atol = FLOAT_ATOL
        if not exact and atol != 0:
            np.testing.assert_allclose(output, expected, atol=atol)
            return True, atol
        return bool(exact), atol
    except Exception:  # any failure to compare is a failed test, as in evalplus
        return False, atol
