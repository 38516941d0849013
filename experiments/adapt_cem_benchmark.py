"""Wall time of one few-shot CEM generation: batched vs sequential (issue 6, spec section 4.4).

One generation scores `--population` candidates (mixtures of three experts, drawn by the official
CEM from alpha = 1/K, per-matrix) on `--shots` shots of a task:
  * batched: every candidate x shot row in ONE sampler call, one z per row (factored SVF);
  * sequential: the official shape, for each candidate: merge its W' (recompose), then generate
    its shots (one sampler call per candidate, the base model's decode cost).
(`--rows-per-call` splits the batched call, e.g. to bound memory.) Both are
`few_shot.score_population` (batched, or `per_candidate=True`; generation + scoring, tie-break off
so both do the same work) in the same process; each is run once after a compile run of the same
shapes with one new token. The completions of both are compared. Each is also timed with one new
token: that is the prefill (plus, sequentially, the merges), which both approaches pay per row
because every candidate's W' changes every layer's hidden states.

Without `--experts`, three random but valid experts are used (p = 0.1 + 0.5 N(0, 1), z =
sigmoid(p)); the cost does not depend on what experts learned, only the completions (and so
where rows stop) do.

    nice -n 19 python experiments/adapt_cem_benchmark.py [--model smollm2-135m-instruct]
        [--task arc_challenge] [--shots 10] [--population 32] [--max-new-tokens 64]
        [--experts math=m.safetensors,code=c.safetensors,reasoning=r.safetensors]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from t2jax.adaptation import cem, few_shot
from t2jax.adaptation.expert_model import build_expert_model, parse_expert_paths
from t2jax.loading import load_model
from t2jax.svf import cache as svf_cache
from t2jax.svf import core as svf_lib
from t2jax.svf import experts as experts_lib
from t2jax.svf import targets as svf_targets
from t2jax.tasks import get_task, render_prompt


def seconds(run: Callable[[], object]) -> tuple[float, object]:
    """Wall time of one call of `run`, and its result."""
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def random_experts(loaded, names) -> dict[str, experts_lib.Expert]:
    """Random valid experts for the model's MLP targets (distinct seeds)."""
    fingerprint = svf_cache.fingerprint(loaded.config, loaded.checkpoint.tensors)
    shapes = svf_targets.svf_param_shapes(loaded.config, svf_targets.TARGET_SETS["mlp"])
    return {
        name: experts_lib.expert_from_params(
            svf_lib.init_params(jax.random.key(seed), shapes, std=0.5), fingerprint=fingerprint
        )
        for seed, name in enumerate(names)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", default="arc_challenge")
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--population", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--rows-per-call", type=int, default=None, help="split the batched call (default: one)"
    )
    parser.add_argument("--experts", default=None, help="NAME=PATH,... (default: random experts)")
    args = parser.parse_args()

    loaded = load_model(args.model, progress=False)
    if args.experts:
        paths = parse_expert_paths(args.experts)
        experts = {name: experts_lib.load_expert(path) for name, path in paths.items()}
    else:
        experts = random_experts(loaded, ("math", "code", "reasoning"))
    model = build_expert_model(loaded, experts, progress=False)
    task = get_task(args.task)
    items = task.load("test")
    shot_indices, _ = few_shot.few_shot_split(task.name, len(items), args.shots)
    shots = [items[i] for i in shot_indices]
    prompts = [render_prompt(task, shot, loaded.tokenizer) for shot in shots]

    alpha = few_shot.initial_alpha(model, "per_matrix")
    strategy = cem.CEM(args.population, alpha)
    state = strategy.init(jax.random.key(0), alpha, strategy.default_params)
    population, _ = strategy.ask(jax.random.key(1), state, strategy.default_params)
    basis = few_shot.mixing_basis(model, "z")
    z_population = few_shot.mix_population(basis, population, False, model.adapted.targets)
    first_candidate = {k: v[:1] for k, v in z_population.items()}

    def score(z, max_new_tokens, per_candidate):
        return few_shot.score_population(
            model,
            task,
            shots,
            prompts,
            z,
            max_new_tokens=max_new_tokens,
            stop_strings=task.stop_strings,
            tie_break=False,
            rows_per_call=args.rows_per_call,
            per_candidate=per_candidate,
        )

    score(z_population, 1, False), score(first_candidate, 1, True)  # compile both shapes
    batched_prefill, _ = seconds(lambda: score(z_population, 1, False))
    sequential_prefill, _ = seconds(lambda: score(z_population, 1, True))
    batched_seconds, batched = seconds(lambda: score(z_population, args.max_new_tokens, False))
    sequential_seconds, alone = seconds(lambda: score(z_population, args.max_new_tokens, True))
    first = {k: v[0] for k, v in first_candidate.items()}

    def merge_first():
        return jax.block_until_ready(model.adapted.merged_weights(first))

    merge_first()  # compile
    merge_seconds, _ = seconds(merge_first)

    rows = args.population * args.shots
    calls = -(-rows // (args.rows_per_call or rows))
    same = sum(
        a == b
        for texts, batched_texts in zip(alone.texts, batched.texts, strict=True)
        for a, b in zip(texts, batched_texts, strict=True)
    )
    lengths = [len(ids) for ids in model.adapted.sampler.encode(prompts)]
    dtype = jnp.dtype(model.adapted.weights.embed.dtype).name
    origin = "from files" if args.experts else "(random, valid)"
    print(
        f"\n{args.model} on {jax.devices()[0].platform} ({dtype}); "
        f"{len(experts)} experts {origin}; "
        f"{args.task}: {args.shots} shots (prompt tokens {min(lengths)}-{max(lengths)}), "
        f"population {args.population}, max {args.max_new_tokens} new tokens\n"
    )
    print(
        f"{'approach':<44}{'calls':>6}{'rows/call':>10}{'seconds':>10}"
        f"{'1 token (s)':>13}{'speedup':>9}"
    )
    print(
        f"{'batched: one z per row (factored)':<44}{calls:>6}{-(-rows // calls):>10}"
        f"{batched_seconds:>10.1f}{batched_prefill:>13.1f}{1.0:>9.2f}"
    )
    print(
        f"{'sequential: merge + generate per candidate':<44}{args.population:>6}"
        f"{args.shots:>10}{sequential_seconds:>10.1f}{sequential_prefill:>13.1f}"
        f"{sequential_seconds / batched_seconds:>9.2f}"
    )
    print(f"\nmerge of one candidate's W' (part of sequential): {merge_seconds:.2f} s")
    print(f"identical completions, batched vs sequential: {same}/{rows}")
    accuracy = [round(float(a), 2) for a in batched.accuracy]
    print(f"candidate accuracies (batched): {accuracy}")


if __name__ == "__main__":
    main()
