"""`t2jax.evaluation.evaluate` with fake generators: records, summary, table, resume."""

import json
import math

import pytest

from t2jax.evaluation import evaluate, markdown_table, read_records, standard_error, subsample
from t2jax.tasks import get_task


@pytest.fixture(autouse=True)
def private_ground_truth_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("T2JAX_CACHE", str(tmp_path / "cache"))


def gsm8k_examples(count):
    return get_task("gsm8k").load("test")[:count]


def oracle_for(examples, right=lambda index: index % 2 == 0):
    answers = {example.question: (index, example.answer) for index, example in enumerate(examples)}

    def generate(prompts):
        outputs = []
        for prompt in prompts:
            index, gold = answers[prompt]
            outputs.append(f"So the total is {gold}." if right(index) else "I do not know.")
        return outputs

    return generate


def test_records_summary_and_table(tmp_path, capsys):
    examples = gsm8k_examples(10)
    summary = evaluate(
        get_task("gsm8k"),
        examples,
        oracle_for(examples),
        tmp_path,
        rows_per_call=3,
        prompt_fn=lambda example: example.question,
        config={"model": "fake"},
    )
    assert "acc=0.500" in capsys.readouterr().err  # the progress bar shows the running accuracy
    assert (summary["n"], summary["correct"], summary["accuracy"]) == (10, 5, 0.5)
    assert summary["standard_error"] == pytest.approx(math.sqrt(0.25 / 10))
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [record["id"] for record in records] == [example.id for example in examples]
    first = records[0]
    assert first["prompt"] == examples[0].question
    assert first["output"] == f"So the total is {examples[0].answer}."
    assert (first["extracted"], first["correct"], first["reward"]) == (
        examples[0].answer,
        True,
        1.0,
    )
    assert records[1]["reason"] == "no number in the completion"
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    table = (tmp_path / "summary.md").read_text()
    assert "| gsm8k | 10 | 5 | 50.00 | 15.81 | model=fake |" in table


def test_resume_after_a_crash_skips_finished_ids(tmp_path):
    examples = gsm8k_examples(7)
    oracle = oracle_for(examples, right=lambda index: True)
    calls = []

    def crash_on_second_batch(prompts):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return oracle(prompts)

    task = get_task("gsm8k")
    with pytest.raises(RuntimeError, match="device lost"):
        evaluate(
            task,
            examples,
            crash_on_second_batch,
            tmp_path,
            3,
            prompt_fn=lambda e: e.question,
            show_progress=False,
        )
    assert len(read_records(tmp_path / "samples.jsonl")) == 3
    with open(tmp_path / "samples.jsonl", "a") as handle:
        handle.write('{"id": "torn')  # a record cut short by the crash
    generated = []

    def record_prompts(prompts):
        generated.extend(prompts)
        return oracle(prompts)

    summary = evaluate(
        task,
        examples,
        record_prompts,
        tmp_path,
        3,
        prompt_fn=lambda e: e.question,
        show_progress=False,
    )
    assert generated == [example.question for example in examples[3:]]
    assert (summary["n"], summary["correct"]) == (7, 7)
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 7
    again = evaluate(
        task,
        examples,
        record_prompts,
        tmp_path,
        3,
        prompt_fn=lambda e: e.question,
        resume=False,
        show_progress=False,
    )
    assert again["n"] == 7 and len(generated) == 4 + 7


def test_code_task_through_evaluate(tmp_path):
    task = get_task("humaneval", workers=2)
    problems = task.load("test")[:3]
    bodies = {task.messages(p)[1]: p.raw["canonical_solution"] for p in problems}
    bodies[task.messages(problems[1])[1]] = "    return None\n```"

    summary = evaluate(
        task,
        problems,
        lambda prompts: [bodies[prompt] for prompt in prompts],
        tmp_path,
        2,
        prompt_fn=lambda problem: task.messages(problem)[1],
        show_progress=False,
    )
    assert (summary["n"], summary["correct"]) == (3, 2)
    records = read_records(tmp_path / "samples.jsonl")
    assert (
        records["HumanEval/1"]["reward"] == -1.0
        and "wrong output" in records["HumanEval/1"]["reason"]
    )


def test_argument_errors(tmp_path):
    task = get_task("gsm8k")
    examples = gsm8k_examples(2)
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate(task, examples, lambda prompts: prompts, tmp_path)
    with pytest.raises(ValueError, match="unique"):
        evaluate(task, examples * 2, lambda p: p, tmp_path, prompt_fn=lambda e: e.question)
    with pytest.raises(ValueError, match="outputs"):
        evaluate(
            task,
            examples,
            lambda p: p[:1],
            tmp_path,
            prompt_fn=lambda e: e.question,
            show_progress=False,
        )


def test_standard_error_and_table():
    assert standard_error(0, 0) == 0.0
    assert standard_error(1, 4) == pytest.approx(math.sqrt(0.1875 / 4))
    table = markdown_table(
        {
            "task": "t",
            "n": 4,
            "correct": 1,
            "accuracy": 0.25,
            "standard_error": 0.2165,
            "config": {},
        }
    )
    assert table.splitlines()[-1] == "| t | 4 | 1 | 25.00 | 21.65 | - |"


def test_subsample_is_seeded_ordered_and_bounded():
    items = list(range(100))
    first = subsample(items, 10, seed=3)
    assert first == subsample(items, 10, seed=3)
    assert first != subsample(items, 10, seed=4)
    assert first == sorted(first) and len(set(first)) == 10
    assert first != items[:10]
    assert subsample(items, 500) == items
    with pytest.raises(ValueError, match="positive"):
        subsample(items, 0)
