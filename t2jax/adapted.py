"""The adapted model: a loaded model with the SVD factors of its adapted kernels, and what runs on
it (generation and teacher-forced scoring) with one adaptation per batch row.

Training (`t2jax.rl`), evaluation and inference-time adaptation (`t2jax.adaptation`) all run on an
`AdaptedModel`. An adaptation is a pytree applied to named kernels inside `model.forward`; today
the only kind is SVF, whose adapter is the scales z {key: [L, R]} over the factors U, s, V of the
targets (W'(z) = U diag(s * z) V^T, z = 1 is the base model); the paper's baselines (LoRA, IA3,
DoRA: `t2jax.adapters.core.ModelAdapters`) plug in next to it. Calls take a list of `choices`
(adapters, None = the weights as loaded) and the choice of each row: rows sharing one choice run
with W' merged into the weights (the base model's cost), mixed rows with factored per-row SVF
adapters in one sampler call.

    model = adapted_model(load_model("smollm2-135m-instruct"), ("mlp.gate_proj",))
    generation = model.generate(prompts, [None, expert.z()], row_choice, max_new_tokens=256)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from t2jax import logprobs
from t2jax import model as model_lib
from t2jax import prefill as prefill_lib
from t2jax.adapters import core as adapters
from t2jax.adapters import weights as adapter_weights
from t2jax.config import ModelConfig, SamplerConfig
from t2jax.loading import LoadedModel
from t2jax.padding import bucket_length, left_pad
from t2jax.sampler import Generation, Sampler
from t2jax.svf import cache as svf_cache
from t2jax.svf import core as svf_lib
from t2jax.svf import factors as svf_factors

Array = jax.Array
# One row's adapter: SVF scales z {key: [L, R]}, a stacked LoRA / IA3 / DoRA adapter, or None (the
# weights as loaded).
Choice = svf_lib.ZVectors | adapters.ModelAdapters | None


@dataclasses.dataclass(frozen=True)
class AdaptedModel:
    """A loaded model and the SVD factors of its adapted kernels.

    Attributes:
        loaded: the model (its weights may lack the targets' dense kernels, see
            `load_model(..., skip=...)`: then only adapted calls work, e.g. with `base_z()`).
        factors: SVD factors of the targets (None: no SVF, e.g. to train a LoRA baseline; then
            only the weights as loaded and `ModelAdapters` choices work).
        sampler_config: padding buckets, the shared-prefix minimum and the decode options of
            every call (generation and teacher-forced scoring).
    """

    loaded: LoadedModel
    factors: svf_factors.ModelFactors | None
    sampler_config: SamplerConfig = SamplerConfig()

    @property
    def config(self) -> ModelConfig:
        """The architecture."""
        return self.loaded.config

    @property
    def weights(self) -> model_lib.Weights:
        """The weights as loaded."""
        return self.loaded.weights

    @property
    def tokenizer(self) -> Any:
        """The tokenizer."""
        return self.loaded.tokenizer

    @property
    def mesh(self) -> jax.sharding.Mesh:
        """The device mesh."""
        return self.loaded.mesh

    @property
    def targets(self) -> tuple[str, ...]:
        """SVF-adapted module keys, in HF order."""
        return () if self.factors is None else self.factors.targets

    @functools.cached_property
    def sampler(self) -> Sampler:
        """A sampler over the weights as loaded (its padding and sharding serve every call)."""
        return Sampler.for_model(self.loaded, sampler_config=self.sampler_config)

    def base_z(self) -> svf_lib.ZVectors:
        """z = 1 for every target {key: [L, R]} fp32: W'(1) = W, the base model."""
        ranks = self.factors.ranks()
        return {
            key: jnp.ones((self.factors.num_layers, rank), jnp.float32)
            for key, rank in ranks.items()
        }

    def merged_weights(
        self, choice: svf_lib.ZVectors | adapters.ModelAdapters
    ) -> model_lib.Weights:
        """The weights with the adapted kernels merged: W'(z) for SVF scales z, the kernels
        (and biases) of a LoRA / IA3 / DoRA adapter."""
        if isinstance(choice, adapters.ModelAdapters):
            return adapter_weights.merge_into_weights(self.weights, choice)
        return svf_factors.merge_into_weights(self.weights, self.factors, choice)

    def sampler_for(self, choice: Choice) -> Sampler:
        """A sampler over the adapter `choice` merged into the weights (None: as loaded)."""
        if choice is None:
            return self.sampler
        return Sampler.for_model(self.loaded, self.merged_weights(choice), self.sampler_config)

    def _choice_table(self, choices: Sequence[Choice]) -> dict[str, Array]:
        """{key: [C, L, R]}: the choices' z stacked, the weights as loaded (None) as z = 1.

        Raises:
            ValueError: a LoRA / IA3 / DoRA choice (rows of one call share such an adapter).
        """
        if any(isinstance(choice, adapters.ModelAdapters) for choice in choices):
            raise ValueError("LoRA / IA3 / DoRA adapters apply to whole calls, not mixed per row")
        rows = [self.base_z() if z is None else z for z in choices]
        return svf_lib.stack_experts(rows)  # {key: [C, L, R]}

    def _per_row_svf(
        self, table: Mapping[str, Array], row_choice: Sequence[int]
    ) -> svf_lib.ModelSVF:
        """Factored SVF with row i adapted by choice `row_choice[i]` of `table` {key: [C, L, R]}."""
        index = jnp.asarray(row_choice, jnp.int32)  # [B]
        z = {key: jnp.swapaxes(jnp.take(t, index, axis=0), 0, 1) for key, t in table.items()}
        return svf_factors.svf_from_factors(self.factors, z, "factored")  # z: {key: [L, B, R]}

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        choices: Sequence[Choice],
        row_choice: Sequence[int],
        *,
        max_new_tokens: int,
        stop_strings: Sequence[str] = (),
        rows_per_call: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> Generation:
        """Generation where prompt i runs with the adapter `choices[row_choice[i]]`.

        When every row uses the same choice, its W' is merged once and decoding runs at the base
        model's cost; otherwise each call is factored with one z per row.

        Args:
            prompts: rendered prompt strings or token-id lists.
            choices: adapters (z vectors {key: [L, R]}, or a LoRA / IA3 / DoRA adapter when
                every row uses it), or None for the weights as loaded.
            row_choice: the choice of each prompt.
            max_new_tokens: generation budget per row.
            stop_strings: generation stops at any of these.
            rows_per_call: rows per sampler call (None: every row in one call).
            temperature: 0 for greedy decoding.
            top_p: nucleus sampling mass.
            seed: PRNG seed; the call starting at row r uses `seed + r`.

        Returns:
            The generation, in prompt order.

        Raises:
            ValueError: `row_choice` and `prompts` differ in length.
        """
        if len(row_choice) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(row_choice)} row choices")
        if not prompts:
            return Generation([], [], [])
        used = sorted(set(row_choice))
        merged = len(used) == 1
        sampler = self.sampler_for(choices[used[0]]) if merged else self.sampler
        table = None if merged else self._choice_table(choices)
        step = rows_per_call or max(len(prompts), 1)
        calls = []
        for start in range(0, len(prompts), step):
            rows = slice(start, start + step)
            svf = None if merged else self._per_row_svf(table, row_choice[rows])
            calls.append(
                sampler.generate(
                    prompts[rows],
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    stop_strings=stop_strings,
                    seed=seed + start,
                    svf=svf,
                )
            )
        return concatenate(calls)

    def log_likelihood(
        self,
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        choices: Sequence[Choice],
        row_choice: Sequence[int],
        *,
        rows_per_call: int = 16,
        reduce: Literal["mean", "sum"] = "mean",
    ) -> np.ndarray:
        """Log-probability of each output given its prompt, under its row's adapter: the mean per
        token (the official CEM tie-break score) or the sum (the output's log-likelihood); 0.0 for
        an empty output.

        Args:
            prompt_ids: token ids of each prompt.
            output_ids: token ids of each output.
            choices: adapters, or None for the weights as loaded.
            row_choice: the choice of each row.
            rows_per_call: rows per teacher-forced pass (rounded up to a multiple of the
                data-parallel size: each call shards its rows on the mesh's data axes).
            reduce: "mean" or "sum" over the output's tokens.

        Returns:
            [B] float32.
        """
        sequences = [list(p) + list(o) for p, o in zip(prompt_ids, output_ids, strict=True)]
        if not sequences:
            return np.zeros(0, np.float32)
        as_loaded = all(choices[c] is None for c in set(row_choice))
        table = None if as_loaded else self._choice_table([*choices, None])
        multiple = self.sampler.batch_multiple  # calls shard their rows on the data axes
        rows_per_call = -(-rows_per_call // multiple) * multiple
        results = []
        for start in range(0, len(sequences), rows_per_call):
            rows = slice(start, start + rows_per_call)
            choice = list(row_choice[rows])
            shared = 0
            if len(set(choice)) == 1 and self.config.sliding_window is None:
                shared = prefill_lib.shared_prefix_length(
                    prompt_ids[rows], self.sampler.sampler_config.min_shared_prefix
                )
            choice += [len(choices)] * (rows_per_call - len(choice))  # padding rows: as loaded
            svf = None if as_loaded else self._per_row_svf(table, choice)
            scores = self._output_log_prob(
                sequences[rows], output_ids[rows], svf, rows_per_call, shared, reduce == "mean"
            )  # [rows_per_call]
            results.append(scores[: len(sequences[rows])])
        return np.concatenate(results)

    def _output_log_prob(
        self,
        sequences: Sequence[Sequence[int]],
        outputs: Sequence[Sequence[int]],
        svf: svf_lib.ModelSVF | None,
        batch: int,
        shared: int,
        mean: bool,
    ) -> np.ndarray:
        """One teacher-forced call of `log_likelihood` over rows (prompt + output) `sequences`,
        padded to `batch` rows: with `shared` > 0 their first `shared` tokens run once
        (`prefill.broadcast_prefix`). Only the last positions, those that predict the outputs, go
        through the lm_head."""
        buckets = self.sampler.sampler_config.prompt_buckets
        prefix = None
        if shared:
            prefix_ids, prefix_mask, tokens, mask = prefill_lib.split_at_prefix(
                sequences, shared, batch, buckets
            )
            width = prefix_ids.shape[1]
            prefix = SharedPrefix(
                prefix_ids,
                prefix_mask,
                self.sampler.new_cache(1, width, sharded=False),
                self.sampler.new_cache(batch, width + tokens.shape[1]),
            )
        else:
            tokens, mask = left_pad(
                sequences, bucket_length(max(map(len, sequences)), buckets), batch
            )  # [b, T] each
        length = tokens.shape[1]
        target_mask = np.zeros_like(mask)
        for row, output in enumerate(outputs):
            target_mask[row, length - len(output) :] = len(output) > 0
        longest = max(map(len, outputs))
        tail = min(length, -(-(longest + 1) // 16) * 16)  # positions that predict outputs
        place = self.sampler.place_batch
        return np.asarray(
            _output_log_prob(
                self.config,
                self.weights,
                svf,
                place(tokens),
                place(mask),
                place(target_mask),
                mean,
                tail,
                prefix,
            )
        )


def adapted_model(
    loaded: LoadedModel,
    targets: Sequence[str],
    *,
    cache_root: str | None = None,
    progress: bool = True,
) -> AdaptedModel:
    """The adapted model of `loaded` for `targets`, its SVD factors computed once and cached on
    disk (under `cache_root`, default `svf.cache.default_cache_root()`)."""
    factors = svf_cache.loaded_model_factors(
        loaded, targets, cache_root=cache_root, progress=progress
    )
    return AdaptedModel(loaded=loaded, factors=factors)


def concatenate(generations: Sequence[Generation]) -> Generation:
    """One generation of several calls' rows, in order."""
    return Generation(
        texts=[text for g in generations for text in g.texts],
        token_ids=[ids for g in generations for ids in g.token_ids],
        finish_reasons=[reason for g in generations for reason in g.finish_reasons],
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SharedPrefix:
    """The tokens every row of a scoring call starts with (`prefill.broadcast_prefix`): ids and
    mask [1, Q] (left-padded) and the empty caches they run into (1 row of Q slots; B rows of
    Q + S slots)."""

    ids: Array
    mask: Array
    prefix_cache: model_lib.KVCache
    cache: model_lib.KVCache


@functools.partial(jax.jit, static_argnames=("config", "mean", "tail"))
def _output_log_prob(
    config: ModelConfig,
    weights: model_lib.Weights,
    svf: svf_lib.ModelSVF | None,
    tokens: Array,
    mask: Array,
    target_mask: Array,
    mean: bool,
    tail: int,
    prefix: SharedPrefix | None = None,
) -> Array:
    """Summed (or mean) log-probability [B] of the tokens marked by `target_mask` [B, T] given
    what precedes them; 0 for rows without targets. With `prefix`, the rows are prefix + `tokens`:
    the prefix runs once, under row 0's adaptation, and `tokens` attend to it. Only the last
    `tail` positions (which must hold every target's predecessor) go through the lm_head, 64
    positions at a time."""
    if prefix is None:
        cache, positions = None, model_lib.positions_from_mask(mask)  # positions: [B, T]
    else:
        prefix_svf = None if svf is None else svf_lib.take_expert_rows(svf, jnp.zeros(1, jnp.int32))
        cache, positions = prefill_lib.broadcast_prefix(
            config,
            weights,
            prefix.ids,
            prefix.mask,
            prefix.prefix_cache,
            prefix.cache,
            mask,
            prefix_svf,
        )  # positions: [B, T]
    hidden, _ = model_lib.forward(config, weights, tokens, positions, mask, cache, svf)  # [B, T, D]
    next_tokens = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))  # [B, T]: the token each one predicts
    token_log_probs, _ = logprobs.token_log_probs(
        weights, hidden[:, -tail:], next_tokens[:, -tail:], math.gcd(tail, 64)
    )  # [B, W]
    return _reduce_targets(token_log_probs, target_mask, mean)


def _reduce_targets(token_log_probs: Array, target_mask: Array, mean: bool) -> Array:
    """Sum (or mean) over each row's targets [B, T] of the log-probabilities [B, W] of the last W
    positions' next tokens (position t scores token t + 1)."""
    width = token_log_probs.shape[1]
    scored = jnp.pad(target_mask[:, 1:], ((0, 0), (0, 1)))[:, -width:]  # [B, W]
    total = jnp.sum(jnp.where(scored, token_log_probs, 0.0), axis=-1)  # [B]
    return total / jnp.maximum(jnp.sum(scored, axis=-1), 1) if mean else total  # [B]
