"""Greedy decoding throughput: t2jax vs transformers' PyTorch `generate`, same prompts, same run.

    python benchmarks/decode.py [--model smollm2-135m-instruct] [--batch-sizes 1,8,32]
        [--dtypes bf16,fp32] [--fused] [--skip-transformers]

Generates `--new-tokens` tokens per row (end ids ignored, so every row decodes the full length)
for each batch size and prints tokens/s end to end (prefill included, compilation excluded: each
t2jax configuration is run once to warm up). t2jax runs with bf16 parameters (its default; fp32
activations on CPU) and with fp32 parameters (`--dtypes`), and with q|k|v and gate|up fused
(`--fused`). transformers runs in the same dtypes on the same weights (plain nn.Linear layers
holding the same dequantized tensors). Needs torch (test extra).

The "matmul bound" column is the throughput of a decoder whose steps cost only their matmuls
(every layer kernel and the lm_head at the batch's rows, bf16 weights as `ops.matmul` runs them,
prefill free): a decoder that runs these matmuls cannot beat it, whatever else it removes. It
compares with the "decode" columns: t2jax's decode steps alone, timed as a run of
`--new-tokens` less a run of one token (the prefill and the first token).
The "memory bound" column is the roofline of a step that reads every weight it uses once (bf16;
one embedding row, the whole lm_head) and each row's KV cache at its mean live length, at the
copy bandwidth measured in the same run: no decoder that keeps its weights in device memory
beats it.

`--model` takes anything `load_model` loads, `random:DIR` included (an architecture with random
weights; `t2jax export --architecture-only` writes DIR): throughput depends on shapes, not values,
and rows decode the full length whatever they generate. On a GPU, transformers runs on it too.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from t2jax import ops
from t2jax.config import ModelConfig, SamplerConfig
from t2jax.loading import load_model
from t2jax.plan.models import parameter_bytes
from t2jax.sampler import Sampler

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May. "
    "How many clips did she sell altogether?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Which gas do plants absorb from the atmosphere?",
    "What is the sum of the first ten odd numbers?",
]


# --dtypes name -> (t2jax parameter dtype, name of the torch dtype of transformers' weights).
DTYPES = {"bf16": (jnp.bfloat16, "bfloat16"), "fp32": (jnp.float32, "float32")}


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


def time_generate(sampler, prompts: list[str], new_tokens: int) -> float:
    """Seconds of one t2jax greedy generation of `new_tokens` per row (after one warm-up call
    that compiles)."""
    sampler.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    generation = sampler.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)
    elapsed = time.perf_counter() - start
    assert all(length == new_tokens for length in generation.lengths)
    return elapsed


def time_t2jax(sampler, prompts: list[str], new_tokens: int) -> tuple[float, float]:
    """Tokens/s of t2jax greedy generation end to end, and of its decode steps alone: the
    tokens after the first over the time a run of `new_tokens` takes beyond a run of one token
    (prefill and first token), which is what the prefill-free matmul bound compares with."""
    whole = time_generate(sampler, prompts, new_tokens)
    first = time_generate(sampler, prompts, 1)
    decode = len(prompts) * (new_tokens - 1) / (whole - first) if whole > first else float("nan")
    return len(prompts) * new_tokens / whole, decode


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

    def step(x, layers, head):
        for wq, wk, wv, wo, wg, wu, wd in layers:
            q, k, v = ops.matmul(x, wq), ops.matmul(x, wk), ops.matmul(x, wv)  # [B, 1, Hq*hd] ..
            x = x + ops.matmul(q + (k[..., :1] + v[..., :1]), wo)  # [B, 1, D]
            x = x + ops.matmul(ops.matmul(x, wg) * ops.matmul(x, wu), wd)  # [B, 1, D]
        return x + ops.matmul(x, head)[..., :hidden]  # [B, 1, D]

    # The weights are arguments: closed over, an 8B model's would be compiled in as constants.
    run = jax.jit(
        lambda x, layers, head: jax.lax.fori_loop(0, steps, lambda _, x: step(x, layers, head), x)
    )
    run(x, layers, head).block_until_ready()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x, layers, head).block_until_ready()
        seconds.append(time.perf_counter() - start)
    return batch_size * steps / min(seconds)


def copy_bandwidth(megabytes: int = 2048, repeats: int = 5) -> float:
    """Bytes/s of the default device copying an array (bytes read plus bytes written), best of
    `repeats`."""
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)  # [N]
    copy = jax.jit(lambda x: x + 1.0)
    copy(x).block_until_ready()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        copy(x).block_until_ready()
        seconds.append(time.perf_counter() - start)
    return 2 * x.nbytes / min(seconds)


def memory_bound(
    config: ModelConfig, batch_size: int, prompt_tokens: int, new_tokens: int, bandwidth: float
) -> float:
    """Tokens/s of a decode step that only reads its bf16 weights once (one embedding row, the
    whole lm_head) and each row's bf16 KV cache at its mean live length, at `bandwidth` bytes/s."""
    weight_bytes = parameter_bytes(config, jnp.bfloat16)
    if not config.tie_word_embeddings:  # the embedding is gathered, not streamed
        weight_bytes -= 2 * config.vocab_size * config.hidden_size
    live_length = prompt_tokens + new_tokens / 2
    kv_bytes = 2 * 2 * config.num_layers * config.kv_dim * live_length * batch_size  # K and V
    return batch_size * bandwidth / (weight_bytes + kv_bytes)


def load_torch_model(checkpoint, dtype_name: str):
    """A plain transformers model (nn.Linear layers) holding the checkpoint's dequantized weights.

    (transformers' own GGUF loader keeps the weights quantized and runs dequantizing kernels,
    which is not the fp32/bf16 baseline we compare against.)
    """
    import torch
    import transformers

    hf_config = dict(checkpoint.hf_config)
    config = transformers.AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    dtype = getattr(torch, dtype_name)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {
        name: torch.from_numpy(np.asarray(array)) for name, array in checkpoint.tensors.items()
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.to(dtype=dtype, device=torch_device()).eval()


def torch_device() -> str:
    """ "cuda" where PyTorch sees a GPU, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def time_transformers(model, tokenizer, prompts: list[str], new_tokens: int) -> float:
    """Tokens/s of transformers' greedy `generate` with left padding (one warm-up call)."""
    import torch

    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    batch = batch.to(torch_device())
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
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    assert output.shape[1] - batch["input_ids"].shape[1] == new_tokens
    return len(prompts) * new_tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="what load_model loads")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtypes", default="bf16,fp32", help="weight dtypes to run, of bf16,fp32")
    parser.add_argument(
        "--fused",
        action="store_true",
        help="also time t2jax with q|k|v and gate|up fused (SamplerConfig(fuse_projections=True))",
    )
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    dtypes = args.dtypes.split(",")
    if not dtypes or set(dtypes) - set(DTYPES):
        parser.error(f"--dtypes takes a comma list of {', '.join(DTYPES)}")

    rows = {size: {} for size in batch_sizes}
    for name in dtypes:
        label = f"t2jax {name}"
        loaded = load_model(args.model, dtype=DTYPES[name][0])
        samplers = {label: Sampler.for_model(loaded)}
        if args.fused:
            fused = SamplerConfig(fuse_projections=True)
            samplers[f"{label} fused"] = Sampler.for_model(loaded, sampler_config=fused)
        for size in batch_sizes:
            prompts = chat_prompts(loaded.tokenizer, size)
            for column, sampler in samplers.items():
                rows[size][column], rows[size][f"{column} decode"] = time_t2jax(
                    sampler, prompts, args.new_tokens
                )
                print(
                    f"batch {size}: {column} {rows[size][column]:.1f} tok/s, "
                    f"decode steps alone {rows[size][f'{column} decode']:.1f}",
                    flush=True,
                )
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    for size in batch_sizes:
        rows[size]["matmul bound"] = matmul_bound(loaded.config, size)
        prompt_tokens = max(
            len(loaded.tokenizer(p).input_ids) for p in chat_prompts(loaded.tokenizer, size)
        )
        rows[size]["memory bound"] = memory_bound(
            loaded.config, size, prompt_tokens, args.new_tokens, bandwidth
        )
        print(
            f"batch {size}: matmul bound {rows[size]['matmul bound']:.1f} tok/s, "
            f"memory bound {rows[size]['memory bound']:.1f} tok/s",
            flush=True,
        )
    if not args.skip_transformers:
        for name in dtypes:
            label = f"transformers {name}"
            model = load_torch_model(loaded.checkpoint, DTYPES[name][1])
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
    ratios = (  # (numerator, denominator) columns
        ("t2jax bf16", "transformers fp32"),
        ("t2jax bf16", "transformers bf16"),
        ("t2jax bf16", "memory bound"),
        ("t2jax bf16 decode", "matmul bound"),
    )
    print(
        "| batch | "
        + " | ".join(columns)
        + " | "
        + " | ".join(f"{top} / {bottom}" for top, bottom in ratios)
        + " |"
    )
    print("|---|" + "---|" * (len(columns) + len(ratios)))
    for size, row in rows.items():
        ratio_cells = [
            f"{row[top] / row[bottom]:.2f}x" if top in row and bottom in row else "n/a"
            for top, bottom in ratios
        ]
        cells = [f"{row[column]:.1f}" for column in columns]
        print(f"| {size} | " + " | ".join(cells + ratio_cells) + " |")


if __name__ == "__main__":
    main()
