"""A few rows times bf16 matrices on the CPU: the native kernel (`t2jax.native.rowdot`) against
XLA's dot, in one run, interleaved.

    JAX_PLATFORMS=cpu python benchmarks/rowdot.py [--shapes 896x4864,4864x896,896x151936T]
        [--rows 1,2,4,8] [--matrices 24] [--steps 4] [--repeats 5]

Each case multiplies `--rows` rows (bf16, fp32 accumulation) by distinct bf16 [in, out] matrices
(stored [out, in], as a tied embedding used as the output head, when the shape ends in T),
as many as hold `--matrices` x 5M weights (24 Qwen-0.5B MLP kernels; one vocabulary head), in
`--steps` dependent passes inside one jitted `fori_loop` (the decode loop's setting: weights
resident, separate arrays, operands [rows, 1, in]), and reports the median wall time of
`--repeats` calls and the weight bytes streamed per second. The two implementations alternate
within each repeat.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from t2jax import native


def chain(
    matmul, matrices: tuple[jax.Array, ...], x: jax.Array, steps: int, transposed: bool
) -> jax.Array:
    """`steps` passes of x [rows, 1, in] through every matrix (separate arrays, as the
    CPU decoder keeps its layers), each pass's input depending on the previous pass's output so
    that XLA neither hoists nor merges them."""

    def body(_, total):
        moved = x + total.astype(x.dtype)  # [rows, 1, in]
        return total + sum(matmul(moved, matrix, transposed).sum() for matrix in matrices)

    return jax.lax.fori_loop(0, steps, body, jnp.float32(0))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes", default="896x4864,4864x896,896x151936T", help="in x out; T: stored [out, in]"
    )
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument(
        "--matrices", type=int, default=24, help="weights per case, in units of 5M (120M: 240 MB)"
    )
    parser.add_argument("--steps", type=int, default=4, help="passes per timed call")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if not native.available():
        raise SystemExit("the native kernel is not available (see the log for the build error)")
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| in x out | rows | XLA ms | native ms | XLA GB/s | native GB/s | speedup |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        transposed = shape.endswith("T")
        depth, width = map(int, shape.removesuffix("T").split("x"))
        count = max(1, args.matrices * 5_000_000 // (depth * width))  # the same bytes per case
        keys = jax.random.split(jax.random.key(0), count + 1)
        stored = (width, depth) if transposed else (depth, width)
        matrices = tuple(jax.random.normal(k, stored, jnp.bfloat16) for k in keys[1:])
        gigabytes = args.steps * count * depth * width * 2 / 1e9
        for rows in map(int, args.rows.split(",")):
            x = jax.random.normal(keys[0], (rows, 1, depth), jnp.bfloat16)  # [rows, 1, in]
            calls = {
                name: jax.jit(
                    functools.partial(chain, dot, steps=args.steps, transposed=transposed)
                )
                for name, dot in (("xla", native.xla_dot), ("native", native.rowdot))
            }
            results = {name: call(matrices, x) for name, call in calls.items()}  # compile
            relative = abs(float(results["native"] - results["xla"])) / abs(float(results["xla"]))
            assert relative < 1e-3, f"native and XLA disagree: {results}"
            times = {name: [] for name in calls}
            for _ in range(args.repeats):
                for name, call in calls.items():
                    began = time.perf_counter()
                    call(matrices, x).block_until_ready()
                    times[name].append(time.perf_counter() - began)
            xla, fast = (statistics.median(times[name]) for name in ("xla", "native"))
            print(
                f"| {shape} (x{count}) | {rows} | {1e3 * xla:.1f} | {1e3 * fast:.1f} "
                f"| {gigabytes / xla:.1f} | {gigabytes / fast:.1f} | {xla / fast:.2f}x |"
            )


if __name__ == "__main__":
    main()
