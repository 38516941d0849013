"""Scored runs on disk, one schema for evaluation, training and adaptation (issue 4, "Evaluation
command"; scoring as in spec §3.5), and batched evaluation of a generator on a task.

A run directory holds `samples.jsonl` (one record per item: id, prompt, output, any extra fields
such as route / category / classification, then gold, extracted, correct, reward, reason;
`sample_record`), `summary.json` (task, n, correct, accuracy, standard_error, seconds, config,
plus extra fields; `run_summary`) and `summary.md` (a markdown table of the summary).

    from t2jax.evaluation import evaluate
    summary = evaluate(task, task.load("test"), generate_fn, "runs/gsm8k", rows_per_call=32,
                       tokenizer=tokenizer, config={"model": "smollm2-135m-instruct"})

`evaluate` appends records to `samples.jsonl` (and flushes them to disk) as each batch is scored,
so a crash loses at most the batch in flight; running again with the same `out_dir` skips the ids
already recorded (`resume=True`). Callers that score a whole run at once write it with
`write_run`; `paired_comparison` compares two runs item by item (`paired_difference`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from t2jax import files
from t2jax.tasks import Example, Score, Task, render_prompt, reward_of

if TYPE_CHECKING:  # a type only: the sampler sits beside this module, not below it
    from t2jax.sampler import Sampler

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


ANONYMOUS_PREFIX = "item-"


def anonymous_id(item_id: str) -> str:
    """An item's id as records meant to be committed keep it: a hash, so that they name no
    benchmark item yet pair the same item across runs; an id already anonymous is kept."""
    if item_id.startswith(ANONYMOUS_PREFIX):
        return item_id
    return ANONYMOUS_PREFIX + hashlib.sha256(item_id.encode()).hexdigest()[:16]


def sample_record(
    example: Example, prompt: str, output: str, score: Score | None = None, **extra: Any
) -> dict[str, Any]:
    """The record of one item: id, prompt, output, the `extra` fields, then (when scored) gold,
    extracted, correct, reward (`t2jax.tasks.reward_of`) and reason."""
    record = {"id": example.id, "prompt": prompt, "output": output, **extra}
    if score is not None:
        record.update(
            gold=example.answer,
            extracted=score.extracted,
            correct=score.correct,
            reward=reward_of(score),
            reason=score.reason,
        )
    return record


def append_records(path: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> None:
    """Appends records as JSON lines and flushes them to disk before returning."""
    with open(path, "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def score_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """correct, accuracy and its standard error over scored records."""
    correct = sum(bool(record["correct"]) for record in records)
    total = len(records)
    return {
        "correct": correct,
        "accuracy": correct / total if total else 0.0,
        "standard_error": standard_error(correct, total),
    }


def run_summary(
    task_name: str,
    records: Sequence[Mapping[str, Any]],
    *,
    seconds: float,
    config: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The summary of a scored run: task, n, correct, accuracy, standard_error, seconds, config,
    then the `extra` fields."""
    return {
        "task": task_name,
        "n": len(records),
        **score_summary(records),
        "seconds": seconds,
        "config": dict(config or {}),
        **extra,
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
    rows_per_call: int = 16,
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
        rows_per_call: prompts per `generate_fn` call.
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

    if rows_per_call < 1:
        raise ValueError(f"rows_per_call must be positive, got {rows_per_call}")
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
        for offset in range(0, len(pending), rows_per_call):
            batch = pending[offset : offset + rows_per_call]
            prompts = [prompt_fn(example) for example in batch]
            outputs = list(generate_fn(prompts))
            if len(outputs) != len(batch):
                raise ValueError(f"generate_fn returned {len(outputs)} outputs for {len(batch)}")
            scores = task.score_batch(batch, outputs)
            records = [
                sample_record(example, prompt, output, score)
                for example, prompt, output, score in zip(
                    batch, prompts, outputs, scores, strict=True
                )
            ]
            append_records(samples_path, records)
            done.update((record["id"], record) for record in records)
            correct += sum(record["correct"] for record in records)
            bar.update(len(batch))
            bar.set_postfix(acc=f"{correct / len(done):.3f}")
    ordered = [done[i] for i in ids]
    summary = run_summary(task.name, ordered, seconds=time.monotonic() - start, config=config)
    write_summary(out, summary)
    return summary


def write_summary(
    out_dir: str | os.PathLike,
    summary: Mapping[str, Any],
    table: Callable[[Mapping[str, Any]], str] = markdown_table,
) -> None:
    """Writes summary.json and summary.md (`table(summary)`) to `out_dir`, each atomically."""
    out = pathlib.Path(out_dir)
    files.write_text_atomically(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    files.write_text_atomically(out / TABLE_FILE, table(summary))


def write_run(
    out_dir: str | os.PathLike,
    records: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    table: Callable[[Mapping[str, Any]], str] = markdown_table,
) -> None:
    """Writes a whole scored run to `out_dir` (created): samples.jsonl (atomically replacing any
    earlier records), then summary.json and summary.md (see `write_summary`)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files.write_atomically(out / SAMPLES_FILE, lambda temporary: append_records(temporary, records))
    write_summary(out, summary, table)


def paired_comparison(
    base_dir: str | os.PathLike, other_dir: str | os.PathLike
) -> dict[str, float] | None:
    """`paired_difference` of the records two run directories hold; None when they share no
    item (e.g. records missing on processes that do not write)."""
    base = read_records(pathlib.Path(base_dir) / SAMPLES_FILE)
    other = read_records(pathlib.Path(other_dir) / SAMPLES_FILE)
    return paired_difference(base, other)


def paired_difference(
    base: Mapping[str, Mapping[str, Any]], other: Mapping[str, Mapping[str, Any]]
) -> dict[str, float] | None:
    """Accuracy difference (other - base) on the items two sets of scored records (by id) share,
    with the standard error of the paired per-item difference (`paired_statistics`), and both
    accuracies counting only completions with an extracted answer (no fallback guesses); None
    when they share no item."""
    shared = sorted(set(base) & set(other))
    if not shared:
        return None

    def answered_accuracy(records):
        return float(
            np.mean([records[i]["correct"] and records[i]["extracted"] is not None for i in shared])
        )

    statistics = paired_statistics(
        [base[i]["correct"] for i in shared], [other[i]["correct"] for i in shared]
    )
    return {
        **statistics,
        "base_answered_accuracy": answered_accuracy(base),
        "answered_accuracy": answered_accuracy(other),
    }


def paired_statistics(
    base_correct: Sequence[float], other_correct: Sequence[float]
) -> dict[str, float]:
    """n, both accuracies, and their difference (other - base) with the standard error of the
    paired per-item difference, from the correctness (0/1) of the same items in the same order."""
    base_scores = np.asarray(base_correct, dtype=np.float64)  # [n]
    other_scores = np.asarray(other_correct, dtype=np.float64)  # [n]
    if base_scores.shape != other_scores.shape or base_scores.size == 0:
        raise ValueError(
            f"paired correctness needs the same non-empty items: {base_scores.size} vs "
            f"{other_scores.size}"
        )
    differences = other_scores - base_scores  # [n]
    n = differences.size
    return {
        "n": n,
        "base_accuracy": float(base_scores.mean()),
        "accuracy": float(other_scores.mean()),
        "difference": float(differences.mean()),
        "difference_standard_error": float(differences.std(ddof=1) / math.sqrt(n))
        if n > 1
        else 0.0,
    }


def evaluate_model(
    sampler: Sampler,
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
