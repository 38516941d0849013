"""The REINFORCE objective of SVF training, its gradient and the optimizer update (spec section 2).

The objective (spec section 2.2) over a batch of B rollouts y_j with rewards r_j:

    L(p) = (1/B) sum_j [ -A_j sum_t log pi_{W'(p)}(y_jt | x_j, y_j<t)  +  lambda KL_j ]

with A_j = r_j (official; optionally normalized or with a leave-one-out baseline,
`t2jax.rl.batch.compute_advantages`) and the KL to the base model summed over generated positions
and the vocabulary, in either direction (spec section 2.3). The next-token objective (the paper's
baseline, spec section 2.5) scores reference completions instead: the mean negative
log-likelihood per completion token over the batch. The log-likelihoods come from a
teacher-forced pass whose only differentiable input is the parameter pytree p: SVF's p (base
weights and SVD factors are frozen arguments) or a LoRA / IA3 / DoRA adapter (`t2jax.adapters`,
applied to the frozen dense kernels, with LoRA / DoRA dropout); the log-softmax is chunked over
the sequence (`t2jax.logprobs`) and the batch is split into microbatches whose gradients a
`lax.scan` accumulates, so a batch of 256 fits in memory. The update (`apply_gradients`) is optax:
global-norm clip 1e-3 then Adam 2e-3 constant (official), or AdamW with cosine decay (paper).

p, the optimizer state and z are replicated over the mesh; the batch rows are split over its data
axes (`t2jax.rl.batch.place_batch`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from t2jax import logprobs as logprobs_lib
from t2jax import model as model_lib
from t2jax.adapters import core as adapters
from t2jax.config import ModelConfig
from t2jax.rl.config import AdapterSection, Method, RLConfig, SVFSection
from t2jax.svf import core as svf_lib
from t2jax.svf import factors as svf_factors

Array = jax.Array
# Trainable parameters: SVF's p {module key: [L, R]} fp32, or a stacked LoRA / IA3 / DoRA adapter.
Params = svf_lib.SVFParams | adapters.ModelAdapters


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PolicyBatch:
    """Teacher-forcing inputs of N rollouts: prompt + completion, left-padded to T positions."""

    tokens: Array  # [N, T] int32
    token_mask: Array  # [N, T] bool: real (non-pad) tokens
    completion_mask: Array  # [N, T] bool: generated tokens whose log-probability is scored
    advantages: Array  # [N] fp32 (0 for padding rows)
    row_mask: Array  # [N] bool: real rows (False for rows padding the batch)
    # The last `scored_tail` positions hold every scored one (completions end every row), so the
    # output projection and log-softmax run on those only; None: on all T (static).
    scored_tail: int | None = dataclasses.field(default=None, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """What the optimizer updates: the step counter, the trainable parameters and the optax
    state."""

    step: Array  # [] int32: updates done
    params: Params
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The settings the gradient computation depends on: its static (compile-time) argument, kept
    apart from `RLConfig` so that runs differing only in lr, seed, batch order, ... share one
    compiled gradient function.

    Attributes:
        objective: "policy_gradient" (REINFORCE: -A_j LL_j per row, over the batch's rows) or
            "next_token" (the mean negative log-likelihood per scored token over the batch, as
            transformers' `loss` with labels -100 off the completion; advantages unused).
        method: the adapter kind trained: "svf" (p maps to z) or "lora" / "ia3" / "dora" (the
            parameters are the adapter itself).
        dropout: LoRA / DoRA dropout rate of the training forward.
        parametrization: how p maps to z (SVF).
        mode: how the teacher-forced pass applies W'(z) ("merged", "factored" or "auto"; SVF).
        kl_coeff: lambda (0 skips the reference forward pass).
        kl_direction: see `t2jax.logprobs.kl_from_log_probs`.
        length_normalize: divide each log-likelihood by its token count.
        logprob_chunk: sequence positions per log-softmax chunk.
        remat: recompute layer activations in the backward pass (`model.forward(remat=...)`).
    """

    objective: Literal["policy_gradient", "next_token"] = "policy_gradient"
    method: Method = "svf"
    dropout: float = 0.0
    parametrization: svf_lib.Parametrization = svf_lib.OFFICIAL_PARAMETRIZATION
    mode: str = "auto"
    kl_coeff: float = 0.0
    kl_direction: str = "ref_policy"
    length_normalize: bool = False
    logprob_chunk: int = 128
    remat: bool = False

    def __post_init__(self):
        if self.objective not in ("policy_gradient", "next_token"):
            raise ValueError(f"unknown objective {self.objective!r}")

    @classmethod
    def from_config(
        cls, adapter: AdapterSection, svf_config: SVFSection, rl: RLConfig
    ) -> LossOptions:
        """The loss options of a run's adapter, SVF and RL sections."""
        return cls(
            objective="next_token" if rl.objective == "ntp" else "policy_gradient",
            method=adapter.method,
            dropout=0.0 if adapter.method == "svf" else adapter.dropout,
            parametrization=svf_config.parametrization,
            mode=svf_config.mode,
            kl_coeff=rl.kl_coeff,
            kl_direction=rl.kl_direction,
            length_normalize=rl.length_normalize,
            logprob_chunk=rl.logprob_chunk,
            remat=rl.remat,
        )


def make_optimizer(rl: RLConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then Adam with a constant learning rate (official code) or AdamW
    with cosine decay over `num_iters` (the paper)."""
    clip = optax.clip_by_global_norm(rl.max_grad_norm)
    if rl.optimizer == "adam":
        return optax.chain(clip, optax.adam(rl.lr, b1=0.9, b2=0.999, eps=1e-8))
    schedule = optax.cosine_decay_schedule(rl.lr, decay_steps=rl.num_iters)
    return optax.chain(clip, optax.adamw(schedule, weight_decay=rl.weight_decay))


def init_state(params: Params, rl: RLConfig) -> TrainState:
    """Step 0 with fresh optimizer state for `params`."""
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=make_optimizer(rl).init(params)
    )


def adaptations(
    params: Params,
    options: LossOptions,
    factors: svf_factors.ModelFactors | None,
    dropout_key: Array | None,
) -> tuple[model_lib.Adaptation, model_lib.Adaptation | None]:
    """(the adaptation the parameters make, the base model's adaptation for the KL or None when
    `kl_coeff` is 0) for the teacher-forced pass."""
    if options.method != "svf":
        adapted = params
        if dropout_key is not None:
            adapted = adapters.with_dropout(params, options.dropout, dropout_key)
        base = adapters.ModelAdapters(adapters.LayerAdapters({}))  # no targets: the dense kernels
        return adapted, base if options.kl_coeff > 0 else None
    z = svf_lib.z_of(params, options.parametrization)
    svf = svf_factors.svf_from_factors(factors, z, options.mode)
    if options.kl_coeff == 0:
        return svf, None
    base_z = {key: jnp.ones(value.shape, jnp.float32) for key, value in z.items()}  # W'(1) = W
    return svf, svf_factors.svf_from_factors(factors, base_z, options.mode)


def microbatch_loss(
    params: Params,
    config: ModelConfig,
    options: LossOptions,
    weights: model_lib.Weights,
    factors: svf_factors.ModelFactors | None,
    batch: PolicyBatch,
    normalizer: Array,
    dropout_key: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """This microbatch's share of the loss: sum over its rows of (-A_j LL_j + lambda KL_j), or
    of (-LL_j + lambda KL_j) for the next-token objective, divided by `normalizer` (the whole
    batch's real rows, or scored tokens for next-token; so shares add up to the batch loss).

    Position t scores token t + 1 when that token is generated (teacher forcing). `dropout_key`
    (a PRNG key) draws the LoRA / DoRA dropout masks; None: no dropout.

    Returns:
        (loss share, sums over the microbatch's real rows: "log_likelihood", "kl", "tokens").
    """
    svf, reference_svf = adaptations(params, options, factors, dropout_key)
    token_log_probs, token_kl = logprobs_lib.teacher_forced_log_probs(
        config,
        weights,
        svf,
        batch.tokens,
        batch.token_mask,
        options.logprob_chunk,
        remat=options.remat,
        reference_svf=reference_svf,
        kl_direction=options.kl_direction,
        scored_tail=batch.scored_tail,
    )  # [N, W] each (W = scored_tail or T): position t scores token t + 1
    scored = jnp.pad(batch.completion_mask[:, 1:], ((0, 0), (0, 1)))  # [N, T]
    scored = scored[:, scored.shape[1] - token_log_probs.shape[1] :]  # [N, W]
    token_counts = jnp.sum(scored, axis=1)  # [N]
    log_likelihood = jnp.sum(jnp.where(scored, token_log_probs, 0.0), axis=1)  # [N]
    row_objective = log_likelihood
    if options.length_normalize:
        row_objective = log_likelihood / jnp.maximum(token_counts, 1)  # [N]
    weight = 1.0 if options.objective == "next_token" else batch.advantages  # [] or [N]
    row_losses = -weight * row_objective  # [N]
    kl = jnp.zeros_like(log_likelihood)  # [N]
    if token_kl is not None:
        kl = jnp.sum(jnp.where(scored, token_kl, 0.0), axis=1)  # [N]
        row_losses = row_losses + options.kl_coeff * kl
    rows = batch.row_mask.astype(jnp.float32)  # [N]
    loss = jnp.sum(row_losses * rows) / normalizer
    sums = {
        "log_likelihood": jnp.sum(log_likelihood * rows),
        "kl": jnp.sum(kl * rows),
        "tokens": jnp.sum(token_counts * rows),
    }
    return loss, sums


def _split_microbatches(batch: PolicyBatch, num_microbatches: int) -> PolicyBatch:
    """[N, ...] -> [M, N / M, ...]. Row j goes to microbatch j % M, so the row axis keeps its
    contiguous data-parallel sharding inside every microbatch."""

    def split(x: Array) -> Array:
        rows = x.shape[0] // num_microbatches
        return jnp.swapaxes(x.reshape(rows, num_microbatches, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


@functools.partial(jax.jit, static_argnames=("config", "options", "num_microbatches"))
def compute_gradients(
    config: ModelConfig,
    options: LossOptions,
    params: Params,
    weights: model_lib.Weights,
    factors: svf_factors.ModelFactors | None,
    batch: PolicyBatch,
    num_microbatches: int = 1,
    dropout_key: Array | None = None,
) -> tuple[Params, dict[str, Array]]:
    """Gradient of the batch loss w.r.t. the trainable parameters, accumulated over microbatches.

    Args:
        config: the model architecture.
        options: the method, parametrization, how W' is applied, KL, length normalization, chunk
            size.
        params: SVF parameters p or a stacked adapter (the only differentiable input).
        weights: frozen decoder weights (SVF targets' dense kernels may be dropped).
        factors: frozen SVD factors of the SVF targets (None for the baselines).
        batch: N rows, N a multiple of `num_microbatches`.
        num_microbatches: sequential microbatches (`lax.scan`) the rows are split into.
        dropout_key: key data of this update's LoRA / DoRA dropout (each microbatch folds in its
            index); None: no dropout.

    Returns:
        (gradients like params, metrics: "loss", "log_likelihood" and "kl" per real row,
        "tokens" scored per real row).
    """
    num_rows = jnp.maximum(jnp.sum(batch.row_mask), 1).astype(jnp.float32)
    normalizer = num_rows
    if options.objective == "next_token":
        scored = batch.completion_mask[:, 1:] & batch.row_mask[:, None]  # [N, T - 1]
        normalizer = jnp.maximum(jnp.sum(scored), 1).astype(jnp.float32)
    gradient_fn = jax.value_and_grad(microbatch_loss, has_aux=True)

    def accumulate(carry, inputs: tuple[Array, PolicyBatch]):
        grads, loss, sums = carry
        index, micro = inputs
        key = None
        if dropout_key is not None:
            key = jax.random.fold_in(jax.random.wrap_key_data(dropout_key), index)
        (micro_loss, micro_sums), micro_grads = gradient_fn(
            params, config, options, weights, factors, micro, normalizer, key
        )
        grads = jax.tree.map(jnp.add, grads, micro_grads)
        sums = jax.tree.map(jnp.add, sums, micro_sums)
        return (grads, loss + micro_loss, sums), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    sums = {name: jnp.zeros((), jnp.float32) for name in ("log_likelihood", "kl", "tokens")}
    carry = (zeros, jnp.zeros((), jnp.float32), sums)
    microbatches = (jnp.arange(num_microbatches), _split_microbatches(batch, num_microbatches))
    (grads, loss, sums), _ = jax.lax.scan(accumulate, carry, microbatches)
    metrics = {"loss": loss, **{name: total / num_rows for name, total in sums.items()}}
    return grads, metrics


@functools.partial(jax.jit, static_argnames=("rl",), donate_argnames=("state",))
def apply_gradients(
    rl: RLConfig, state: TrainState, grads: Params
) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer update. Returns the new state and the pre-clip gradient and update norms."""
    updates, opt_state = make_optimizer(rl).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"grad_norm": optax.tree.norm(grads), "update_norm": optax.tree.norm(updates)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def train_step(
    config: ModelConfig,
    options: LossOptions,
    rl: RLConfig,
    state: TrainState,
    weights: model_lib.Weights,
    factors: svf_factors.ModelFactors | None,
    batch: PolicyBatch,
    num_microbatches: int = 1,
    dropout_key: Array | None = None,
) -> tuple[TrainState, dict[str, Array]]:
    """`compute_gradients` then `apply_gradients` (the loop calls them apart to time them)."""
    grads, metrics = compute_gradients(
        config, options, state.params, weights, factors, batch, num_microbatches, dropout_key
    )
    state, update_metrics = apply_gradients(rl, state, grads)
    return state, {**metrics, **update_metrics}
