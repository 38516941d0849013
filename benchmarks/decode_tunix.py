"""Greedy decoding throughput: t2jax vs google-tunix's vanilla sampler, same weights, same run.

    python benchmarks/decode_tunix.py --tunix-python /work/tunix-venv/bin/python \
        [--models smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct] [--batch-sizes 1,8,32] \
        [--max-new-tokens 128] [--repeats 3]

tunix is a benchmark-only dependency, and it cannot live in t2jax's environment: google-tunix
0.1.7 (the version issue 17 measured) requires safetensors<0.8 and resolves to transformers 5.12 /
tokenizers 0.22, while t2jax pins safetensors>=0.8,<0.9, transformers>=5.23 and tokenizers>=0.23
(0.1.6 pins transformers<=4.57.1). So tunix gets its own virtual environment, with the same jax
as t2jax, and runs in a worker subprocess of that interpreter (`--tunix-python`):

    python3.11 -m venv /work/tunix-venv
    /work/tunix-venv/bin/pip install google-tunix==0.1.7 jax==0.10.2 jaxlib==0.10.2
    # on a GPU host: ... "jax[cuda12]==0.10.2" instead of jax/jaxlib

Without `--tunix-python` the tunix side runs in this interpreter (for an environment that has
both). With a worker, each process gets XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 (unless set) so both
fit on one GPU; a TPU cannot be shared by two processes, so there use one environment.

Weights. t2jax loads each registry model (a GGUF file) in bf16 and writes it with
`t2jax.export.export_hf` as a standard HF checkpoint (bf16 `model.safetensors`, config.json,
tokenizer; what `t2jax export --model M --out DIR` writes for the base model), and tunix builds
its Qwen2 / Llama3 model from that directory (`tunix.models.{qwen2,llama3}.params.
create_model_from_safe_tensors`, bf16 parameters and, for Qwen2, bf16 compute dtype; tunix's
Llama3 computes in its parameters' dtype). Both sides hold bit-identical bf16 weights.

Equal token counts. End ids are switched off on both sides: t2jax with `ignore_eos=True`, tunix
with `eos_tokens=[-1]` (an id that never occurs), so every row of both generates exactly
`--max-new-tokens` tokens, which is asserted on every call; tokens/s = batch * max_new_tokens /
wall seconds of one generate call (tokenizing, prefill, decode and detokenizing included;
compilation excluded: one untimed warm-up call per side and batch size). tunix's cache is as small
as its sampler allows (prompts padded to the next power of two, plus the new tokens). Its decode
loop runs one step more than it keeps (its last token is dropped); that step is part of its cost.

Same prompt ids. tunix encodes each prompt itself and prepends the tokenizer's BOS; t2jax encodes
without special tokens. The Qwen2.5 GGUF names <|endoftext|> as BOS though its model never gets
one, so when a prepended BOS is the only difference the worker unsets BOS on tunix's tokenizer.
tunix also treats every prompt token equal to the pad id as padding, and SmolLM2's pad token is
<|im_end|>, which every chat prompt contains: then tunix gets another special token that no
prompt contains as its pad (this changes masking only, not cost). Both sides' prompt ids are
checked to be identical on every batch; the script stops otherwise.

Timing: per batch size, tunix, t2jax with fused projections (q|k|v and gate|up each one matmul,
`SamplerConfig(fuse_projections=True)`) and without (the default) take
turns (the order reverses every round) for `--repeats` rounds; the table shows medians. Greedy
outputs are compared per row: the number of leading tokens t2jax and tunix generate identically
(bf16 rounding differs between the two implementations, so long rows may diverge after a
near-tie).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

DEFAULT_MODELS = "smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct"
MEM_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
MEM_FRACTION = "0.45"


# ----------------------------------------------------------------------------------------------
# The tunix side (imports only tunix, jax, transformers: it runs in tunix's environment).


class TunixRunner:
    """tunix's vanilla `Sampler` over an HF checkpoint directory."""

    def __init__(self) -> None:
        self.model = None
        self.tokenizer = None
        self.config: dict[str, Any] = {}
        self.samplers: dict[int, Any] = {}

    def load(
        self, model_dir: str, prompts: list[str], prompt_ids: list[list[int]]
    ) -> dict[str, Any]:
        """Builds the model from `model_dir` (bf16) and sets up its tokenizer so that tunix
        encodes `prompts` as `prompt_ids` (t2jax's encoding) and pads with an id they lack.

        tunix prepends the tokenizer's BOS to every prompt. A GGUF file's tokenizer may name a BOS
        that its model never gets (Qwen2.5: <|endoftext|>, add_bos_token false), so when that
        prepended BOS is the only difference it is unset.
        """
        from importlib.metadata import version

        import jax
        import jax.numpy as jnp
        import transformers

        self.config = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
        self.model = _tunix_model(model_dir, self.config, jnp.bfloat16)
        self.tokenizer = tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.samplers = {}
        notes = []

        def encoded() -> list[list[int]]:
            return [self._sampler(0).tokenize(prompt).tolist() for prompt in prompts]

        bos = tokenizer.bos_token_id
        if bos is not None and encoded() == [[bos, *ids] for ids in prompt_ids]:
            tokenizer.bos_token = None
            notes.append(f"tunix would prepend BOS {bos}, which t2jax does not; unset it")
        if encoded() != prompt_ids:
            raise RuntimeError("tunix and t2jax encode the prompts differently")
        used = {i for ids in prompt_ids for i in ids}
        pad_id = tokenizer.pad_token_id
        if pad_id is None or pad_id in used:
            candidates = [*tokenizer.all_special_ids, *sorted(tokenizer.added_tokens_decoder)]
            free = [i for i in candidates if i not in used]
            if not free:
                raise RuntimeError("every special token occurs in the prompts; no pad id for tunix")
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(free[0])
            notes.append(
                f"tunix would pad with id {pad_id}, which the prompts contain; "
                f"it pads with id {tokenizer.pad_token_id} instead"
            )
        self.samplers = {}
        device = jax.devices()[0]
        return {
            "tunix": version("google-tunix"),
            "jax": jax.__version__,
            "device": f"{len(jax.devices())} x {device.device_kind}",
            "notes": notes,
        }

    def _sampler(self, cache_size: int):
        from tunix.generate import sampler as sampler_lib

        if cache_size not in self.samplers:
            config = self.config
            heads = config["num_attention_heads"]
            cache = sampler_lib.CacheConfig(
                cache_size=cache_size,
                num_layers=config["num_hidden_layers"],
                num_kv_heads=config["num_key_value_heads"],
                head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            )
            self.samplers[cache_size] = sampler_lib.Sampler(self.model, self.tokenizer, cache)
        return self.samplers[cache_size]

    def generate(self, prompts: list[str], max_new_tokens: int) -> dict[str, Any]:
        """One greedy call, end ids off; wall seconds, generated ids and prompt ids per row."""
        from tunix.generate import utils as tunix_utils

        longest = max(len(self._sampler(0).tokenize(prompt)) for prompt in prompts)
        # The sampler pads prompts to the next power of two (`max_prompt_length=None`).
        sampler = self._sampler(tunix_utils.next_power_of_2(longest) + max_new_tokens)
        start = time.perf_counter()
        output = sampler(
            prompts, max_generation_steps=max_new_tokens, eos_tokens=[-1], temperature=0.0
        )
        seconds = time.perf_counter() - start
        pad = self.tokenizer.pad_token_id
        prompt_ids = []
        for row in output.padded_prompt_tokens.tolist():
            first = next(i for i, token in enumerate(row) if token != pad)
            prompt_ids.append(row[first:])
        return {
            "seconds": seconds,
            "tokens": [[int(t) for t in row] for row in output.tokens],
            "prompt_ids": prompt_ids,
        }


def _tunix_model(model_dir: str, config: dict[str, Any], dtype: Any):
    """tunix's Qwen2 or Llama3 model with the checkpoint's weights in `dtype`."""
    rope = config.get("rope_parameters") or {}
    rope_theta = config.get("rope_theta", rope.get("rope_theta"))
    scaling = config.get("rope_scaling")
    if rope.get("rope_type", "default") != "default":
        scaling = rope
    if scaling:
        raise ValueError(f"tunix's models here apply no RoPE scaling; {model_dir} has {scaling}")
    if config.get("use_sliding_window"):
        raise ValueError("tunix's Qwen2 has no sliding window")
    heads = config["num_attention_heads"]
    common = dict(
        num_layers=config["num_hidden_layers"],
        vocab_size=config["vocab_size"],
        embed_dim=config["hidden_size"],
        hidden_dim=config["intermediate_size"],
        num_heads=heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        num_kv_heads=config["num_key_value_heads"],
        rope_theta=int(rope_theta),
        norm_eps=config["rms_norm_eps"],
    )
    tied = bool(config.get("tie_word_embeddings", False))
    if config["model_type"] == "qwen2":
        from tunix.models.qwen2 import model as model_lib
        from tunix.models.qwen2 import params as params_lib

        model_config = model_lib.ModelConfig(
            **common, use_tied_embedding=tied, dtype=dtype, param_dtype=dtype
        )
    elif config["model_type"] == "llama":
        from tunix.models.llama3 import model as model_lib
        from tunix.models.llama3 import params as params_lib

        model_config = model_lib.ModelConfig(**common, weight_tying=tied)
    else:
        raise ValueError(f"no tunix model for model_type {config['model_type']!r}")
    return params_lib.create_model_from_safe_tensors(model_dir, model_config, dtype=dtype)


def worker_main() -> None:
    """JSON-lines server on stdin/stdout for `TunixProcess` (anything else printed to stdout,
    from Python or C++, goes to stderr)."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    runner = TunixRunner()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            method = getattr(runner, request.pop("op"))
            reply = {"ok": True, "result": method(**request)}
        except Exception as error:  # reported to the parent, which raises it
            import traceback

            reply = {"ok": False, "error": f"{error!r}\n{traceback.format_exc()}"}
        replies.write(json.dumps(reply) + "\n")


class TunixProcess:
    """`TunixRunner` in a worker subprocess of another interpreter (tunix's environment)."""

    def __init__(self, python: str) -> None:
        env = dict(os.environ)
        env.setdefault(MEM_FRACTION_ENV, MEM_FRACTION)
        self.process = subprocess.Popen(
            [python, os.path.abspath(__file__), "--tunix-worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def _call(self, op: str, **kwargs: Any) -> Any:
        self.process.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the tunix worker exited (code {self.process.wait()})")
        reply = json.loads(line)
        if not reply["ok"]:
            raise RuntimeError(f"tunix worker: {reply['error']}")
        return reply["result"]

    def load(
        self, model_dir: str, prompts: list[str], prompt_ids: list[list[int]]
    ) -> dict[str, Any]:
        return self._call("load", model_dir=model_dir, prompts=prompts, prompt_ids=prompt_ids)

    def generate(self, prompts: list[str], max_new_tokens: int) -> dict[str, Any]:
        return self._call("generate", prompts=prompts, max_new_tokens=max_new_tokens)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


# ----------------------------------------------------------------------------------------------
# The t2jax side and the comparison (t2jax's environment).


def time_t2jax(sampler, prompts: list[str], max_new_tokens: int) -> dict[str, Any]:
    """One greedy t2jax call with end ids ignored: wall seconds and generated ids per row."""
    start = time.perf_counter()
    generation = sampler.generate(prompts, max_new_tokens=max_new_tokens, ignore_eos=True)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": generation.token_ids}


def common_prefix(a: list[int], b: list[int]) -> int:
    """Number of leading tokens `a` and `b` share."""
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


def benchmark_model(name: str, tunix, args: argparse.Namespace, export_root: pathlib.Path):
    """Rows {batch: {...}} for one model, and what the tunix worker reported about itself."""
    from decode import QUESTIONS, chat_prompts

    from t2jax import export
    from t2jax.config import SamplerConfig
    from t2jax.loading import load_model
    from t2jax.sampler import Sampler

    loaded = load_model(name)  # bf16 parameters (t2jax's default)
    sampler = Sampler.for_model(loaded)  # the defaults: separate q/k/v and gate/up kernels
    fused = Sampler.for_model(loaded, sampler_config=SamplerConfig(fuse_projections=True))
    model_dir = export_root / name
    if not (model_dir / export.WEIGHTS_FILE).exists():
        export.export_hf(loaded, None, None, model_dir, dtype="bfloat16")
        print(f"{name}: exported bf16 weights to {model_dir}", flush=True)
    prompts = chat_prompts(loaded.tokenizer, len(QUESTIONS))
    info = tunix.load(str(model_dir), prompts, sampler.encode(prompts))
    for note in info["notes"]:
        print(f"{name}: {note}", flush=True)
    new = args.max_new_tokens
    rows = {}
    for size in args.batch_sizes:
        prompts = chat_prompts(loaded.tokenizer, size)
        runs = {
            "tunix": lambda prompts=prompts: tunix.generate(prompts, new),
            "t2jax": lambda prompts=prompts: time_t2jax(sampler, prompts, new),
            "t2jax fused": lambda prompts=prompts: time_t2jax(fused, prompts, new),
        }
        last = {label: run() for label, run in runs.items()}  # compiles: untimed
        if last["tunix"]["prompt_ids"] != sampler.encode(prompts):
            raise RuntimeError(f"{name}: tunix and t2jax encode the prompts differently")
        rates = {label: [] for label in runs}
        for repeat in range(args.repeats):
            order = list(runs) if repeat % 2 == 0 else list(runs)[::-1]
            for label in order:
                last[label] = runs[label]()
                lengths = {len(row) for row in last[label]["tokens"]}
                assert lengths == {new} and len(last[label]["tokens"]) == size, (label, lengths)
                rates[label].append(size * new / last[label]["seconds"])
        prefixes = [
            common_prefix(a, b)
            for a, b in zip(last["tunix"]["tokens"], last["t2jax"]["tokens"], strict=True)
        ]
        rows[size] = {
            **{label: statistics.median(values) for label, values in rates.items()},
            "all": rates,
            "prefixes": prefixes,
        }
        print(
            f"{name} batch {size}: "
            + ", ".join(f"{label} {rows[size][label]:.1f} tok/s" for label in runs)
            + " (runs: "
            + ", ".join(f"{label} " + "/".join(f"{r:.1f}" for r in rates[label]) for label in rates)
            + f"); identical leading tokens per row: {prefixes}",
            flush=True,
        )
    return rows, info


def report(name: str, rows: dict, info: dict, args: argparse.Namespace) -> None:
    """The Markdown table for one model, with the command, date and machine."""
    import jax

    device = jax.devices()[0]
    new = args.max_new_tokens
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"\n{name}, greedy, {new} new tokens per row (end ids off on both sides), bf16 weights, "
        f"tokens/s end to end, median of {args.repeats} interleaved runs (higher is better)"
    )
    print(f"command: python {' '.join(sys.argv)}")
    print(f"date: {when}")
    cpu = platform.processor() or platform.machine()
    print(
        f"machine: {cpu}, {os.cpu_count()} cores; t2jax: jax {jax.__version__}, "
        f"{len(jax.devices())} x {device.device_kind}; tunix {info['tunix']}: "
        f"jax {info['jax']}, {info['device']}"
    )
    print(
        "| batch | tunix tok/s | t2jax tok/s | t2jax fused tok/s | t2jax / tunix | "
        "fused / t2jax | rows identical (t2jax vs tunix) | "
        "identical leading tokens (min / median) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for size, row in rows.items():
        prefixes = row["prefixes"]
        same = sum(p == new for p in prefixes)
        print(
            f"| {size} | {row['tunix']:.1f} | {row['t2jax']:.1f} | {row['t2jax fused']:.1f} | "
            f"{row['t2jax'] / row['tunix']:.2f}x | {row['t2jax fused'] / row['t2jax']:.2f}x | "
            f"{same}/{len(prefixes)} | "
            f"{min(prefixes)} / {statistics.median(prefixes):g} of {new} |"
        )


def main() -> None:
    if "--tunix-worker" in sys.argv[1:]:
        worker_main()
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated registry names")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--tunix-python",
        default=None,
        help="interpreter of an environment with google-tunix (see the module docstring); "
        "omit to import tunix here",
    )
    parser.add_argument(
        "--export-dir",
        default=None,
        help="keep the exported HF checkpoints under EXPORT_DIR/<model> and reuse them "
        "(default: a temporary directory, removed at the end)",
    )
    args = parser.parse_args()
    args.batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # benchmarks/decode.py

    from t2jax.checkpoints.registry import REGISTRY

    unknown = [name for name in models if name not in REGISTRY]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {sorted(REGISTRY)}")
    if args.tunix_python:
        os.environ.setdefault(MEM_FRACTION_ENV, MEM_FRACTION)  # before jax starts a backend
        tunix = TunixProcess(args.tunix_python)
    else:
        if importlib.util.find_spec("tunix") is None:
            parser.error("tunix is not importable here; pass --tunix-python (see the docstring)")
        tunix = TunixRunner()
    with contextlib.ExitStack() as stack:
        if isinstance(tunix, TunixProcess):
            stack.callback(tunix.close)
        if args.export_dir:
            export_root = pathlib.Path(args.export_dir)
        else:
            export_root = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory()))
        results = [(name, *benchmark_model(name, tunix, args, export_root)) for name in models]
    for name, rows, info in results:
        report(name, rows, info, args)


if __name__ == "__main__":
    main()
