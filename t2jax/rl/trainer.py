"""SVF expert training with REINFORCE, as the official code does it (spec section 2).

The objective (spec section 2.2) over a batch of B rollouts y_j with rewards r_j:

    L(p) = (1/B) sum_j [ -A_j sum_t log pi_{W'(p)}(y_jt | x_j, y_j<t)  +  lambda KL_j ]

with A_j = r_j (official; optionally normalized or with a leave-one-out baseline) and the KL to the
base model summed over generated positions and the vocabulary, in either direction (spec section
2.3). The log-likelihoods come from a teacher-forced pass whose only differentiable input is the
SVF parameter pytree p (base weights and SVD factors are frozen arguments); the log-softmax is
chunked over the sequence (`t2jax.logprobs`) and the batch is split into microbatches whose
gradients a `lax.scan` accumulates, so a batch of 256 fits in memory.

One training step (`Trainer.run`):
  1. rollout: merge W'(z) into the weights once (`t2jax.svd.merge_into_weights`) and generate one
     greedy completion per prompt (official) with the t2jax sampler;
  2. score: the task's official scorer gives +1 / -1 rewards;
  3. log-prob forward/backward (`compute_gradients`) and update (`apply_gradients`: optax,
     global-norm clip 1e-3 then Adam 2e-3 constant, or AdamW with cosine decay as in the paper);
  4. every `eval_every` updates (after update i with i % eval_every == 0, as in the official code):
     greedy evaluation on the train and valid splits; the expert with the strictly best valid
     accuracy is kept (the base model is never a candidate) and exported as a portable expert
     file (`t2jax.experts`).
Batches are drawn without replacement within a step by `np.random.RandomState(seed).choice`, one
call per step (official). The state is checkpointed with orbax (`t2jax.checkpoint`) so a killed run
resumes where it stopped and ends with the same expert.

Completion tokens. The official code re-tokenizes the prompt string and the prompt + output string
and scores the ids after the prompt's (`completion_tokens="retokenize"`, the default). The
alternative "sampled" scores exactly the ids the sampler produced (cut where the stop string
begins), i.e. the true on-policy sequence. Either way the end-of-sequence token is not scored
(spec section 2.2).

Sharding: the batch is split over the mesh's data axes, weights and factors are FSDP-sharded as
loaded, and p, the optimizer state and z are replicated. Every process runs the same steps; only
process 0 writes metrics, plots and expert files (orbax coordinates checkpoint writes).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import pathlib
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from t2jax import logprobs as logprobs_lib
from t2jax import metrics as metrics_lib
from t2jax import model as model_lib
from t2jax import parallel
from t2jax.config import ConfigError, ModelConfig
from t2jax.evaluation import SAMPLES_FILE, evaluate, read_records, standard_error, subsample
from t2jax.loading import LoadedModel, load_model
from t2jax.padding import chunked_length, left_pad
from t2jax.rl import checkpoint as checkpoint_lib
from t2jax.rl.config import RLConfig, SVFSection, TaskSection, TrainConfig, to_dict
from t2jax.sampler import Generation, Sampler
from t2jax.svf import core as svf_lib
from t2jax.svf import experts as experts_lib
from t2jax.svf import factors as svd
from t2jax.tasks import Example, Score, Task, render_prompt
from t2jax.tasks.synthetic import load_task

Array = jax.Array
logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
RUN_INFO_FILE = "run_info.json"
SUMMARY_FILE = "summary.json"
BEST_EXPERT_FILE = "best_expert.safetensors"
FINAL_EXPERT_FILE = "final_expert.safetensors"
# Rewritten at every checkpoint: usable while a run is going or after it was stopped.
LATEST_EXPERT_FILE = "latest_expert.safetensors"
# Prompt tokens assumed when the RL microbatch is chosen before any rollout (chat-templated
# few-shot-free benchmark prompts are well under this).
PROMPT_LENGTH_ESTIMATE = 512


# ----------------------------------------------------------------------------------------------
# Pytrees.


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PolicyBatch:
    """Teacher-forcing inputs of N rollouts: prompt + completion, left-padded to T positions."""

    tokens: Array  # [N, T] int32
    token_mask: Array  # [N, T] bool: real (non-pad) tokens
    completion_mask: Array  # [N, T] bool: generated tokens whose log-probability is scored
    advantages: Array  # [N] fp32 (0 for padding rows)
    row_mask: Array  # [N] bool: real rows (False for rows padding the batch)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """What the optimizer updates: the step counter, SVF parameters p and the optax state."""

    step: Array  # [] int32: updates done
    params: svf_lib.SVFParams  # module key -> [L, R] fp32
    opt_state: Any


# ----------------------------------------------------------------------------------------------
# Loss, gradients, update (jitted; configs are static, arrays traced).


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The settings the gradient computation depends on: its static (compile-time) argument, kept
    apart from `RLConfig` so that runs differing only in lr, seed, batch order, ... share one
    compiled gradient function.

    Attributes:
        parametrization: how p maps to z.
        mode: how the teacher-forced pass applies W'(z) ("merged" or "factored").
        kl_coeff: lambda (0 skips the reference forward pass).
        kl_direction: see `t2jax.logprobs.kl_from_log_probs`.
        length_normalize: divide each log-likelihood by its token count.
        logprob_chunk: sequence positions per log-softmax chunk.
        remat: recompute layer activations in the backward pass (`model.forward(remat=...)`).
    """

    parametrization: svf_lib.Parametrization = svf_lib.OFFICIAL_PARAMETRIZATION
    mode: str = "merged"
    kl_coeff: float = 0.0
    kl_direction: str = "ref_policy"
    length_normalize: bool = False
    logprob_chunk: int = 128
    remat: bool = False

    @classmethod
    def from_config(cls, svf_config: SVFSection, rl: RLConfig) -> LossOptions:
        """The loss options of a run's SVF and RL sections."""
        return cls(
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


def init_state(params: svf_lib.SVFParams, rl: RLConfig) -> TrainState:
    """Step 0 with fresh optimizer state for `params`."""
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=make_optimizer(rl).init(params)
    )


def _copy(tree: Any) -> Any:
    """A copy of an array pytree (which survives donation of the original)."""
    return jax.tree.map(jnp.copy, tree)


def _uniform_z(factors: svd.ModelFactors) -> svf_lib.ZVectors:
    """z = 1 for every target: W'(1) = W, the base model."""
    ranks = factors.ranks()
    return {key: jnp.ones((factors.num_layers, rank), jnp.float32) for key, rank in ranks.items()}


def _hidden_states(
    config: ModelConfig,
    weights: model_lib.Weights,
    factors: svd.ModelFactors,
    z: svf_lib.ZVectors,
    mode: str,
    batch: PolicyBatch,
    remat: bool = False,
) -> Array:
    """Teacher-forced final hidden states [N, T, D] of the model adapted by z."""
    svf = svd.svf_from_factors(factors, z, mode)
    positions = model_lib.positions_from_mask(batch.token_mask)  # [N, T]
    hidden, _ = model_lib.forward(
        config, weights, batch.tokens, positions, batch.token_mask, svf=svf, remat=remat
    )
    return hidden  # [N, T, D]


def microbatch_loss(
    params: svf_lib.SVFParams,
    config: ModelConfig,
    options: LossOptions,
    weights: model_lib.Weights,
    factors: svd.ModelFactors,
    batch: PolicyBatch,
    num_rows: Array,
) -> tuple[Array, dict[str, Array]]:
    """This microbatch's share of the loss: sum over its rows of (-A_j LL_j + lambda KL_j),
    divided by the number of real rows of the whole batch (so shares add up to the batch loss).

    Position t scores token t + 1 when that token is generated (teacher forcing).

    Returns:
        (loss share, sums over the microbatch's real rows: "log_likelihood", "kl", "tokens").
    """
    z = svf_lib.z_of(params, options.parametrization)
    hidden = _hidden_states(
        config, weights, factors, z, options.mode, batch, options.remat
    )  # [N, T, D]
    reference = None
    if options.kl_coeff > 0:
        base_z = _uniform_z(factors)
        reference = _hidden_states(config, weights, factors, base_z, options.mode, batch)
    targets = jnp.roll(batch.tokens, -1, axis=1)  # [N, T]: position t predicts token t + 1
    scored = jnp.pad(batch.completion_mask[:, 1:], ((0, 0), (0, 1)))  # [N, T]
    token_log_probs, token_kl = logprobs_lib.token_log_probs(
        weights, hidden, targets, options.logprob_chunk, reference, options.kl_direction
    )  # [N, T] each
    token_counts = jnp.sum(scored, axis=1)  # [N]
    log_likelihood = jnp.sum(jnp.where(scored, token_log_probs, 0.0), axis=1)  # [N]
    objective = log_likelihood
    if options.length_normalize:
        objective = log_likelihood / jnp.maximum(token_counts, 1)  # [N]
    row_losses = -batch.advantages * objective  # [N]
    kl = jnp.zeros_like(log_likelihood)  # [N]
    if token_kl is not None:
        kl = jnp.sum(jnp.where(scored, token_kl, 0.0), axis=1)  # [N]
        row_losses = row_losses + options.kl_coeff * kl
    rows = batch.row_mask.astype(jnp.float32)  # [N]
    loss = jnp.sum(row_losses * rows) / num_rows
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
    params: svf_lib.SVFParams,
    weights: model_lib.Weights,
    factors: svd.ModelFactors,
    batch: PolicyBatch,
    num_microbatches: int = 1,
) -> tuple[svf_lib.SVFParams, dict[str, Array]]:
    """Gradient of the batch loss w.r.t. the SVF parameters, accumulated over microbatches.

    Args:
        config: the model architecture.
        options: parametrization, how W' is applied, KL, length normalization, chunk size.
        params: SVF parameters p (the only differentiable input).
        weights: frozen decoder weights (the targets' dense kernels may be dropped).
        factors: frozen SVD factors of the targets.
        batch: N rows, N a multiple of `num_microbatches`.
        num_microbatches: sequential microbatches (`lax.scan`) the rows are split into.

    Returns:
        (gradients like params, metrics: "loss", "log_likelihood" and "kl" per real row,
        "tokens" scored per real row).
    """
    num_rows = jnp.maximum(jnp.sum(batch.row_mask), 1).astype(jnp.float32)
    gradient_fn = jax.value_and_grad(microbatch_loss, has_aux=True)

    def accumulate(carry, micro: PolicyBatch):
        grads, loss, sums = carry
        (micro_loss, micro_sums), micro_grads = gradient_fn(
            params, config, options, weights, factors, micro, num_rows
        )
        grads = jax.tree.map(jnp.add, grads, micro_grads)
        sums = jax.tree.map(jnp.add, sums, micro_sums)
        return (grads, loss + micro_loss, sums), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    sums = {name: jnp.zeros((), jnp.float32) for name in ("log_likelihood", "kl", "tokens")}
    carry = (zeros, jnp.zeros((), jnp.float32), sums)
    (grads, loss, sums), _ = jax.lax.scan(
        accumulate, carry, _split_microbatches(batch, num_microbatches)
    )
    metrics = {"loss": loss, **{name: total / num_rows for name, total in sums.items()}}
    return grads, metrics


@functools.partial(jax.jit, static_argnames=("rl",), donate_argnames=("state",))
def apply_gradients(
    rl: RLConfig, state: TrainState, grads: svf_lib.SVFParams
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
    factors: svd.ModelFactors,
    batch: PolicyBatch,
    num_microbatches: int = 1,
) -> tuple[TrainState, dict[str, Array]]:
    """`compute_gradients` then `apply_gradients` (the loop calls them apart to time them)."""
    grads, metrics = compute_gradients(
        config, options, state.params, weights, factors, batch, num_microbatches
    )
    state, update_metrics = apply_gradients(rl, state, grads)
    return state, {**metrics, **update_metrics}


# ----------------------------------------------------------------------------------------------
# Host side: batch order, advantages, completion tokens, batch assembly.


def batch_schedule(num_examples: int, batch_size: int, num_iters: int, seed: int) -> np.ndarray:
    """[num_iters, batch] example indices: per step `RandomState(seed).choice(n, b, replace=False)`
    from one generator, as the official code draws its batches (the batch is capped at n)."""
    rng = np.random.RandomState(seed)
    size = min(batch_size, num_examples)
    rows = [rng.choice(num_examples, size, replace=False) for _ in range(num_iters)]
    return np.stack(rows).astype(np.int32)


def compute_advantages(rewards: np.ndarray, group_size: int, kind: str) -> np.ndarray:
    """Per-rollout advantages from rewards [N] (N = prompts * group_size, grouped by prompt).

    Args:
        rewards: [N] rewards, the K rollouts of a prompt adjacent.
        group_size: K rollouts per prompt.
        kind: "none" (the reward itself, official), "normalize" ((r - mean) / std over the
            batch), or "leave_one_out" (r minus the mean reward of the prompt's other rollouts).
    """
    rewards = np.asarray(rewards, np.float32)
    if kind == "none":
        return rewards
    if kind == "normalize":
        return (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    if kind == "leave_one_out":
        groups = rewards.reshape(-1, group_size)  # [prompts, K]
        others = (groups.sum(axis=1, keepdims=True) - groups) / (group_size - 1)  # [prompts, K]
        return (groups - others).reshape(-1)
    raise ConfigError(f"unknown advantage {kind!r}")


def sequence_tokens(
    tokenizer: Any,
    prompt: str,
    completion: str,
    sampled_ids: Sequence[int],
    mode: str,
) -> tuple[list[int], int]:
    """Token ids of prompt + completion for the teacher-forced pass, and the prompt's length.

    Args:
        tokenizer: the model's tokenizer.
        prompt: the rendered prompt (special tokens included as text).
        completion: the generated text, cut before any stop string, without end tokens.
        sampled_ids: the ids the sampler generated (without the end id; may run past a stop
            string, since stop strings are checked between decode chunks).
        mode: "retokenize" (official: tokenize prompt and prompt + completion; the ids after
            the prompt's are the completion) or "sampled" (prompt ids + the sampled ids, cut to
            the longest prefix whose text is a prefix of the completion).
    """
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    if mode == "retokenize":
        return tokenizer.encode(prompt + completion, add_special_tokens=False), len(prompt_ids)
    ids = list(sampled_ids)
    while ids and not completion.startswith(tokenizer.decode(ids, skip_special_tokens=True)):
        ids.pop()
    return prompt_ids + ids, len(prompt_ids)


def assemble_batch(
    sequences: Sequence[tuple[list[int], int]],
    advantages: np.ndarray,
    *,
    chunk: int,
    rows: int,
) -> PolicyBatch:
    """Left-pads (ids, prompt length) pairs into a host `PolicyBatch` of `rows` rows (extra rows
    are padding with zero advantage)."""
    length = chunked_length(max(len(ids) for ids, _ in sequences), chunk)
    tokens, token_mask = left_pad([ids for ids, _ in sequences], length, rows)  # [rows, T] each
    completion_mask = np.zeros((rows, length), bool)
    for row, (ids, prompt_length) in enumerate(sequences):
        completion_mask[row, length - len(ids) + prompt_length :] = True
    padded_advantages = np.zeros(rows, np.float32)
    padded_advantages[: len(sequences)] = advantages
    row_mask = np.arange(rows) < len(sequences)
    return PolicyBatch(tokens, token_mask, completion_mask, padded_advantages, row_mask)


def microbatch_layout(
    rows: int, microbatch_size: int | None, data_parallel: int
) -> tuple[int, int]:
    """(padded row count, number of microbatches): microbatches are a multiple of the
    data-parallel size, and the rows a multiple of the microbatch size."""
    size = rows if microbatch_size is None else min(microbatch_size, rows)
    size = math.ceil(size / data_parallel) * data_parallel
    count = math.ceil(rows / size)
    return count * size, count


def place_batch(batch: PolicyBatch, mesh: jax.sharding.Mesh) -> PolicyBatch:
    """Puts a host batch on the mesh, rows split over the data axes. Every process holds the same
    global batch, so each takes its own shards (works on one host and many)."""
    sharding = parallel.batch_sharding(mesh)

    def put(x: np.ndarray) -> Array:
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, batch)


# ----------------------------------------------------------------------------------------------
# Run setup, rollouts and evaluation.


@dataclasses.dataclass
class Setup:
    """What a run loads once: the model (without the targets' dense kernels), SVD factors, task
    and data."""

    config: TrainConfig
    loaded: LoadedModel
    factors: svd.ModelFactors
    task: Task
    train: list[Example]
    eval_train: list[Example]
    valid: list[Example]
    test: list[Example]
    max_new_tokens: int

    def prompt(self, example: Example) -> str:
        """The rendered prompt of an example."""
        return render_prompt(
            self.task, example, self.loaded.tokenizer, self.config.task.official_quirks
        )

    def sampler(self, z: svf_lib.ZVectors):
        """A sampler over the weights with W'(z) merged in."""
        merged = svd.merge_into_weights(self.loaded.weights, self.factors, z)
        return Sampler.for_model(self.loaded, merged)

    def initial_params(self) -> svf_lib.SVFParams:
        """The official initialization (spec section 1.2), replicated over the mesh."""
        shapes = {
            key: (self.factors.num_layers, rank) for key, rank in self.factors.ranks().items()
        }
        params = svf_lib.init_params(
            jax.random.key(self.config.rl.seed),
            shapes,
            self.config.svf.parametrization,
            std=self.config.svf.init_std,
        )
        return jax.device_put(params, parallel.replicated(self.loaded.mesh))


def load_splits(
    task_config: TaskSection,
) -> tuple[Task, list[Example], list[Example], list[Example], list[Example]]:
    """(task, train, eval_train, valid, test) items as `task_config` selects them.

    Raises:
        ConfigError: an empty train or valid split.
    """
    task = load_task(task_config.name)
    train = task.load(task_config.train_split, task_config.data_dir)[: task_config.train_limit]
    valid = task.load(task_config.valid_split, task_config.data_dir)[: task_config.valid_limit]
    if task_config.valid_sample is not None:
        valid = subsample(valid, task_config.valid_sample)
    eval_train = train[: task_config.eval_train_limit]
    test = []
    if task_config.test_split is not None:
        test = task.load(task_config.test_split, task_config.data_dir)[: task_config.test_limit]
    if not train or not valid:
        raise ConfigError(f"task {task.name}: the train and valid splits must not be empty")
    return task, list(train), list(eval_train), list(valid), list(test)


def load_setup(config: TrainConfig) -> Setup:
    """Loads the model, its SVD factors (cached on disk) and the task's splits.

    Raises:
        ConfigError: an empty split.
    """
    task, train, eval_train, valid, test = load_splits(config.task)
    targets = svd.resolve_targets(config.svf.targets)
    dtype = None if config.model.dtype is None else jnp.dtype(config.model.dtype)
    loaded = load_model(
        config.model.name,
        dtype=dtype,
        stacked=config.model.stacked,
        mesh_config=config.model.mesh,
        skip=lambda key: key in targets,
        progress=config.run.progress,
    )
    factors = svd.checkpoint_factors(
        loaded.checkpoint,
        targets,
        cache_root=config.svf.cache_dir,
        stacked=model_lib.is_stacked(loaded.weights.layers),
        dtype=loaded.weights.embed.dtype,
        mesh=loaded.mesh,
        progress=config.run.progress,
    )
    from t2jax.plan import search as plan  # plan compiles this module's gradient step

    max_new_tokens = config.task.max_new_tokens or task.max_new_tokens
    sequence = chunked_length(PROMPT_LENGTH_ESTIMATE + max_new_tokens, config.rl.logprob_chunk)
    rl = plan.resolve_rl(config.rl, loaded.config, loaded.mesh, sequence, targets)
    config = dataclasses.replace(config, rl=rl)
    return Setup(
        config=config,
        loaded=loaded,
        factors=factors,
        task=task,
        train=train,
        eval_train=eval_train,
        valid=valid,
        test=test,
        max_new_tokens=max_new_tokens,
    )


@dataclasses.dataclass
class Rollouts:
    """Completions of one training batch (the K rollouts of an example adjacent) and scores."""

    examples: list[Example]
    prompts: list[str]
    generation: Generation
    rewards: np.ndarray | None = None  # [N]
    correct: np.ndarray | None = None  # [N] bool: the official scorer's verdict
    answered: np.ndarray | None = None  # [N] bool: the scorer extracted an answer


def generate_rollouts(
    setup: Setup, z: svf_lib.ZVectors, examples: Sequence[Example], seed: int
) -> Rollouts:
    """Generates `samples_per_prompt` completions per example with W'(z) merged into the weights
    (greedy by default, as in the official code)."""
    rl = setup.config.rl
    repeated = [example for example in examples for _ in range(rl.samples_per_prompt)]
    prompts = [setup.prompt(example) for example in repeated]
    sampler = setup.sampler(z)
    chunk = rl.rollout_batch_size or len(prompts)
    parts = [
        sampler.generate(
            prompts[start : start + chunk],
            max_new_tokens=setup.max_new_tokens,
            temperature=rl.temperature,
            top_p=rl.top_p,
            stop_strings=setup.task.stop_strings,
            seed=seed + start,
        )
        for start in range(0, len(prompts), chunk)
    ]
    generation = Generation(
        texts=[text for part in parts for text in part.texts],
        token_ids=[ids for part in parts for ids in part.token_ids],
        finish_reasons=[reason for part in parts for reason in part.finish_reasons],
    )
    return Rollouts(repeated, prompts, generation)


def rewards_of(
    scores: Sequence[Score], incorrect_reward: float, require_extracted_answer: bool
) -> np.ndarray:
    """Rewards [N]: +1 for a correct completion, `incorrect_reward` (official -1) otherwise.

    With `require_extracted_answer`, a completion the scorer found no answer in earns no credit
    even when its fallback counts it correct (ARC scores an answerless completion by a fixed
    "random guess", A for four options, which RL otherwise learns to exploit by answering
    nothing).
    """
    rewarded = [
        score.correct and (score.extracted is not None or not require_extracted_answer)
        for score in scores
    ]
    return np.where(rewarded, 1.0, incorrect_reward).astype(np.float32)


def score_rollouts(setup: Setup, rollouts: Rollouts) -> Rollouts:
    """Scores completions with the task's official scorer and turns the scores into rewards."""
    rl = setup.config.rl
    scores = setup.task.score_batch(rollouts.examples, rollouts.generation.texts)
    return dataclasses.replace(
        rollouts,
        rewards=rewards_of(scores, rl.incorrect_reward, rl.require_extracted_answer),
        correct=np.asarray([score.correct for score in scores], bool),
        answered=np.asarray([score.extracted is not None for score in scores], bool),
    )


def policy_batch(setup: Setup, rollouts: Rollouts) -> tuple[PolicyBatch, int]:
    """The placed teacher-forcing batch of a step's rollouts and its number of microbatches."""
    rl = setup.config.rl
    tokenizer = setup.loaded.tokenizer
    sequences = [
        sequence_tokens(tokenizer, prompt, text, ids, rl.completion_tokens)
        for prompt, text, ids in zip(
            rollouts.prompts,
            rollouts.generation.texts,
            rollouts.generation.token_ids,
            strict=True,
        )
    ]
    advantages = compute_advantages(rollouts.rewards, rl.samples_per_prompt, rl.advantage)
    data_parallel = parallel.data_parallel_size(setup.loaded.mesh)
    rows, num_microbatches = microbatch_layout(len(sequences), rl.microbatch_size, data_parallel)
    batch = assemble_batch(sequences, advantages, chunk=rl.logprob_chunk, rows=rows)
    return place_batch(batch, setup.loaded.mesh), num_microbatches


def evaluate_split(
    setup: Setup,
    z: svf_lib.ZVectors,
    split: str,
    examples: Sequence[Example],
    out_dir: pathlib.Path,
) -> dict[str, float]:
    """Greedy accuracy of W'(z) on examples, with per-sample records in `out_dir` (main process;
    the others write to a temporary directory). Returns accuracy, reward, standard error, n."""
    sampler = setup.sampler(z)

    def generate(prompts: list[str]) -> list[str]:
        return sampler.generate(
            prompts, max_new_tokens=setup.max_new_tokens, stop_strings=setup.task.stop_strings
        ).texts

    with tempfile.TemporaryDirectory() as scratch:
        summary = evaluate(
            setup.task,
            examples,
            generate,
            out_dir if parallel.is_main_process() else scratch,
            setup.config.task.eval_batch_size,
            prompt_fn=setup.prompt,
            config={"split": split},
            show_progress=False,
        )
    accuracy = summary["accuracy"]
    incorrect = setup.config.rl.incorrect_reward
    return {
        f"eval/{split}/accuracy": accuracy,
        f"eval/{split}/reward": accuracy + (1.0 - accuracy) * incorrect,
        f"eval/{split}/standard_error": standard_error(summary["correct"], summary["n"]),
        f"eval/{split}/n": summary["n"],
    }


# ----------------------------------------------------------------------------------------------
# The training loop.


@dataclasses.dataclass
class Best:
    """The best-valid expert so far (the official code starts from accuracy 0: the base model is
    never a candidate, and only a strictly better accuracy replaces the best)."""

    accuracy: float = 0.0
    step: int | None = None


class Trainer:
    """Runs (or resumes) one training run in `config.run.workdir`.

    Files written by the main process: config.json (resolved config), run_info.json (git
    revision, JAX version, devices), metrics.jsonl, tensorboard/, eval/step_N/SPLIT/ (per-sample
    records), checkpoints/ (orbax), best_expert.safetensors, latest_expert.safetensors (the
    params of the newest checkpoint, written just before it), final_expert.safetensors,
    learning_curve.png and summary.json (written last: the run is finished).
    """

    def __init__(self, setup: Setup):
        self.setup = setup
        self.config = setup.config
        self.workdir = pathlib.Path(self.config.run.workdir)
        self.is_main = parallel.is_main_process()
        self.mesh = setup.loaded.mesh
        if self.is_main:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._write_config()
        self.checkpoints = checkpoint_lib.TrainCheckpoints(
            self.workdir / "checkpoints", keep=self.config.run.keep_checkpoints
        )

    def _write_config(self) -> None:
        """Writes config.json, or checks that a resumed run has the same config."""
        resolved = to_dict(self.config)
        path = self.workdir / CONFIG_FILE
        if path.exists():
            previous = json.loads(path.read_text())
            for section in ("model", "task", "svf", "rl"):
                if _without_locations(previous.get(section)) != _without_locations(
                    resolved[section]
                ):
                    raise ConfigError(
                        f"{self.workdir} holds a run with a different {section} config; resume it "
                        f"with the same config or use another run.workdir"
                    )
        metrics_lib.write_json(path, resolved)
        metrics_lib.write_json(self.workdir / RUN_INFO_FILE, metrics_lib.run_info(self.mesh))

    def _fresh(self) -> dict[str, Any]:
        """The checkpointed pytree of a new run."""
        rl = self.config.rl
        params = self.setup.initial_params()
        schedule = batch_schedule(len(self.setup.train), rl.batch_size, rl.num_iters, rl.seed)
        tree = {
            "state": init_state(params, rl),
            "best_params": _copy(params),  # the state's params are donated to each update
            "rng": jax.random.key_data(jax.random.key(rl.seed)),
            "schedule": schedule,
        }
        return jax.device_put(tree, parallel.replicated(self.mesh))  # restored onto these too

    def run(self) -> dict[str, Any]:
        """Trains to `num_iters` updates (resuming from the latest checkpoint), then exports the
        experts, plots the learning curve and writes the summary. Returns the summary."""
        tree, meta, start = self._fresh(), {"best_accuracy": 0.0, "best_step": None}, 0
        latest = self.checkpoints.latest_step()
        if latest is not None:
            tree, meta = self.checkpoints.restore(latest, tree)
            start = latest
            logger.info("resuming %s from step %d", self.workdir, start)
        best = Best(meta["best_accuracy"], meta["best_step"])
        elapsed = meta.get("elapsed_s", 0.0)
        recorder = metrics_lib.MetricsLogger(
            self.workdir,
            enabled=self.is_main,
            tensorboard=self.config.run.tensorboard,
            resume_step=start if latest is not None else None,
        )
        try:
            if start == 0 and latest is None and self.config.run.eval_base:
                base = self._evaluate(_uniform_z(self.setup.factors), 0)
                recorder.write(0, base)
            tree, best, elapsed = self._loop(tree, best, start, elapsed, recorder)
        finally:
            recorder.close()
        summary = self._finish(tree, best, elapsed)
        self.checkpoints.close()
        return summary

    def _loop(self, tree, best: Best, start: int, elapsed: float, recorder):
        rl = self.config.rl
        bar = tqdm.tqdm(
            total=rl.num_iters,
            initial=start,
            desc=f"svf {self.setup.task.name}",
            disable=not (self.config.run.progress and self.is_main),
        )
        for index in range(start, rl.num_iters):
            began = time.perf_counter()
            tree, record = self._step(tree, index)
            step = index + 1
            if index % rl.eval_every == 0 or (self.config.run.eval_at_end and step == rl.num_iters):
                z = svf_lib.z_of(tree["state"].params, self.config.svf.parametrization)
                evaluation = self._evaluate(z, step)
                record.update(evaluation)
                accuracy = evaluation["eval/valid/accuracy"]
                if accuracy > best.accuracy:
                    best = Best(accuracy, step)
                    tree["best_params"] = _copy(tree["state"].params)
                    self._export(tree["best_params"], BEST_EXPERT_FILE)
            elapsed += time.perf_counter() - began
            record.update({"best/valid_accuracy": best.accuracy, "best/step": best.step or 0})
            recorder.write(step, record)
            if step % self.config.run.checkpoint_every == 0 or step == rl.num_iters:
                meta = {
                    "best_accuracy": best.accuracy,
                    "best_step": best.step,
                    "elapsed_s": elapsed,
                }
                self._export(tree["state"].params, LATEST_EXPERT_FILE)
                self.checkpoints.save(step, tree, meta)
            bar.update(1)
            bar.set_postfix(
                reward=f"{record['rollout/reward']:.3f}",
                acc=f"{record['rollout/accuracy']:.3f}",
                best=f"{best.accuracy:.3f}",
            )
        bar.close()
        return tree, best, elapsed

    def _step(self, tree: dict[str, Any], index: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """One update: rollout -> score -> log-prob forward/backward -> optimizer update."""
        setup, config = self.setup, self.config
        timer = metrics_lib.StepTimer()
        state = tree["state"]
        examples = [setup.train[i] for i in parallel.host_array(tree["schedule"][index])]
        key = jax.random.fold_in(jax.random.wrap_key_data(tree["rng"]), index)
        seed = int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))
        with timer.phase("rollout"):
            z = svf_lib.z_of(state.params, config.svf.parametrization)
            rollouts = generate_rollouts(setup, z, examples, seed)
        with timer.phase("score"):
            rollouts = score_rollouts(setup, rollouts)
        with timer.phase("logprob_fwd_bwd"):
            batch, num_microbatches = policy_batch(setup, rollouts)
            grads, loss_metrics = compute_gradients(
                setup.loaded.config,
                LossOptions.from_config(config.svf, config.rl),
                state.params,
                setup.loaded.weights,
                setup.factors,
                batch,
                num_microbatches,
            )
            jax.block_until_ready(grads)
        with timer.phase("update"):
            state, update_metrics = apply_gradients(config.rl, state, grads)
            jax.block_until_ready(state)
        tree = {**tree, "state": state}
        lengths = np.asarray(rollouts.generation.lengths)
        reasons = rollouts.generation.finish_reasons
        record = {
            "rollout/reward": float(rollouts.rewards.mean()),
            "rollout/accuracy": float(rollouts.correct.mean()),
            "rollout/answered": float(rollouts.answered.mean()),
            "rollout/completion_tokens": float(lengths.mean()),
            "rollout/truncated": reasons.count("length") / len(reasons),
            **{f"loss/{k}": float(v) for k, v in loss_metrics.items()},
            **{f"optim/{k}": float(v) for k, v in update_metrics.items()},
            **timer.metrics(),
        }
        return tree, record

    def _evaluate(self, z: svf_lib.ZVectors, step: int) -> dict[str, float]:
        """Greedy evaluation of W'(z) on the train (unless eval_train_limit is 0) and valid
        examples; per-sample records go to eval/step_N/{train,valid}."""
        began = time.perf_counter()
        out = self.workdir / "eval" / f"step_{step:06d}"
        record = {}
        if self.setup.eval_train:
            record.update(
                evaluate_split(self.setup, z, "train", self.setup.eval_train, out / "train")
            )
        record.update(evaluate_split(self.setup, z, "valid", self.setup.valid, out / "valid"))
        record["time/eval"] = time.perf_counter() - began
        return record

    def _export(self, params: svf_lib.SVFParams, filename: str) -> None:
        """Writes params as a portable expert file (main process; atomic replace)."""
        if not self.is_main:
            return
        expert = experts_lib.expert_from_params(
            jax.tree.map(parallel.host_array, params),
            self.config.svf.parametrization,
            fingerprint=self.setup.factors.fingerprint,
        )
        temporary = self.workdir / f".{filename}"
        experts_lib.save_expert(expert, temporary)
        temporary.replace(self.workdir / filename)

    def _finish(self, tree: dict[str, Any], best: Best, elapsed: float) -> dict[str, Any]:
        """Exports the final expert, evaluates base and best on the test split (if any), plots
        the learning curve and writes summary.json."""
        params = tree["state"].params
        self._export(params, FINAL_EXPERT_FILE)
        chosen = tree["best_params"] if best.step is not None else params
        summary = {
            "status": "finished",
            "task": self.setup.task.name,
            "model": self.config.model.name,
            "steps": int(tree["state"].step),
            "best_step": best.step,
            "best_valid_accuracy": best.accuracy if best.step is not None else None,
            "best_expert": str(self.workdir / BEST_EXPERT_FILE) if best.step is not None else None,
            "final_expert": str(self.workdir / FINAL_EXPERT_FILE),
            "train_seconds": elapsed,
        }
        eval_dir = self.workdir / "eval"
        if self.config.run.eval_base and best.step is not None:
            summary["valid_vs_base"] = paired_comparison(
                eval_dir / "step_000000" / "valid", eval_dir / f"step_{best.step:06d}" / "valid"
            )
        if self.setup.test:
            z_best = svf_lib.z_of(chosen, self.config.svf.parametrization)
            for name, z in (("base", _uniform_z(self.setup.factors)), ("best", z_best)):
                summary[f"test_{name}"] = evaluate_split(
                    self.setup, z, "test", self.setup.test, eval_dir / f"test_{name}"
                )
            summary["test_vs_base"] = paired_comparison(
                eval_dir / "test_base", eval_dir / "test_best"
            )
        if self.is_main:
            records = metrics_lib.read_metrics(self.workdir / metrics_lib.METRICS_FILE)
            metrics_lib.plot_learning_curve(
                records,
                self.workdir / metrics_lib.CURVE_FILE,
                best_step=best.step,
                title=f"SVF {self.setup.task.name} / {self.config.model.name}",
            )
            metrics_lib.write_json(self.workdir / SUMMARY_FILE, summary)
        return summary


def _without_locations(section: dict[str, Any] | None) -> dict[str, Any] | None:
    """A config section without the fields that only say where files are and how devices are
    used (a run may resume on another machine with its data and SVD cache elsewhere, and
    another mesh)."""
    if section is None:
        return None
    return {
        key: value for key, value in section.items() if key not in ("data_dir", "cache_dir", "mesh")
    }


def paired_comparison(base_dir: pathlib.Path, other_dir: pathlib.Path) -> dict[str, float] | None:
    """Accuracy difference (other - base) on the items both evaluations share, with the standard
    error of the paired per-item difference, and both accuracies counting only completions with an
    extracted answer (no fallback guesses); None when the records are missing (other
    processes)."""
    base = read_records(base_dir / SAMPLES_FILE)
    other = read_records(other_dir / SAMPLES_FILE)
    shared = sorted(set(base) & set(other))
    if not shared:
        return None
    differences = np.asarray(
        [float(other[i]["correct"]) - float(base[i]["correct"]) for i in shared]
    )

    def answered_accuracy(records):
        return float(
            np.mean([records[i]["correct"] and records[i]["extracted"] is not None for i in shared])
        )

    return {
        "n": len(shared),
        "base_accuracy": float(np.mean([base[i]["correct"] for i in shared])),
        "accuracy": float(np.mean([other[i]["correct"] for i in shared])),
        "base_answered_accuracy": answered_accuracy(base),
        "answered_accuracy": answered_accuracy(other),
        "difference": float(differences.mean()),
        "difference_standard_error": float(differences.std(ddof=1) / math.sqrt(len(shared)))
        if len(shared) > 1
        else 0.0,
    }


def train(config: TrainConfig) -> dict[str, Any]:
    """Loads everything and runs (or resumes, or just re-finishes) a training run.

    Returns:
        The run summary (also written to `run.workdir/summary.json`).
    """
    return Trainer(load_setup(config)).run()
