"""Official system messages, user turns, prefills, the classification prompt, and rendering with
a model's chat template or the official Llama-3 / CODE_PROMPT formats (spec §3.2-3.4, §4.1)."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from t2jax.tasks import CLASSIFICATION_PROMPT, OFFICIAL_STOP_STRINGS, get_task, render_prompt
from t2jax.tasks.prompts import auto_prefix_text, render_code_prompt

# Written out independently of t2jax/tasks/prompts.py, as the official Python literal reads.
OFFICIAL_CLASSIFICATION_PROMPT = """
    # Analyze the given question and classify it into one of four categories: 'code', 'math', 'reasoning' or 'other'. Follow these guidelines:

    1. Code: Questions asking for programming solutions, functions, algorithms. Often includes specific programming terms, language syntax, or data structures.
    2. Math: Questions involving mathematical calculations, formulas, statistics. Often includes numbers, equations, or mathematical operations.
    3. Reasoning: Questions requiring logical thinking, application of scientific knowledge, or critical analysis of information. Often presents statements that need evaluation based on general understanding.\x20
    4. Other: Questions not clearly fit into above categories.

    Instructions:
    - Consider the primary focus, skills, and knowledge required to answer the question.
    - If a question spans multiple categories, choose the most dominant one.
    - Provide your final classification within \\boxed{} notation. Example: \\boxed{reasoning}

    Format your response as follows:
    Classification: \\boxed{category}
    """  # noqa: E501


def test_classification_prompt_is_byte_exact():
    assert CLASSIFICATION_PROMPT == OFFICIAL_CLASSIFICATION_PROMPT
    assert "understanding. \n" in CLASSIFICATION_PROMPT
    assert CLASSIFICATION_PROMPT.strip().startswith("# Analyze")


@pytest.mark.parametrize(
    ("name", "system", "max_new_tokens"),
    [
        (
            "gsm8k",
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n",
            512,
        ),
        (
            "arc_easy",
            "The following are multiple choice questions (with answers). Think step by step and "
            'then finish your answer with "the answer is (X)" where X is the correct letter '
            "choice.",
            512,
        ),
        (
            "math",
            "Solve the question below by reasoning step by step,and put the final answer within "
            "\\boxed{}.",
            1024,
        ),
        (
            "mbpp",
            "You are an exceptionally intelligent coding assistant that  consistently delivers "
            "accurate and reliable responses to user instructions.",
            512,
        ),
        ("cls", OFFICIAL_CLASSIFICATION_PROMPT, 1024),
    ],
)
def test_system_messages_and_generation_settings(name, system, max_new_tokens):
    task = get_task(name)
    example = task.load("test")[0]
    messages, _ = task.messages(example)
    assert messages == [
        {"role": "system", "content": system},
        {"role": "user", "content": example.question},
    ]
    assert task.max_new_tokens == max_new_tokens
    assert (
        task.stop_strings
        == OFFICIAL_STOP_STRINGS
        == (
            "Instruction:",
            "Instruction",
            "Response:",
            "Response",
        )
    )


def test_user_turns_and_prefills():
    mbpp = get_task("mbpp")
    problem = mbpp.load("all")[0]
    assert problem.question == (
        "Write a function to find the shared elements from the given two lists. Your code should "
        "satisfy the following assertion:\n```python\n"
        "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n```"
    )
    assert mbpp.messages(problem)[1] == "```python"
    humaneval = get_task("humaneval")
    first = humaneval.load("test")[0]
    stripped = first.raw["prompt"].strip()
    assert (
        first.question == f"Write a solution to the following problem:\n```python\n{stripped}\n```"
    )
    assert humaneval.messages(first)[1] == f"```python\n{stripped}"
    arc = get_task("arc_easy").load("train")[0]
    assert arc.question == (
        "Which factor will most likely cause a person to develop a fever?\nOptions:\n"
        "A. a leg muscle relaxing after exercise\nB. a bacterial population in the bloodstream\n"
        "C. several viral particles on the skin\nD. carbohydrates being digested in the stomach\n"
    )
    gsm8k = get_task("gsm8k")
    assert gsm8k.messages(gsm8k.load("test")[0])[1] == ""
    math_task = get_task("math")
    problem = math_task.load("test")[0]
    assert problem.question == problem.raw["problem"]


def _tokenizer(vocab_words, chat_template, bos=None):
    vocab = {word: index for index, word in enumerate(["[UNK]", *vocab_words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, vocab[bos])]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token=bos)
    tokenizer.chat_template = chat_template
    return tokenizer


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture
def chatml_tokenizer():
    return _tokenizer(["<|im_start|>", "<|im_end|>", "a"], CHATML)


@pytest.fixture
def llama3_tokenizer():
    template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    )
    return _tokenizer([*LLAMA3_SPECIALS, "a"], template, bos="<|begin_of_text|>")


def test_render_with_the_models_own_template(chatml_tokenizer):
    task = get_task("mbpp")
    example = task.load("test")[0]
    prompt = render_prompt(task, example, chatml_tokenizer)
    assert prompt == (
        f"<|im_start|>system\n{task.system_message}<|im_end|>\n"
        f"<|im_start|>user\n{example.question}<|im_end|>\n<|im_start|>assistant\n```python"
    )


def test_official_quirks_for_llama3(llama3_tokenizer):
    assert auto_prefix_text(llama3_tokenizer) == "<|begin_of_text|>"
    gsm8k = get_task("gsm8k")
    example = gsm8k.load("test")[0]
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    plain = (
        "<|begin_of_text|><|begin_of_text|>"  # template BOS + tokenizer BOS: the double BOS
        + header.format("system")
        + gsm8k.system_message.strip()
        + "<|eot_id|>"
        + header.format("user")
        + example.question.strip()
        + "<|eot_id|>"
        + header.format("assistant")
    )
    assert render_prompt(gsm8k, example, llama3_tokenizer, official_quirks=True) == plain
    arc = get_task("arc_challenge")
    arc_example = arc.load("test")[0]
    arc_prompt = render_prompt(arc, arc_example, llama3_tokenizer, official_quirks=True)
    assert arc_prompt.endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\nLet's think step by step"
    )
    assert arc_prompt.count("<|begin_of_text|>") == 2
    ids = llama3_tokenizer(arc_prompt, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [llama3_tokenizer.bos_token_id] * 2


def test_official_code_prompt(llama3_tokenizer, chatml_tokenizer):
    task = get_task("mbpp")
    example = task.load("test")[0]
    body = (
        f"{task.system_message.strip()}\n\n@@ Instruction:\n{example.question.strip()}\n\n"
        "@@ Response:```python"  # no newline between the generation prompt and the prefill
    )
    assert render_prompt(task, example, llama3_tokenizer, official_quirks=True) == (
        "<|begin_of_text|>" + body
    )
    assert render_prompt(task, example, chatml_tokenizer, official_quirks=True) == body


def test_official_quirks_for_other_models_use_their_template(chatml_tokenizer):
    task = get_task("arc_easy")
    example = task.load("test")[0]
    assert render_prompt(task, example, chatml_tokenizer, official_quirks=True) == render_prompt(
        task, example, chatml_tokenizer
    )


def test_code_prompt_with_an_assistant_turn():
    messages = [
        {"role": "system", "content": " S "},
        {"role": "user", "content": "U\n"},
        {"role": "assistant", "content": "```python"},
    ]
    assert render_code_prompt(messages) == "S\n\n@@ Instruction:\nU\n\n@@ Response:\n```python"
