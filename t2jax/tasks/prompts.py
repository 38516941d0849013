"""Official prompt texts and prompt rendering (spec §3.2-3.4 and §4.1).

The system messages are verbatim, quirks included (the double space in the code message, the
missing space after the comma in MATH's, GSM8K's two trailing newlines, the classification prompt's
indentation and trailing space). `render_prompt` turns a task example into the exact text the
model continues.
"""

from __future__ import annotations

from typing import Any

from t2jax.tasks.base import TEMPLATE_CODE, TEMPLATE_COT, Example, Messages, Task

GSM8K_SYSTEM = (
    "Below is an instruction that describes a task."
    " Write a response that appropriately completes the request.\n\n"
)
ARC_SYSTEM = (
    "The following are multiple choice questions (with answers). "
    "Think step by step and then finish your answer "
    'with "the answer is (X)" where X is the correct letter choice.'
)
MATH_SYSTEM = (
    "Solve the question below by reasoning step by step,and put the final answer within \\boxed{}."
)
CODE_SYSTEM = (
    "You are an exceptionally intelligent coding assistant that "
    " consistently delivers accurate and reliable responses to user "
    "instructions."
)

_CLASSIFICATION_LINES = (
    "# Analyze the given question and classify it into one of four categories: 'code', 'math', "
    "'reasoning' or 'other'. Follow these guidelines:",
    "",
    "1. Code: Questions asking for programming solutions, functions, algorithms. Often includes "
    "specific programming terms, language syntax, or data structures.",
    "2. Math: Questions involving mathematical calculations, formulas, statistics. Often includes "
    "numbers, equations, or mathematical operations.",
    "3. Reasoning: Questions requiring logical thinking, application of scientific knowledge, or "
    "critical analysis of information. Often presents statements that need evaluation based on "
    "general understanding. ",
    "4. Other: Questions not clearly fit into above categories.",
    "",
    "Instructions:",
    "- Consider the primary focus, skills, and knowledge required to answer the question.",
    "- If a question spans multiple categories, choose the most dominant one.",
    "- Provide your final classification within \\boxed{} notation. Example: \\boxed{reasoning}",
    "",
    "Format your response as follows:",
    "Classification: \\boxed{category}",
)
# The official Python literal opens with a newline, indents every non-empty line by four spaces
# and closes with a newline and four spaces (`utils.py:166-181`, `tasks/cls.py:110-125`).
CLASSIFICATION_PROMPT = (
    "\n" + "".join(f"    {line}\n" if line else "\n" for line in _CLASSIFICATION_LINES) + "    "
)

_LLAMA3_HEADER = "<|start_header_id|>{role}<|end_header_id|>\n\n"
_LLAMA3_EOT = "<|eot_id|>"
_COT_SUFFIX = "Let's think step by step"


def render_code_prompt(messages: Messages) -> str:
    """The official CODE_PROMPT format (no special tokens; spec §3.2).

    System text (stripped) and a blank line, then `@@ Instruction:` turns and `@@ Response:` turns;
    when the last message is the user's, the generation prompt `@@ Response:` follows.
    """
    text = ""
    turns = messages
    if messages and messages[0]["role"] == "system":
        text = messages[0]["content"].strip() + "\n\n"
        turns = messages[1:]
    for message in turns:
        if message["role"] == "user":
            text += "@@ Instruction:\n" + message["content"].strip() + "\n\n"
        elif message["role"] == "assistant":
            text += "@@ Response:\n" + message["content"].strip()
    if turns and turns[-1]["role"] == "user":
        text += "@@ Response:"
    return text


def render_llama3(messages: Messages, bos_token: str, chain_of_thought: bool) -> str:
    """The official Llama-3 "plain" template, or its CoT variant (spec §3.2).

    BOS as text, then per message the header, the stripped content and `<|eot_id|>`; then the
    assistant header, followed by "Let's think step by step" (no newline) for the CoT variant.
    """
    body = "".join(
        _LLAMA3_HEADER.format(role=message["role"]) + message["content"].strip() + _LLAMA3_EOT
        for message in messages
    )
    suffix = _COT_SUFFIX if chain_of_thought else ""
    return bos_token + body + _LLAMA3_HEADER.format(role="assistant") + suffix


def is_llama3_tokenizer(tokenizer: Any) -> bool:
    """Whether a tokenizer has Llama-3's header tokens (the official Llama templates apply)."""
    return "<|start_header_id|>" in tokenizer.get_vocab()


def auto_prefix_text(tokenizer: Any) -> str:
    """The special tokens the tokenizer prepends by default (e.g. BOS), as text.

    The official pipeline renders the prompt as text and then tokenizes it with the default
    `add_special_tokens=True`, so this prefix lands in front of whatever the template produced.
    """
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    prefix_length = next(
        (
            start
            for start in range(len(with_special) - len(without) + 1)
            if with_special[start : start + len(without)] == without
        ),
        0,
    )
    return tokenizer.decode(with_special[:prefix_length], skip_special_tokens=False)


def _official_text(task: Task, messages: Messages, tokenizer: Any) -> str:
    if task.template == TEMPLATE_CODE:
        body = render_code_prompt(messages)
    elif is_llama3_tokenizer(tokenizer):
        body = render_llama3(messages, tokenizer.bos_token or "", task.template == TEMPLATE_COT)
    else:
        # The official code has no template of its own for other models (Mistral: `None`).
        body = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return auto_prefix_text(tokenizer) + body


def render_prompt(
    task: Task, example: Example, tokenizer: Any, official_quirks: bool = False
) -> str:
    """Renders the full prompt text that the model continues, assistant prefill included.

    The result is meant to be tokenized with `add_special_tokens=False`: every special token is
    already in the text.

    Args:
        task: the task whose `messages` (system, user, prefill) are rendered.
        example: the item to render.
        tokenizer: a transformers tokenizer (`apply_chat_template`, `bos_token`, `get_vocab`).
        official_quirks: False renders with the model's own chat template
            (`apply_chat_template(..., add_generation_prompt=True)`) plus the prefill. True
            reproduces the official pipeline byte for byte: CODE_PROMPT for code tasks (every
            model), the Llama-3 plain or CoT templates for Llama-3 tokenizers (BOS as text plus
            the BOS the tokenizer adds: the double BOS; "Let's think step by step" for ARC), the
            tokenizer's own template otherwise, and the prefill appended with no separator
            (e.g. `@@ Response:` directly followed by the fence opener for MBPP).
    """
    messages, prefill = task.messages(example)
    if official_quirks:
        return _official_text(task, messages, tokenizer) + prefill
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return rendered + prefill


def render_chat(tokenizer: Any, user: str, system: str | None = None) -> str:
    """A free user message (and optional system message) rendered with the model's chat
    template, ready for generation (no task: `t2jax generate --chat`, `t2jax adapt --prompt`)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
