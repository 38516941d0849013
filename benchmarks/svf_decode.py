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
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from t2jax import svd
from t2jax import svf as svf_lib
from t2jax.loading import load_model
from t2jax.sampler import Sampler


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """Best wall time of `repeats` calls of `run`, after one untimed call (compilation)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def random_experts(config, targets, count: int) -> list[svf_lib.ZVectors]:
    """`count` distinct experts (z far from uniform, so each one really changes the model)."""
    shapes = svd.svf_param_shapes(config, targets)
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
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    loaded = load_model(args.model, progress=False)
    config, weights = loaded.config, loaded.weights
    targets = svd.resolve_targets(args.targets)
    stacked = not isinstance(weights.layers, tuple)

    start = time.perf_counter()
    factors = svd.decompose(
        config,
        svd.kernels_from_weights(weights),
        targets,
        fingerprint=svd.fingerprint(config, svd.weights_as_tensors(config, weights)),
        stacked=stacked,
        dtype=weights.embed.dtype,
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

    merge = jax.jit(svd.merge_into_weights)
    merged = merge(weights, factors, experts[0])
    per_row = svd.svf_from_factors(factors, svf_lib.per_row_experts(experts), "factored")

    def official_sequential():
        for prompt, z in zip(prompts, experts, strict=True):
            generate(merge(weights, factors, z), [prompt])

    merge_seconds = best_seconds(
        lambda: jax.block_until_ready(merge(weights, factors, experts[1])), args.repeats
    )
    rows = {
        "(a) base model": best_seconds(lambda: generate(weights, prompts), args.repeats),
        "(b) one merged expert": best_seconds(lambda: generate(merged, prompts), args.repeats),
        f"(c) {args.batch} experts, factored": best_seconds(
            lambda: generate(weights, prompts, per_row), args.repeats
        ),
        f"(d) {args.batch} x (merge + generate 1)": best_seconds(official_sequential, 1),
    }

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
    base = rows["(a) base model"]
    for name, seconds in rows.items():
        print(f"{name:<36}{seconds:>10.2f}{tokens / seconds:>12.1f}{base / seconds:>10.2f}")
    merged_ratio = base / rows["(b) one merged expert"]
    speedup = (
        rows[f"(d) {args.batch} x (merge + generate 1)"]
        / rows[f"(c) {args.batch} experts, factored"]
    )
    print(f"\n(b) throughput / (a): {merged_ratio:.3f}  (target >= 0.95)")
    print(f"(c) end-to-end speedup over (d): {speedup:.1f}x  (target >= 10x)")


if __name__ == "__main__":
    main()
