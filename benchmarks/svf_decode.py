"""Benchmark: SVD decomposition time and decode throughput with SVF experts (issue 3).

On SmolLM2-135M-Instruct by default:
  * time to decompose the MLP targets (fp32 SVD of every gate/up/down kernel);
  * decode throughput at batch 32 with (a) the base model, (b) one merged expert, (c) 32 different
    experts in one batch (factored SVF, one z per row), and (d) the official approach: recompose W'
    and generate once per expert, sequentially, for 32 experts (one prompt each).
Targets: (b) within 5% of (a); (c) at least 10x faster end to end than (d).

Generation never stops early (no end id can be sampled), so every row produces exactly
`--new-tokens` tokens; tokens/s counts generated tokens over wall time, prefill included. Every
timing is the best of `--repeats` runs after one compile run with the same shapes.

    python benchmarks/svf_decode.py [--model smollm2-135m-instruct] [--batch 32] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from t2jax.loading import load_model
from t2jax.sampler import Sampler
from t2jax.svf import cache as svf_cache
from t2jax.svf import core as svf_lib
from t2jax.svf import factors as svf_factors
from t2jax.svf import targets as svf_targets


def best_seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each run over `repeats` interleaved rounds (load changes on a shared
    machine then hit every run alike), after one untimed call of each (compilation)."""
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, math.inf)
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def random_experts(config, targets, count: int) -> list[svf_lib.ZVectors]:
    """`count` distinct experts (z far from uniform, so each one really changes the model)."""
    shapes = svf_targets.svf_param_shapes(config, targets)
    return [
        svf_lib.z_of(
            svf_lib.init_params(jax.random.key(seed), shapes, std=0.5),
            svf_lib.OFFICIAL_PARAMETRIZATION,
        )
        for seed in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--targets", default="mlp")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    loaded = load_model(args.model, progress=False)
    config, weights = loaded.config, loaded.weights
    targets = svf_targets.resolve_targets(args.targets)
    stacked = not isinstance(weights.layers, tuple)

    start = time.perf_counter()
    factors = svf_factors.decompose(
        config,
        svf_factors.kernels_from_weights(weights),
        targets,
        fingerprint=svf_cache.fingerprint(config, svf_cache.weights_as_tensors(config, weights)),
        placement=svf_factors.Placement.for_weights(weights),
        progress=False,
    )
    jax.block_until_ready(factors)
    decompose_seconds = time.perf_counter() - start

    prompts = [
        loaded.tokenizer.encode(f"Question {i}: what is {i} times {i + 3}? Explain briefly.")
        for i in range(args.batch)
    ]
    experts = random_experts(config, targets, args.batch)

    def sampler(weights) -> Sampler:
        never = (config.vocab_size,)  # an id outside the vocabulary: rows never end early
        return Sampler(config, weights, loaded.tokenizer, never, batch_multiple=1)

    def generate(weights, batch_prompts, svf=None):
        return sampler(weights).generate(batch_prompts, max_new_tokens=args.new_tokens, svf=svf)

    merge = jax.jit(svf_factors.merge_into_weights)
    merged = merge(weights, factors, experts[0])
    per_row = svf_factors.svf_from_factors(factors, svf_lib.per_row_experts(experts), "factored")

    def official(expert_index: int) -> None:
        z = experts[expert_index]
        generate(merge(weights, factors, z), prompts[expert_index : expert_index + 1])

    def official_sequential() -> None:
        for expert_index in range(args.batch):
            official(expert_index)

    names = {
        "a": "(a) base model",
        "b": "(b) one merged expert",
        "c": f"(c) {args.batch} experts, factored",
        "d": f"(d) {args.batch} x (merge + generate 1)",
    }
    seconds = best_seconds(
        {
            "merge": lambda: jax.block_until_ready(merge(weights, factors, experts[1])),
            names["a"]: lambda: generate(weights, prompts),
            names["b"]: lambda: generate(merged, prompts),
            names["c"]: lambda: generate(weights, prompts, per_row),
        },
        args.repeats,
    )
    official(0)  # compiles the batch-1 sampler
    start = time.perf_counter()
    official_sequential()
    seconds[names["d"]] = time.perf_counter() - start
    merge_seconds = seconds.pop("merge")

    tokens = args.batch * args.new_tokens
    print(
        f"\n{args.model} on {jax.devices()[0].platform} ({jax.device_count()} device(s), "
        f"{jnp.dtype(weights.embed.dtype).name}, {'stacked' if stacked else 'unrolled'} layers)"
    )
    print(
        f"decompose {args.targets} ({config.num_layers * len(targets)} matrices, fp32 SVD): "
        f"{decompose_seconds:.2f} s;  merge one expert: {merge_seconds * 1000:.0f} ms"
    )
    print(f"batch {args.batch}, {args.new_tokens} new tokens per row ({tokens} tokens)\n")
    print(f"{'scenario':<36}{'seconds':>10}{'tokens/s':>12}{'vs (a)':>10}")
    base = seconds[names["a"]]
    for name, taken in seconds.items():
        print(f"{name:<36}{taken:>10.2f}{tokens / taken:>12.1f}{base / taken:>10.2f}")
    merged_ratio = base / seconds[names["b"]]
    speedup = seconds[names["d"]] / seconds[names["c"]]
    print(f"\n(b) throughput / (a): {merged_ratio:.3f}  (target >= 0.95)")
    print(f"(c) end-to-end speedup over (d): {speedup:.1f}x  (target >= 10x)")


if __name__ == "__main__":
    main()
