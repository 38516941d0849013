"""Typed, frozen configuration of a training run (an SVF expert by REINFORCE, spec section 2, or a
baseline adapter, section 2.5, by either objective); files,
dicts and dotted overrides ("rl.lr=1e-3") are converted by `t2jax.configuration`.

`TrainConfig` nests one section per concern. Defaults are the official recipe (spec section 2.4):
Adam lr 2e-3 constant, global-norm clip 1e-3, 256 prompts per step drawn without replacement with
seed 42, greedy rollouts (one per prompt), rewards +1/-1 with no baseline, no KL, evaluation every
10 steps, 200 steps (`scripts/train_task_expert.sh`). Options beyond the official code are off by
default. Every section validates itself, so a bad config fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from t2jax.config import ModelSection
from t2jax.configuration import check_choices, require
from t2jax.svf.core import OFFICIAL_PARAMETRIZATION, Parametrization

Optimizer = Literal["adam", "adamw_cosine"]
KLDirection = Literal["ref_policy", "policy_ref"]
Advantage = Literal["none", "normalize", "leave_one_out"]
Objective = Literal["rl", "ntp"]
CompletionTokens = Literal["retokenize", "sampled"]
SVFMode = Literal["merged", "factored", "auto"]
Method = Literal["svf", "lora", "ia3", "dora"]
# The targets of each baseline when `adapter.targets` is not set: the paper's LoRA (q_proj, v_proj;
# spec section 2.5) and PEFT's IA3 defaults for Llama / Qwen2.
BASELINE_TARGETS = {
    "lora": "qv",
    "dora": "qv",
    "ia3": "self_attn.k_proj,self_attn.v_proj,mlp.down_proj",
}


@dataclasses.dataclass(frozen=True)
class TaskSection:
    """The task, its splits and the generation budget.

    Attributes:
        name: a `t2jax.tasks` name (gsm8k, arc_easy, ...) or a synthetic task of
            `t2jax.tasks.synthetic`.
        data_dir: benchmark data directory (None: `$T2JAX_DATA`).
        train_split: split the rollouts are drawn from.
        valid_split: split that selects the best expert.
        train_limit: use only the first N training items (None: all).
        eval_train_limit: evaluate on the first N training items (None: all; 0: skip).
        valid_limit: evaluate on the first N validation items (None: all).
        valid_sample: evaluate on a seeded random subset of N validation items instead (seed 0,
            `t2jax.evaluation.subsample`): first-N subsets can be skewed (ARC's first items).
        test_split: an untouched split evaluated for the base model and the best expert after
            training (None: skip).
        test_limit: first N items of the test split (None: all).
        official_quirks: render prompts byte for byte as the official code (`render_prompt`).
        max_new_tokens: generation budget (None: the task's official one).
        rows_per_call: prompts per sampler call during evaluation.
    """

    name: str = "gsm8k"
    data_dir: str | None = None
    train_split: str = "train"
    valid_split: str = "valid"
    train_limit: int | None = None
    eval_train_limit: int | None = None
    valid_limit: int | None = None
    valid_sample: int | None = None
    test_split: str | None = None
    test_limit: int | None = None
    official_quirks: bool = False
    max_new_tokens: int | None = None
    rows_per_call: int = 64

    def __post_init__(self):
        require(bool(self.name), "task.name must name a task")
        for field in ("train_limit", "valid_limit", "valid_sample", "test_limit", "max_new_tokens"):
            value = getattr(self, field)
            require(value is None or value > 0, f"task.{field} must be positive, got {value}")
        require(
            self.eval_train_limit is None or self.eval_train_limit >= 0,
            f"task.eval_train_limit must be >= 0, got {self.eval_train_limit}",
        )
        require(self.rows_per_call > 0, "task.rows_per_call must be positive")
        require(
            self.valid_limit is None or self.valid_sample is None,
            "task.valid_limit and task.valid_sample exclude each other",
        )


@dataclasses.dataclass(frozen=True)
class SVFSection:
    """What is adapted and how (spec sections 1.2-1.4).

    Attributes:
        targets: target set or module keys (`t2jax.svf.targets.resolve_targets`); official "mlp".
        parametrization: z = sigmoid(p) * max_mult (official) or plain z.
        init_std: noise of the initial parameters (official 0.01).
        mode: how the teacher-forced pass applies W'(z): "merged" (compose W' per layer, as the
            official code), "factored" (((x A) * c s z) B, never materializing W') or "auto"
            (default: per matrix, whichever needs fewer flops for the microbatch's tokens,
            `t2jax.svf.core.gradient_pass_mode`; the same gradient). Rollouts always merge.
        cache_dir: where SVD factors are cached (None: the user cache directory).
    """

    targets: str = "mlp"
    parametrization: Parametrization = OFFICIAL_PARAMETRIZATION
    init_std: float = 0.01
    mode: SVFMode = "auto"
    cache_dir: str | None = None

    def __post_init__(self):
        check_choices(self, "svf")
        require(self.init_std >= 0, f"svf.init_std must be >= 0, got {self.init_std}")


@dataclasses.dataclass(frozen=True)
class AdapterSection:
    """What kind of adapter is trained: SVF (the method; its settings are the `svf` section) or
    one of the paper's baselines (spec section 2.5, `t2jax.adapters`).

    Attributes:
        method: "svf", "lora", "ia3" or "dora".
        targets: the baseline's modules (target sets or module keys as for `svf.targets`; None:
            q/v for LoRA and DoRA as in the paper, k/v/down for IA3 as PEFT). SVF uses
            `svf.targets`.
        rank: LoRA / DoRA rank r (paper 16).
        alpha: LoRA / DoRA alpha; the low-rank update is scaled by alpha / r (paper 32).
        dropout: LoRA / DoRA dropout on the low-rank path's input during training (paper 0.05).
    """

    method: Method = "svf"
    targets: str | None = None
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05

    def __post_init__(self):
        check_choices(self, "adapter")
        require(self.rank > 0, f"adapter.rank must be positive, got {self.rank}")
        require(self.alpha > 0, f"adapter.alpha must be positive, got {self.alpha}")
        require(0 <= self.dropout < 1, f"adapter.dropout must be in [0, 1), got {self.dropout}")
        require(
            self.method != "svf" or self.targets is None,
            "adapter.targets is for the baselines; SVF adapts svf.targets",
        )

    @property
    def baseline_targets(self) -> str:
        """The baseline's target spec (its default when `targets` is not set)."""
        return self.targets or BASELINE_TARGETS[self.method]


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """REINFORCE hyper-parameters (spec sections 2.2-2.4). Hashable: it is a static argument of
    the jitted gradient and update functions.

    Attributes:
        objective: "rl" (REINFORCE on the model's own rollouts, the method) or "ntp" (next-token
            prediction on the training split's reference solutions, the paper's baseline of
            spec section 2.5; no rollouts: `tasks.Task.reference_completion`).
        lr: learning rate (official 2e-3).
        max_grad_norm: global-norm gradient clip (official 1e-3).
        optimizer: "adam" (official code: constant lr) or "adamw_cosine" (the paper: AdamW with
            cosine decay over `num_iters`).
        weight_decay: AdamW's decoupled weight decay ("adamw_cosine" only).
        batch_size: prompts per update (official 256; capped at the training-set size).
        microbatch_size: rows per `lax.scan` step of the gradient, rounded up to a multiple of
            the data-parallel size. None: the whole batch at once on CPU; on TPU/GPU the
            largest that fits the chips' memory (`t2jax.plan.rules.default_rl_memory`).
        num_iters: number of updates.
        eval_every: evaluate after update i when i % eval_every == 0 (i from 0; official 10).
        seed: seed of the batch order (`np.random.RandomState(seed).choice` per step, as in the
            official code), the initial parameters and the rollout sampling.
        kl_coeff: lambda of the KL penalty to the base model (official 0).
        kl_direction: "ref_policy" = KL(pi_ref || pi), the official code's; "policy_ref" =
            KL(pi || pi_ref), the paper's. Summed over generated positions and the vocabulary.
        samples_per_prompt: K rollouts per prompt (official 1).
        temperature: rollout temperature (official 0: greedy).
        top_p: rollout nucleus mass.
        advantage: "none" (official: the raw reward), "normalize" (batch mean/std), or
            "leave_one_out" (reward minus the mean of the prompt's other K-1 rollouts).
        length_normalize: divide each sequence's log-likelihood by its token count.
        incorrect_reward: reward of a wrong answer (official -1; the paper's VLM run uses -0.1).
        require_extracted_answer: reward only correct completions in which the scorer found an
            answer (no credit for ARC's fallback guess; see `t2jax.tasks.reward_of`).
        completion_tokens: "retokenize" (official: tokenize prompt + output text and take the ids
            after the prompt's) or "sampled" (the sampler's own ids, cut at the stop string).
        logprob_chunk: sequence positions per chunk of the log-softmax (the [B, T, V] logits
            are never materialized at once).
        remat: recompute each layer's activations in the backward pass (`jax.checkpoint`):
            peak memory of the gradient step drops from all layers' activations to one
            layer's, for about one extra forward pass. None: off on CPU, on on TPU/GPU (where
            the paper's models need it to fit, see `t2jax.plan`).
        rows_per_call: rollouts per sampler call (None: the whole batch).
    """

    objective: Objective = "rl"
    lr: float = 2e-3
    max_grad_norm: float = 1e-3
    optimizer: Optimizer = "adam"
    weight_decay: float = 0.01
    batch_size: int = 256
    microbatch_size: int | None = None
    num_iters: int = 200
    eval_every: int = 10
    seed: int = 42
    kl_coeff: float = 0.0
    kl_direction: KLDirection = "ref_policy"
    samples_per_prompt: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    advantage: Advantage = "none"
    length_normalize: bool = False
    incorrect_reward: float = -1.0
    require_extracted_answer: bool = False
    completion_tokens: CompletionTokens = "retokenize"
    logprob_chunk: int = 128
    remat: bool | None = None
    rows_per_call: int | None = None

    def __post_init__(self):
        require(self.lr > 0, f"rl.lr must be positive, got {self.lr}")
        require(
            self.max_grad_norm > 0, f"rl.max_grad_norm must be positive, got {self.max_grad_norm}"
        )
        check_choices(self, "rl")
        for field in ("batch_size", "num_iters", "eval_every", "samples_per_prompt"):
            require(getattr(self, field) > 0, f"rl.{field} must be positive")
        for field in ("microbatch_size", "rows_per_call"):
            value = getattr(self, field)
            require(value is None or value > 0, f"rl.{field} must be positive, got {value}")
        require(self.logprob_chunk > 0, "rl.logprob_chunk must be positive")
        require(self.kl_coeff >= 0, f"rl.kl_coeff must be >= 0, got {self.kl_coeff}")
        require(self.temperature >= 0, f"rl.temperature must be >= 0, got {self.temperature}")
        require(0 < self.top_p <= 1, f"rl.top_p must be in (0, 1], got {self.top_p}")
        require(
            self.advantage != "leave_one_out" or self.samples_per_prompt > 1,
            "rl.advantage='leave_one_out' needs rl.samples_per_prompt > 1",
        )
        require(
            self.samples_per_prompt == 1 or self.temperature > 0,
            "rl.samples_per_prompt > 1 needs rl.temperature > 0 (greedy rollouts are identical)",
        )


@dataclasses.dataclass(frozen=True)
class RunSection:
    """Where and how a run records itself.

    Attributes:
        workdir: run directory (config, metrics, checkpoints, experts, plots).
        checkpoint_every: save the training state every N updates.
        keep_checkpoints: how many recent checkpoints orbax keeps.
        eval_base: evaluate the base model (z = 1) before training, as step 0 of the curves
            (never a best-expert candidate, as in the official code).
        eval_at_end: also evaluate after the last update when it is not an evaluation step.
        progress: show a progress bar.
        tensorboard: write TensorBoard event files.
    """

    workdir: str = "runs/svf"
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    eval_base: bool = True
    eval_at_end: bool = True
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self):
        require(bool(self.workdir), "run.workdir must be set")
        require(self.checkpoint_every > 0, "run.checkpoint_every must be positive")
        require(self.keep_checkpoints > 0, "run.keep_checkpoints must be positive")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs (SVF by default; `adapter.method` picks a baseline)."""

    model: ModelSection = ModelSection()
    task: TaskSection = TaskSection()
    adapter: AdapterSection = AdapterSection()
    svf: SVFSection = SVFSection()
    rl: RLConfig = RLConfig()
    run: RunSection = RunSection()
