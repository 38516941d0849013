"""Benchmark: seconds per RL update (REINFORCE on SVF), split into rollout, scoring and gradient.

The training step of `t2jax.rl.trainer` in its phases, with the functions it runs: rollouts
(`rl.rollout.generate_rollouts`, W'(z) merged into the weights), scoring with the task's official
scorer (`score_rollouts`), the teacher-forced forward/backward (`rl.loss.compute_gradients`) and
the optimizer update (`apply_gradients`). The rollouts and their scores do not depend on how the
gradient applies W', so each step generates and scores one batch, then times the gradient of that
same batch in every variant (merged / factored / auto SVF x remat off / on, and the output
projection on every position or on the completions' tail), interleaved, so load on a shared
machine hits every variant alike. The table shows each variant's whole update against t2jax's
gradient before issue 17's RL work (merged, as the official code, with the lm_head on every
position). One untimed
warm-up step compiles everything; the figures are medians over `--steps` timed steps.

On a GPU, time each variant in its own process (one name in `--variants`): on the H200, variants
sharing a process slowed each other 5-10x (docs/gpu.md), which interleaving cannot even out.

The configuration is the `cpu` preset of `experiments/configs/svf.py` (batch 32, 128 new tokens,
microbatches of 8), overridable with `--set KEY=VALUE`.

    python benchmarks/rl_step.py [--model smollm2-135m-instruct] [--task gsm8k] [--steps 3]
        [--variants "before: merged, lm_head on every position;auto"]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from t2jax import configuration
from t2jax.rl.config import TrainConfig
from t2jax.rl.loss import LossOptions, apply_gradients, compute_gradients, init_state
from t2jax.rl.rollout import generate_rollouts, policy_batch, score_rollouts
from t2jax.rl.setup import Setup, load_setup
from t2jax.svf import core as svf_lib


@dataclasses.dataclass(frozen=True)
class Variant:
    """How the gradient is computed: SVF mode, remat, and whether the output projection runs on
    every position (as before `PolicyBatch.scored_tail`) or on the completions' tail only."""

    mode: str
    remat: bool = False
    every_position: bool = False

    def config(self, config: TrainConfig) -> TrainConfig:
        """`config` with this variant's SVF mode and remat."""
        return configuration.with_overrides(config, {"svf.mode": self.mode, "rl.remat": self.remat})


BEFORE = "before: merged, lm_head on every position"  # t2jax before issue 17's RL work
VARIANTS = {
    BEFORE: Variant("merged", every_position=True),
    "merged": Variant("merged"),
    "merged + remat": Variant("merged", remat=True),
    "factored": Variant("factored"),
    "factored + remat": Variant("factored", remat=True),
    "auto, lm_head on every position": Variant("auto", every_position=True),
    "auto": Variant("auto"),
    "auto + remat": Variant("auto", remat=True),
}


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """`fn(*args, **kwargs)` (its device work finished) and its wall seconds."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args, **kwargs))
    return result, time.perf_counter() - start


def gradient_step(setup: Setup, variant: Variant, state, batch, num_microbatches: int):
    """The gradient and optimizer update of one batch as `variant` computes it."""
    config = variant.config(setup.config)
    if variant.every_position:
        batch = dataclasses.replace(batch, scored_tail=None)
    grads, _ = compute_gradients(
        setup.model.config,
        LossOptions.from_config(config.adapter, config.svf, config.rl),
        state.params,
        setup.model.weights,
        setup.model.factors,
        batch,
        num_microbatches,
    )
    return apply_gradients(config.rl, state, grads)


def benchmark(setup: Setup, steps: int, names: list[str]) -> dict[str, list[float]]:
    """Per-phase seconds of `steps` timed steps (after one warm-up step) for the gradient
    variants `names` (keys of `VARIANTS`)."""
    config = setup.config
    params = setup.initial_params()
    z = svf_lib.z_of(params, config.svf.parametrization)
    variants = {name: VARIANTS[name] for name in names}
    seconds: dict[str, list[float]] = {"rollout": [], "score": [], "batch": []}
    seconds.update({f"gradient: {name}": [] for name in variants})
    for step in range(steps + 1):
        examples = setup.train[step * config.rl.batch_size : (step + 1) * config.rl.batch_size]
        rollouts, rollout_s = timed(generate_rollouts, setup, z, examples, seed=step)
        rollouts, score_s = timed(score_rollouts, setup, rollouts)
        (batch, count), batch_s = timed(policy_batch, setup, rollouts)
        gradient_s = {}
        for name, variant in variants.items():
            # The update donates its state: every variant starts from its own copy of params.
            state = init_state(jax.tree.map(jnp.copy, params), config.rl)
            _, gradient_s[name] = timed(gradient_step, setup, variant, state, batch, count)
        if step == 0:
            continue  # compilation
        for name, value in (("rollout", rollout_s), ("score", score_s), ("batch", batch_s)):
            seconds[name].append(value)
        for name, value in gradient_s.items():
            seconds[f"gradient: {name}"].append(value)
    return seconds


def report(seconds: dict[str, list[float]]) -> str:
    """A Markdown table: median seconds per phase, its share of an update with the `BEFORE`
    gradient, and each variant's whole update (rollout + score + batch + its gradient) against
    that one."""
    median = {name: statistics.median(values) for name, values in seconds.items()}
    shared = median["rollout"] + median["score"] + median["batch"]
    gradients = {
        name.removeprefix("gradient: "): value
        for name, value in median.items()
        if name.startswith("gradient: ")
    }
    before = shared + gradients.get(BEFORE, math.nan)
    lines = [f"| phase | median s | share of an update with the {BEFORE!r} gradient |"]
    lines.append("|---|---:|---:|")
    for name, value in median.items():
        lines.append(f"| {name} | {value:.2f} | {100 * value / before:.0f}% |")
    for name, gradient in gradients.items():
        update = shared + gradient
        share = f"{100 * update / before:.0f}% ({before / update:.2f}x faster)"
        lines.append(f"| update with the {name} gradient | {update:.2f} | {share} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument(
        "--variants", default=";".join(VARIANTS), help=f"';' list of {'; '.join(VARIANTS)}"
    )
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE config override")
    args = parser.parse_args()
    names = args.variants.split(";")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; use {', '.join(VARIANTS)}")
    overrides = dict(item.split("=", 1) for item in args.set)
    overrides.update({"run.progress": False})
    config = configuration.resolve_config(
        TrainConfig,
        f"experiments/configs/svf.py:model={args.model},task={args.task},preset=cpu",
        overrides,
    )
    setup = load_setup(config)
    rl = setup.config.rl
    print(
        f"{args.model} on {args.task}: {rl.batch_size} prompts x {rl.samples_per_prompt} "
        f"samples, {setup.max_new_tokens} new tokens, microbatches of {rl.microbatch_size}, "
        f"{args.steps} timed steps after 1 warm-up; backend {jax.default_backend()}"
    )
    print(report(benchmark(setup, args.steps, names)))


if __name__ == "__main__":
    main()
