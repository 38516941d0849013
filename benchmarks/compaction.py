"""Generation on task prompts whose answers end at different lengths: finished rows compacted out
of the batch (`SamplerConfig.compact_rows`, the default) vs every row kept until the longest one
ends, on the same prompts in the same run.

    python benchmarks/compaction.py [--model smollm2-135m-instruct] [--task arc_challenge]
        [--prompts 32] [--max-new-tokens 256] [--dtype bfloat16|float32]

Greedy; end ids and the task's stop strings end rows. Each configuration runs once untimed to
compile (compaction compiles the decode step once per batch size it reaches; that first run's time
is printed too) and once timed. Prints seconds, the rows' generated tokens per second and the
speedup, and checks that both produced the same tokens.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from t2jax.checkpoints.registry import REGISTRY
from t2jax.config import SamplerConfig
from t2jax.loading import load_model
from t2jax.sampler import Sampler
from t2jax.tasks import get_task, render_prompt


def timed_generation(sampler, prompts, max_new_tokens, stop_strings):
    """(seconds of the compile run, seconds of the timed run, the timed run's generation)."""
    times, generation = [], None
    for _ in range(2):
        start = time.perf_counter()
        generation = sampler.generate(
            prompts, max_new_tokens=max_new_tokens, stop_strings=stop_strings
        )
        times.append(time.perf_counter() - start)
    return times[0], times[1], generation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", choices=sorted(REGISTRY))
    parser.add_argument("--task", default="arc_challenge")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = parser.parse_args()

    loaded = load_model(args.model, dtype=jnp.dtype(args.dtype), progress=False)
    task = get_task(args.task)
    items = task.load("test")[: args.prompts]
    prompts = [render_prompt(task, item, loaded.tokenizer) for item in items]

    results = {}
    for label, compact in (("all rows to the end", False), ("finished rows leave", True)):
        sampler = Sampler.for_model(loaded, sampler_config=SamplerConfig(compact_rows=compact))
        results[label] = timed_generation(sampler, prompts, args.max_new_tokens, task.stop_strings)
        print(f"{label}: {results[label][1]:.1f} s", flush=True)

    generations = [generation for _, _, generation in results.values()]
    lengths = np.asarray(generations[0].lengths)
    useful = lengths.sum() / (len(lengths) * lengths.max())  # of a batch that runs to the longest
    same = sum(a == b for a, b in zip(*(g.token_ids for g in generations), strict=True))
    baseline = results["all rows to the end"][1]
    cpu = platform.processor() or platform.machine()
    print(
        f"\n{args.model} ({args.dtype}) on {cpu}, {len(jax.devices())} x "
        f"{jax.devices()[0].device_kind}; {args.task} test[:{len(prompts)}], greedy, "
        f"max {args.max_new_tokens} new tokens; generated tokens per row: mean "
        f"{lengths.mean():.0f}, max {lengths.max()} ({useful:.0%} of a full batch's work)\n"
    )
    print("| rows | first run (s, compiles) | seconds | generated tok/s | speedup |")
    print("|---|---:|---:|---:|---:|")
    for label, (first, seconds, _) in results.items():
        print(
            f"| {label} | {first:.1f} | {seconds:.1f} | {lengths.sum() / seconds:.1f} | "
            f"{baseline / seconds:.2f}x |"
        )
    print(f"\nidentical token ids: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
