"""Compiled memory of one RL gradient (`t2jax.rl.loss.compute_gradients`), by microbatch rows,
remat and log-softmax chunk: XLA's own buffer assignment (`memory_analysis`), no step is run.

A batch of ROWS rows of LENGTH positions whose last TAIL positions are scored (a rollout batch
after left padding) is compiled for each variant; the table gives the temporary buffers (the
peak beyond the arguments) and the arguments (frozen weights, SVD factors, parameters).

    T2JAX_DATA=../shared/data python benchmarks/rl_memory.py --task gsm8k --length 448 \\
        --variants 8:off:64,4:off:64,4:on:64,1:off:64
"""

from __future__ import annotations

import argparse
import dataclasses
import re

import jax.numpy as jnp

from t2jax import configuration
from t2jax.rl import config as rl_config
from t2jax.rl.loss import LossOptions, PolicyBatch, compute_gradients
from t2jax.rl.setup import Setup, load_setup

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Variant:
    """Execution settings of the gradient: microbatch rows, remat, log-softmax chunk."""

    microbatch: int
    remat: bool
    chunk: int

    @classmethod
    def parse(cls, text: str) -> Variant:
        """'ROWS:on|off:CHUNK', e.g. '4:off:64'."""
        match = re.fullmatch(r"(\d+):(on|off):(\d+)", text)
        if match is None:
            raise argparse.ArgumentTypeError(
                f"variant {text!r}: use ROWS:on|off:CHUNK, e.g. 4:off:64"
            )
        rows, remat, chunk = match.groups()
        return cls(int(rows), remat == "on", int(chunk))

    def overrides(self) -> dict:
        """The `TrainConfig` overrides of this variant."""
        return {
            "rl.microbatch_size": self.microbatch,
            "rl.remat": self.remat,
            "rl.logprob_chunk": self.chunk,
        }


def policy_batch(rows: int, length: int, tail: int) -> PolicyBatch:
    """A full batch: every position real, the last `tail` scored, advantage 1."""
    completion = jnp.zeros((rows, length), bool).at[:, -tail:].set(True)  # [N, T]
    return PolicyBatch(
        tokens=jnp.ones((rows, length), jnp.int32),  # [N, T]
        token_mask=jnp.ones((rows, length), bool),  # [N, T]
        completion_mask=completion,
        advantages=jnp.ones((rows,), jnp.float32),  # [N]
        row_mask=jnp.ones((rows,), bool),  # [N]
        scored_tail=tail,
    )


def compiled_memory(setup: Setup, config: rl_config.TrainConfig, batch: PolicyBatch) -> dict:
    """Temporary and argument bytes of the compiled gradient of `batch` under `config`."""
    rows = batch.tokens.shape[0]
    compiled = compute_gradients.lower(
        setup.model.config,
        LossOptions.from_config(config.adapter, config.svf, config.rl),
        setup.initial_params(),
        setup.model.weights,
        setup.model.factors,
        batch,
        rows // config.rl.microbatch_size,
    ).compile()
    analysis = compiled.memory_analysis()
    return {"temp": analysis.temp_size_in_bytes, "arguments": analysis.argument_size_in_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--targets", default="mlp", help="SVF targets (svf.targets)")
    parser.add_argument(
        "--stacked",
        action="store_true",
        help="stacked layers (one lax.scan over layers) instead of the CPU's unrolled default",
    )
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--length", type=int, default=448, help="positions per row")
    parser.add_argument("--tail", type=int, default=256, help="scored positions per row")
    parser.add_argument(
        "--variants",
        type=lambda text: [Variant.parse(item) for item in text.split(",")],
        default=[Variant(8, False, 64), Variant(4, False, 64), Variant(4, True, 64)],
    )
    args = parser.parse_args()
    if args.tail > args.length:
        parser.error("--tail must not exceed --length")
    bad = [v.microbatch for v in args.variants if v.microbatch <= 0 or args.rows % v.microbatch]
    if bad:
        parser.error(f"microbatch rows {bad} do not divide --rows {args.rows}")
    base = {
        "model.name": args.model,
        "task.name": args.task,
        "rl.batch_size": args.rows,
        "svf.targets": args.targets,
        "model.stacked": args.stacked or None,
    }
    setup = load_setup(configuration.with_overrides(rl_config.TrainConfig(), base))
    batch = policy_batch(args.rows, args.length, args.tail)
    layout = "stacked" if args.stacked else "default"
    print(
        f"{args.model}, {args.rows} rows x {args.length} positions ({args.tail} scored), "
        f"{layout} layers"
    )
    print("| microbatch rows | remat | chunk | temp GiB | arguments GiB |")
    print("|---:|---|---:|---:|---:|")
    for variant in args.variants:
        config = configuration.with_overrides(setup.config, variant.overrides())
        memory = compiled_memory(setup, config, batch)
        print(
            f"| {variant.microbatch} | {'on' if variant.remat else 'off'} | {variant.chunk} "
            f"| {memory['temp'] / GIB:.2f} | {memory['arguments'] / GIB:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
