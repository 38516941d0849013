"""Greedy decoding throughput: t2jax vs transformers' PyTorch `generate`, same prompts, same run.

    python benchmarks/decode.py [--model smollm2-135m-instruct] [--batch-sizes 1,8,32]

Generates `--new-tokens` tokens per row (end ids ignored, so every row decodes the full length)
for each batch size and prints tokens/s end to end (prefill included, compilation excluded: each
t2jax configuration is run once to warm up). t2jax runs with bf16 parameters (its default; fp32
activations on CPU) and with fp32 parameters. transformers runs in fp32 and bf16 on the same
weights (plain nn.Linear layers holding the same dequantized tensors). Needs torch (test extra).

The "matmul bound" column is the throughput of a decoder whose steps cost only their matmuls
(every layer kernel and the lm_head at the batch's rows, bf16 weights as `ops.matmul` runs them,
prefill free): a decoder that runs these matmuls cannot beat it, whatever else it removes.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from t2jax import ops
from t2jax.checkpoints.registry import REGISTRY
from t2jax.config import ModelConfig
from t2jax.loading import load_model
from t2jax.sampler import Sampler

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May. "
    "How many clips did she sell altogether?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Which gas do plants absorb from the atmosphere?",
    "What is the sum of the first ten odd numbers?",
]


def chat_prompts(tokenizer, batch_size: int) -> list[str]:
    """`batch_size` chat-formatted prompts cycling through QUESTIONS."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for i in range(batch_size)
    ]


def time_t2jax(sampler, prompts: list[str], new_tokens: int) -> float:
    """Tokens/s of t2jax greedy generation (after one warm-up call that compiles)."""
    sampler.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    generation = sampler.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)
    elapsed = time.perf_counter() - start
    assert all(length == new_tokens for length in generation.lengths)
    return len(prompts) * new_tokens / elapsed


def matmul_bound(config: ModelConfig, batch_size: int, steps: int = 32, repeats: int = 5) -> float:
    """Tokens/s if a decode step cost only its matmuls: x [batch, 1, hidden] (fp32) through every
    layer's q/k/v/o/gate/up/down kernel and the lm_head (bf16, one array per layer as the model
    keeps them), `steps` steps in one `fori_loop` as the sampler's decode loop runs them (XLA
    treats loop-invariant weights differently inside a loop), best of `repeats` calls."""
    hidden, inter = config.hidden_size, config.intermediate_size
    shapes = [
        (hidden, config.q_dim),
        (hidden, config.kv_dim),
        (hidden, config.kv_dim),
        (config.q_dim, hidden),
        (hidden, inter),
        (hidden, inter),
        (inter, hidden),
    ]
    keys = iter(jax.random.split(jax.random.key(0), config.num_layers * len(shapes) + 2))
    layers = [
        [0.02 * jax.random.normal(next(keys), shape, jnp.bfloat16) for shape in shapes]
        for _ in range(config.num_layers)
    ]
    head = 0.02 * jax.random.normal(next(keys), (hidden, config.vocab_size), jnp.bfloat16)
    x = jax.random.normal(next(keys), (batch_size, 1, hidden), jnp.float32)  # [B, 1, D]

    def step(_, x):
        for wq, wk, wv, wo, wg, wu, wd in layers:
            q, k, v = ops.matmul(x, wq), ops.matmul(x, wk), ops.matmul(x, wv)  # [B, 1, Hq*hd] ..
            x = x + ops.matmul(q + (k[..., :1] + v[..., :1]), wo)  # [B, 1, D]
            x = x + ops.matmul(ops.matmul(x, wg) * ops.matmul(x, wu), wd)  # [B, 1, D]
        return x + ops.matmul(x, head)[..., :hidden]  # [B, 1, D]

    run = jax.jit(lambda x: jax.lax.fori_loop(0, steps, step, x))
    run(x).block_until_ready()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x).block_until_ready()
        seconds.append(time.perf_counter() - start)
    return batch_size * steps / min(seconds)


def load_torch_model(checkpoint, dtype):
    """A plain transformers model (nn.Linear layers) holding the checkpoint's dequantized weights.

    (transformers' own GGUF loader keeps the weights quantized and runs dequantizing kernels,
    which is not the fp32/bf16 baseline we compare against.)
    """
    import torch
    import transformers

    hf_config = dict(checkpoint.hf_config)
    config = transformers.AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {
        name: torch.from_numpy(np.asarray(array)) for name, array in checkpoint.tensors.items()
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.to(dtype).eval()


def time_transformers(model, tokenizer, prompts: list[str], new_tokens: int) -> float:
    """Tokens/s of transformers' greedy `generate` with left padding (one warm-up call)."""
    import torch

    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.no_grad():
        model.generate(**batch, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
        start = time.perf_counter()
        output = model.generate(**batch, **kwargs)
        elapsed = time.perf_counter() - start
    assert output.shape[1] - batch["input_ids"].shape[1] == new_tokens
    return len(prompts) * new_tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", choices=sorted(REGISTRY))
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]

    rows = {size: {} for size in batch_sizes}
    for label, dtype in (("t2jax bf16", jnp.bfloat16), ("t2jax fp32", jnp.float32)):
        loaded = load_model(args.model, dtype=dtype)
        sampler = Sampler.for_model(loaded)
        for size in batch_sizes:
            prompts = chat_prompts(loaded.tokenizer, size)
            rows[size][label] = time_t2jax(sampler, prompts, args.new_tokens)
            print(f"batch {size}: {label} {rows[size][label]:.1f} tok/s", flush=True)
    for size in batch_sizes:
        rows[size]["matmul bound"] = matmul_bound(loaded.config, size)
        print(f"batch {size}: matmul bound {rows[size]['matmul bound']:.1f} tok/s", flush=True)
    if not args.skip_transformers:
        import torch

        for label, dtype in (
            ("transformers fp32", torch.float32),
            ("transformers bf16", torch.bfloat16),
        ):
            model = load_torch_model(loaded.checkpoint, dtype)
            for size in batch_sizes:
                prompts = chat_prompts(loaded.tokenizer, size)
                rows[size][label] = time_transformers(
                    model, loaded.tokenizer, prompts, args.new_tokens
                )
                print(f"batch {size}: {label} {rows[size][label]:.1f} tok/s", flush=True)
            del model

    device = jax.devices()[0]
    print(f"\n{args.model}, greedy, {args.new_tokens} new tokens, tokens/s (higher is better)")
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {len(jax.devices())} x {device.device_kind}")
    columns = list(next(iter(rows.values())))
    print(
        "| batch | "
        + " | ".join(columns)
        + " | t2jax bf16 / transformers fp32 | t2jax bf16 / transformers bf16 |"
    )
    print("|---|" + "---|" * (len(columns) + 2))
    for size, row in rows.items():
        ratios = [
            f"{row['t2jax bf16'] / row[label]:.2f}x" if label in row else "n/a"
            for label in ("transformers fp32", "transformers bf16")
        ]
        cells = [f"{row[column]:.1f}" for column in columns]
        print(f"| {size} | " + " | ".join(cells + ratios) + " |")


if __name__ == "__main__":
    main()
