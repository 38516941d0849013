"""One decode step's attention over a bf16 KV cache on the CPU: the native kernel
(`t2jax.native.decode_attention`, cache written in place) against XLA's attention and cache
write (`t2jax.attention.grouped_attention` and `write_slots`), in one run, interleaved.

    JAX_PLATFORMS=cpu python benchmarks/decode_attention.py [--heads 3x3x64,2x7x64]
        [--batch-sizes 1,8,32] [--slots 192] [--live 100] [--layers 30] [--steps 8] [--repeats 5]

Each case runs `--layers` layers' caches (separate arrays, as the CPU decoder keeps them) of
`--batch-sizes` rows, K kv heads of G queries each, head dim H (`--heads` KxGxH: SmolLM2-135M,
Qwen2.5-0.5B), `--slots` slots of which each row sees the first `--live`, for `--steps` dependent
steps in one jitted `fori_loop` that carries the caches (donated, so both write in place where
they can), and reports the median wall time of `--repeats` calls per layer and step, and the
live cache bytes read per second.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from t2jax import attention, native


def steps(attend, state, q, k, v, slot: int, count: int):
    """`count` decode steps through every layer's cache in `state` (caches, then an fp32
    carry); each step's queries depend on the last step's outputs so nothing is hoisted."""

    def body(_, state):
        caches, carry = state
        written = []
        for k_cache, v_cache in caches:
            out, layer_cache = attend(q + carry, k, v, k_cache, v_cache, jnp.int32(slot))
            carry = carry + 1e-3 * out.reshape(carry.shape)
            written.append(layer_cache)
        return tuple(written), carry

    return jax.lax.fori_loop(0, count, body, state)


def random_state(key, layers: int, shape: tuple[int, ...], q: jax.Array):
    """`steps`' state: `layers` random bf16 (k, v) caches of `shape` and a zero carry like q."""
    layer_keys = jax.random.split(key, 2 * layers).reshape(-1, 2)
    caches = tuple(
        tuple(jax.random.normal(key, shape, jnp.bfloat16) for key in pair) for pair in layer_keys
    )
    return caches, jnp.zeros_like(q)


def time_case(args, kv_heads: int, group: int, head_dim: int, batch: int) -> str:
    """One table row: both implementations on the same operands, interleaved."""
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, 1, kv_heads * group, head_dim))  # [B, 1, N, H]
    k, v = (jax.random.normal(key, (batch, kv_heads, 1, head_dim)) for key in keys[1:3])
    live = np.arange(args.slots) < args.live  # [S]
    new_mask = jnp.ones((batch, 1, 1), bool)  # [B, T, T]
    cached_mask = jnp.asarray(np.broadcast_to(live, (batch, 1, args.slots)))  # [B, T, S]
    shape = (batch, kv_heads, args.slots, head_dim)
    implementations = {"xla": attention.attend_in_xla, "native": attention.attend_natively}
    calls = {
        name: jax.jit(
            functools.partial(
                steps,
                functools.partial(attend, new_mask=new_mask, cached_mask=cached_mask),
                q=q,
                k=k,
                v=v,
                slot=args.live,
                count=args.steps,
            ),
            donate_argnums=0,
        )
        for name, attend in implementations.items()
    }
    fresh = functools.partial(random_state, keys[3], args.layers, shape, q)
    carries = {name: call(fresh())[1] for name, call in calls.items()}  # compiles
    np.testing.assert_allclose(carries["native"], carries["xla"], rtol=1e-4, atol=1e-5)
    times = {name: [] for name in calls}
    states = {name: fresh() for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            began = time.perf_counter()
            states[name] = jax.block_until_ready(call(states[name]))
            times[name].append(time.perf_counter() - began)
    per_layer = args.steps * args.layers
    xla, fast = (statistics.median(times[name]) / per_layer for name in ("xla", "native"))
    read = 2 * batch * kv_heads * args.live * head_dim * 2  # live keys and values, bf16
    return (
        f"| {kv_heads}x{group}x{head_dim} | {batch} | {1e6 * xla:.0f} | {1e6 * fast:.0f} "
        f"| {read / fast / 1e9:.1f} | {xla / fast:.2f}x |"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", default="3x3x64,2x7x64", help="kv heads x group x head dim")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--slots", type=int, default=192)
    parser.add_argument("--live", type=int, default=100, help="slots each row sees")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per timed call")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if not native.available():
        raise SystemExit("the native kernels are not available (see the log for the build error)")
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"{args.slots} slots, {args.live} seen per row, {args.layers} layers")
    print("| K x G x H | batch | XLA us/layer | native us/layer | native GB/s | speedup |")
    print("|---|---:|---:|---:|---:|---:|")
    for heads in args.heads.split(","):
        kv_heads, group, head_dim = map(int, heads.split("x"))
        for batch in map(int, args.batch_sizes.split(",")):
            print(time_case(args, kv_heads, group, head_dim, batch), flush=True)


if __name__ == "__main__":
    main()
