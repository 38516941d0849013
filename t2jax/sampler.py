"""Batched text generation: one jitted prefill, then one jitted `lax.while_loop` decode.

Prompts are left-padded to a length bucket, so every row writes the same cache slot at each step
and pads never shift RoPE positions. The output buffer has a bucketed static length; the number of
new tokens, the temperature and top-p are traced arrays, so changing them never recompiles. The loop
stops as soon as every row has produced an end id. Stop strings need the tokenizer, so they are
checked on the host between decode chunks (rows that hit one are marked done) and the text is cut
at the stop string. Between chunks, once at most half of the rows are still generating, the batch
is compacted to those rows (`SamplerConfig.compact_rows`): finished rows stop costing compute.
Prompts that share a long token prefix prefill it once (`t2jax.prefill.prefill_shared`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t2jax import model as model_lib
from t2jax import parallel
from t2jax.config import ModelConfig, SamplerConfig
from t2jax.loading import LoadedModel
from t2jax.padding import bucket_length, left_pad, new_tokens_bucket
from t2jax.prefill import (
    DecodeState,
    empty_cache,
    jit_over_cache,
    prefill,
    prefill_shared,
    sample_token,
    shared_prefix_length,
    split_at_prefix,
)
from t2jax.svf.core import ModelSVF, pad_expert_rows, take_expert_rows

Array = jax.Array

STOP_CHECK_CHUNK = 32  # decode steps between host-side checks (stop strings, compaction)


@dataclasses.dataclass(frozen=True)
class Generation:
    """Result of `Sampler.generate`, one entry per prompt."""

    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]  # "eos", "stop" or "length"

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.token_ids]


@jit_over_cache(donate="state")
def decode(
    config: ModelConfig,
    weights: model_lib.Weights,
    svf: ModelSVF | None,
    state: DecodeState,
    key: Array,
    temperature: Array,
    top_p: Array,
    eos_ids: Array,
    stop_at_step: Array,
) -> DecodeState:
    """Generates tokens until `step == stop_at_step` or every row is done."""

    def keep_going(state: DecodeState) -> Array:
        return (state.step < stop_at_step) & ~jnp.all(state.done)

    def one_token(state: DecodeState) -> DecodeState:
        tokens = state.next_token[:, None]  # [B, 1]
        positions = state.next_position[:, None]  # [B, 1]
        live = ~state.done[:, None]  # [B, 1]
        hidden, cache = model_lib.forward(
            config, weights, tokens, positions, live, state.cache, svf
        )
        step_logits = model_lib.logits(weights, hidden[:, 0])  # [B, V]
        new = sample_token(step_logits, jax.random.fold_in(key, state.step), temperature, top_p)
        finished = state.done | jnp.isin(new, eos_ids)  # [B]
        column = jnp.where(finished, 0, new)[:, None]  # [B, 1]
        return DecodeState(
            cache=cache,
            tokens=jax.lax.dynamic_update_slice(state.tokens, column, (0, state.step)),
            next_token=new,
            next_position=state.next_position + 1,
            done=finished,
            lengths=state.lengths + (~finished).astype(jnp.int32),
            step=state.step + 1,
        )

    return jax.lax.while_loop(keep_going, one_token, state)


@jax.jit
def take_rows(
    state: DecodeState, svf: ModelSVF | None, rows: Array
) -> tuple[DecodeState, ModelSVF | None]:
    """The decode state, and per-row experts, of batch rows `rows` [B'] (in that order)."""

    def take(x: Array) -> Array:  # [B, ...]
        return jnp.take(x, rows, axis=0)  # [B', ...]

    kept = DecodeState(
        cache=model_lib.take_cache_rows(state.cache, rows),
        tokens=take(state.tokens),
        next_token=take(state.next_token),
        next_position=take(state.next_position),
        done=take(state.done),
        lengths=take(state.lengths),
        step=state.step,
    )
    return kept, None if svf is None else take_expert_rows(svf, rows)


def compacted_rows(done: np.ndarray, multiple: int = 1) -> np.ndarray | None:
    """Rows to keep once at most half of a batch is still generating: every live row, plus
    finished ones up to a power of two rounded up to `multiple` (so batch shapes, and their
    compilations, repeat). None when that would not at least halve the batch."""
    live = np.flatnonzero(~done)
    size = 1 << max(len(live) - 1, 0).bit_length()
    size = -(-size // multiple) * multiple
    if 2 * size > len(done):
        return None
    filler = np.flatnonzero(done)[: size - len(live)]
    return np.sort(np.concatenate([live, filler]))


@dataclasses.dataclass
class _Rows:
    """Host copy of each prompt row's output, filled as rows leave the batch (compaction) and at
    the end. `batch_rows[i]` is the original row of batch row i."""

    tokens: np.ndarray  # [R, N] int32
    lengths: np.ndarray  # [R] int32
    done: np.ndarray  # [R] bool
    stopped: np.ndarray  # [R] bool: ended by a stop string
    batch_rows: np.ndarray  # [B] int: original row of each batch row

    @classmethod
    def empty(cls, rows: int, out_length: int) -> _Rows:
        return cls(
            tokens=np.zeros((rows, out_length), np.int32),
            lengths=np.zeros(rows, np.int32),
            done=np.zeros(rows, bool),
            stopped=np.zeros(rows, bool),
            batch_rows=np.arange(rows),
        )

    def store(self, state: DecodeState, stopped: np.ndarray) -> None:
        """Copies the batch's current outputs to their original rows."""
        rows = self.batch_rows
        self.tokens[rows] = np.asarray(state.tokens)
        self.lengths[rows] = np.asarray(state.lengths)
        self.done[rows] = np.asarray(state.done)
        self.stopped[rows] = stopped


class Sampler:
    """Generates text for batches of prompts with a loaded model.

    Args:
        config: model architecture.
        weights: model parameters (already placed/sharded as desired); the sampler runs them
            with q|k|v and gate|up fused when `sampler_config.fuse_projections` is on.
        tokenizer: a transformers tokenizer (for encoding strings and checking stop strings).
        eos_ids: every id that ends a sequence.
        sampler_config: bucket sizes.
        batch_sharding: optional sharding for [B, ...] inputs (batch on the mesh's data axes).
        batch_multiple: batches are padded to a multiple of this (e.g. the data-parallel size).
    """

    def __init__(
        self,
        config: ModelConfig,
        weights: model_lib.Weights,
        tokenizer: Any,
        eos_ids: Sequence[int],
        sampler_config: SamplerConfig = SamplerConfig(),
        batch_sharding: jax.sharding.Sharding | None = None,
        batch_multiple: int = 1,
    ):
        if not eos_ids:
            raise ValueError("at least one end-of-sequence id is required")
        self.config = config
        fuse = sampler_config.fuse_projections
        self.weights = model_lib.fuse_projections(weights) if fuse else weights
        self.tokenizer = tokenizer
        self.eos_ids = jnp.asarray(sorted(set(eos_ids)), jnp.int32)
        self.sampler_config = sampler_config
        self.batch_sharding = batch_sharding
        self.batch_multiple = batch_multiple

    @classmethod
    def for_model(
        cls,
        loaded: LoadedModel,
        weights: model_lib.Weights | None = None,
        sampler_config: SamplerConfig = SamplerConfig(),
    ) -> Sampler:
        """A sampler over a loaded model (or over other `weights` with its tokenizer, end ids and
        mesh), with batches sharded on the mesh's data axes."""
        return cls(
            loaded.config,
            loaded.weights if weights is None else weights,
            loaded.tokenizer,
            loaded.eos_ids,
            sampler_config,
            batch_sharding=parallel.batch_sharding(loaded.mesh),
            batch_multiple=parallel.data_parallel_size(loaded.mesh),
        )

    def encode(self, prompts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of already-rendered prompt strings (chat templates add their own BOS)."""
        return [
            self.tokenizer.encode(text, add_special_tokens=add_special_tokens) for text in prompts
        ]

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_strings: Sequence[str] = (),
        seed: int = 0,
        svf: ModelSVF | None = None,
        ignore_eos: bool = False,
    ) -> Generation:
        """Generates a completion for each prompt (strings are encoded without special tokens).

        Args:
            prompts: rendered prompt strings, or token-id lists.
            max_new_tokens: upper bound on generated tokens per row.
            temperature: 0 for greedy decoding.
            top_p: nucleus sampling mass (1.0 disables it).
            stop_strings: a row stops at the first of these; its text is cut before it.
            seed: PRNG seed for sampling.
            svf: SVF adaptation: merged (one expert) or factored (z per row, [L, B, R] leaves).
            ignore_eos: keep generating past end ids (benchmarks).

        Returns:
            The decoded texts, generated ids (without the end id) and finish reasons.
        """
        if not prompts:
            return Generation([], [], [])
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        token_lists = [self.encode([p])[0] if isinstance(p, str) else list(p) for p in prompts]
        if any(not tokens for tokens in token_lists):
            raise ValueError("every prompt must contain at least one token")
        rows = -(-len(token_lists) // self.batch_multiple) * self.batch_multiple
        if svf is not None:
            svf = pad_expert_rows(svf, rows)  # per-row experts follow the batch padding
        key = jax.random.key(seed)
        temperature_array = jnp.asarray(temperature, jnp.float32)
        top_p_array = jnp.asarray(top_p, jnp.float32)
        eos_ids = jnp.asarray([-1], jnp.int32) if ignore_eos else self.eos_ids
        sampling = (key, temperature_array, top_p_array, eos_ids)
        shared = 0
        if svf is None and self.config.sliding_window is None:
            shared = shared_prefix_length(token_lists, self.sampler_config.min_shared_prefix)
        if shared:
            state = self._prefill_shared(token_lists, shared, rows, max_new_tokens, sampling)
        else:
            length = bucket_length(max(map(len, token_lists)), self.sampler_config.prompt_buckets)
            ids, mask = left_pad(token_lists, length, rows)
            cache = self.new_cache(rows, length + new_tokens_bucket(max_new_tokens))
            ids, mask = self.place_batch(ids), self.place_batch(mask)
            state = prefill(self.config, self.weights, svf, ids, mask, cache, *sampling)
        compact = self.sampler_config.compact_rows
        chunk = STOP_CHECK_CHUNK if stop_strings or compact else max_new_tokens
        outputs = _Rows.empty(rows, state.tokens.shape[1])
        stopped = np.zeros(rows, bool)
        while True:
            target = min(int(state.step) + chunk, max_new_tokens)
            state = decode(
                self.config,
                self.weights,
                svf,
                state,
                key,
                temperature_array,
                top_p_array,
                eos_ids,
                jnp.asarray(target, jnp.int32),
            )
            if stop_strings:
                state, stopped = self._apply_stop_strings(state, stop_strings, stopped)
            done = np.asarray(state.done)
            if int(state.step) >= max_new_tokens or done.all():
                break
            kept = compacted_rows(done, self.batch_multiple) if compact else None
            if kept is not None:
                outputs.store(state, stopped)
                state, svf = take_rows(state, svf, jnp.asarray(kept, jnp.int32))
                outputs.batch_rows, stopped = outputs.batch_rows[kept], stopped[kept]
        outputs.store(state, stopped)
        return self._finish(outputs, len(token_lists), stop_strings)

    def new_cache(self, rows: int, length: int, sharded: bool = True) -> model_lib.KVCache:
        """An empty cache of `length` slots per row, sharded like the batch (or not)."""
        return empty_cache(
            self.config,
            rows,
            length,
            jnp.dtype(self.weights.embed.dtype),
            model_lib.is_stacked(self.weights.layers),
            getattr(self.batch_sharding, "mesh", None) if sharded else None,
        )

    def _prefill_shared(
        self,
        token_lists: list[list[int]],
        shared: int,
        rows: int,
        max_new_tokens: int,
        sampling: tuple[Array, ...],
    ) -> DecodeState:
        """`prefill_shared` of prompts whose first `shared` tokens are the same."""
        prefix, prefix_mask, ids, mask = split_at_prefix(
            token_lists, shared, rows, self.sampler_config.prompt_buckets
        )
        prefix_cache = self.new_cache(1, prefix.shape[1], sharded=False)
        slots = prefix.shape[1] + ids.shape[1] + new_tokens_bucket(max_new_tokens)
        return prefill_shared(
            self.config,
            self.weights,
            jnp.asarray(prefix),
            jnp.asarray(prefix_mask),
            self.place_batch(ids),
            self.place_batch(mask),
            prefix_cache,
            self.new_cache(rows, slots),
            *sampling,
        )

    def place_batch(self, array: np.ndarray) -> Array:
        """A host array (the same on every process) as a global array with the batch sharding;
        each process supplies its addressable shards, so this also works across hosts."""
        if self.batch_sharding is None:
            return jnp.asarray(array)
        return jax.make_array_from_callback(
            array.shape, self.batch_sharding, lambda index: array[index]
        )

    def _apply_stop_strings(
        self, state: DecodeState, stop_strings: Sequence[str], stopped: np.ndarray
    ) -> tuple[DecodeState, np.ndarray]:
        """Marks rows whose text so far contains a stop string as done."""
        tokens, lengths, done = (np.asarray(x) for x in (state.tokens, state.lengths, state.done))
        stopped = stopped.copy()
        for row in np.flatnonzero(~done):
            text = self.tokenizer.decode(tokens[row, : lengths[row]].tolist())
            stopped[row] = any(stop in text for stop in stop_strings)
        if not stopped.any():
            return state, stopped
        new_done = jnp.asarray(done | stopped)
        return dataclasses.replace(state, done=new_done), stopped

    def _finish(self, outputs: _Rows, num_prompts: int, stop_strings: Sequence[str]) -> Generation:
        texts, token_ids, reasons = [], [], []
        for row in range(num_prompts):
            ids = outputs.tokens[row, : outputs.lengths[row]].tolist()
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            cut = _cut_at_stop_string(text, stop_strings)
            if outputs.stopped[row] or cut != text:
                reasons.append("stop")
            elif outputs.done[row]:
                reasons.append("eos")
            else:
                reasons.append("length")
            texts.append(cut)
            token_ids.append(ids)
        return Generation(texts=texts, token_ids=token_ids, finish_reasons=reasons)


def _cut_at_stop_string(text: str, stop_strings: Sequence[str]) -> str:
    """Text before the earliest occurrence of any stop string."""
    positions = [text.find(stop) for stop in stop_strings if stop in text]
    return text[: min(positions)] if positions else text
