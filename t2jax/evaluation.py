"""Batched evaluation of a generator on a task: per-sample JSONL, a summary JSON and a markdown
table (issue 4, "Evaluation command"; scoring as in spec §3.5).

    from t2jax.evaluation import evaluate
    summary = evaluate(task, task.load("test"), generate_fn, "runs/gsm8k", batch_size=32,
                       tokenizer=tokenizer, config={"model": "smollm2-135m-instruct"})

Records are appended to `samples.jsonl` (and flushed to disk) as each batch is scored, so a crash
loses at most the batch in flight; running again with the same `out_dir` skips the ids already
recorded (`resume=True`).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from t2jax.tasks import Example, Task, render_prompt, reward_of

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
TABLE_FILE = "summary.md"

GenerateFn = Callable[[list[str]], list[str]]


def standard_error(correct: int, total: int) -> float:
    """Binomial standard error of an accuracy: sqrt(p (1 - p) / n); 0 for an empty set."""
    if total == 0:
        return 0.0
    accuracy = correct / total
    return math.sqrt(accuracy * (1.0 - accuracy) / total)


def read_records(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Reads finished per-sample records by id, dropping a torn last line left by a crash (the
    file is truncated back to its last complete record so appends stay valid JSON lines)."""
    path = pathlib.Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(len(complete))
    records = {}
    for line in complete.splitlines():
        record = json.loads(line)
        records[record["id"]] = record
    return records


def _sample_record(example: Example, prompt: str, output: str, score) -> dict[str, Any]:
    return {
        "id": example.id,
        "prompt": prompt,
        "output": output,
        "gold": example.answer,
        "extracted": score.extracted,
        "correct": score.correct,
        "reward": reward_of(score),
        "reason": score.reason,
    }


def _append(path: pathlib.Path, records: list[dict[str, Any]]):
    with open(path, "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _summary(task: Task, records: list[dict[str, Any]], config: Mapping[str, Any], seconds: float):
    correct = sum(bool(record["correct"]) for record in records)
    total = len(records)
    return {
        "task": task.name,
        "n": total,
        "correct": correct,
        "accuracy": correct / total if total else 0.0,
        "standard_error": standard_error(correct, total),
        "seconds": seconds,
        "config": dict(config),
    }


def markdown_table(summary: Mapping[str, Any]) -> str:
    """A one-row markdown table of a summary (accuracy and standard error in percent)."""
    config = ", ".join(f"{key}={value}" for key, value in summary["config"].items()) or "-"
    return (
        "| task | n | correct | accuracy (%) | std. error (%) | config |\n"
        "|---|---:|---:|---:|---:|---|\n"
        f"| {summary['task']} | {summary['n']} | {summary['correct']} | "
        f"{100 * summary['accuracy']:.2f} | {100 * summary['standard_error']:.2f} | {config} |\n"
    )


def subsample(examples: Sequence[Example], size: int, seed: int = 0) -> list[Example]:
    """A seeded random subset of `size` examples, kept in their original order (all of them when
    `size` is at least their number)."""
    if size < 1:
        raise ValueError(f"sample size must be positive, got {size}")
    if size >= len(examples):
        return list(examples)
    chosen = np.random.default_rng(seed).choice(len(examples), size, replace=False)
    return [examples[i] for i in sorted(chosen)]


def evaluate(
    task: Task,
    examples: Sequence[Example],
    generate_fn: GenerateFn,
    out_dir: str | os.PathLike,
    batch_size: int = 16,
    *,
    prompt_fn: Callable[[Example], str] | None = None,
    tokenizer: Any = None,
    official_quirks: bool = False,
    config: Mapping[str, Any] | None = None,
    resume: bool = True,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Generates, scores and records a task's examples in batches.

    Args:
        task: the task whose `score_batch` judges the completions.
        examples: the items to evaluate (ids must be unique).
        generate_fn: maps a list of prompts to a list of completions (the text after the prompt,
            without the stop string), e.g. a wrapper around the t2jax sampler.
        out_dir: directory for `samples.jsonl`, `summary.json` and `summary.md` (created).
        batch_size: prompts per `generate_fn` call.
        prompt_fn: renders an example into a prompt; by default
            `render_prompt(task, example, tokenizer, official_quirks)`.
        tokenizer: needed when `prompt_fn` is not given.
        official_quirks: passed to `render_prompt` (default prompt only).
        config: run settings stored in the summary (model, expert, split, ...).
        resume: keep records already in `out_dir` and skip their ids; False starts afresh.
        show_progress: show a tqdm bar with the running accuracy.

    Returns:
        The summary: task, n, correct, accuracy, standard_error, seconds (spent in this call),
        config.
    """
    if prompt_fn is None:
        if tokenizer is None:
            raise ValueError("evaluate needs prompt_fn or a tokenizer to render prompts")

        def prompt_fn(example: Example) -> str:
            return render_prompt(task, example, tokenizer, official_quirks)

    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    ids = [example.id for example in examples]
    if len(set(ids)) != len(ids):
        raise ValueError("example ids must be unique")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples_path = out / SAMPLES_FILE
    if not resume:
        samples_path.unlink(missing_ok=True)
    wanted = set(ids)
    done = {i: r for i, r in read_records(samples_path).items() if i in wanted}
    pending = [example for example in examples if example.id not in done]
    start = time.monotonic()
    correct = sum(bool(record["correct"]) for record in done.values())
    with tqdm(
        total=len(examples), initial=len(done), desc=task.name, disable=not show_progress
    ) as bar:
        for offset in range(0, len(pending), batch_size):
            batch = pending[offset : offset + batch_size]
            prompts = [prompt_fn(example) for example in batch]
            outputs = list(generate_fn(prompts))
            if len(outputs) != len(batch):
                raise ValueError(f"generate_fn returned {len(outputs)} outputs for {len(batch)}")
            scores = task.score_batch(batch, outputs)
            records = [
                _sample_record(example, prompt, output, score)
                for example, prompt, output, score in zip(
                    batch, prompts, outputs, scores, strict=True
                )
            ]
            _append(samples_path, records)
            done.update((record["id"], record) for record in records)
            correct += sum(record["correct"] for record in records)
            bar.update(len(batch))
            bar.set_postfix(acc=f"{correct / len(done):.3f}")
    ordered = [done[i] for i in ids]
    summary = _summary(task, ordered, config or {}, time.monotonic() - start)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    (out / TABLE_FILE).write_text(markdown_table(summary))
    return summary


def evaluate_model(
    sampler: Any,
    task: Task,
    examples: Sequence[Example],
    out_dir: str | os.PathLike,
    rows_per_call: int = 16,
    max_new_tokens: int | None = None,
    *,
    official_quirks: bool = False,
    config: Mapping[str, Any] | None = None,
    resume: bool = True,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Greedy evaluation of a model on a task's examples (`t2jax eval`): `evaluate` with the
    completions of `sampler` (prompts rendered with its tokenizer).

    Args:
        sampler: a `t2jax.sampler.Sampler` of the model (e.g. `Sampler.for_model(loaded)`, or
            with an expert's weights).
        task: the task that renders, stops and scores.
        examples: the items to evaluate (ids must be unique).
        out_dir: directory of the records and summary (see `evaluate`).
        rows_per_call: prompts per sampler call.
        max_new_tokens: the decode budget; None takes the task's official one.
        official_quirks: render prompts exactly as the official code (see `render_prompt`).
        config: run settings stored in the summary.
        resume: keep records already in `out_dir` and skip their ids.
        show_progress: show a tqdm bar with the running accuracy.

    Returns:
        The summary `evaluate` returns.
    """
    budget = max_new_tokens or task.max_new_tokens

    def generate(prompts: list[str]) -> list[str]:
        generation = sampler.generate(
            prompts, max_new_tokens=budget, stop_strings=task.stop_strings
        )
        return generation.texts

    return evaluate(
        task,
        examples,
        generate,
        out_dir,
        rows_per_call,
        tokenizer=sampler.tokenizer,
        official_quirks=official_quirks,
        config=config,
        resume=resume,
        show_progress=show_progress,
    )
