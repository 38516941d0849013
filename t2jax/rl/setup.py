"""What a training run loads once: the model (for SVF without the targets' dense kernels, with their
SVD factors cached on disk), the task and its splits, and the RL settings `t2jax.plan` resolves for
the mesh; and what differs between SVF and the baselines (LoRA / IA3 / DoRA): the initial
parameters, the adapter they make, the base model's adapter.
"""

from __future__ import annotations

import dataclasses

import jax

from t2jax import parallel
from t2jax.adapted import AdaptedModel, Choice, adapted_model
from t2jax.adapters import weights as adapter_weights
from t2jax.configuration import ConfigError
from t2jax.evaluation import subsample
from t2jax.loading import load_model_section
from t2jax.padding import chunked_length
from t2jax.plan import rules as plan_rules
from t2jax.rl.config import TaskSection, TrainConfig
from t2jax.rl.loss import Params
from t2jax.svf import core as svf_lib
from t2jax.svf.targets import resolve_targets
from t2jax.tasks import Example, Task, render_prompt
from t2jax.tasks.synthetic import load_task

# Prompt tokens assumed when the RL microbatch is chosen before any rollout (chat-templated
# few-shot-free benchmark prompts are well under this).
PROMPT_LENGTH_ESTIMATE = 512


@dataclasses.dataclass
class Setup:
    """What a run loads once: the adapted model (without the targets' dense kernels), task and
    data."""

    config: TrainConfig
    model: AdaptedModel
    task: Task
    train: list[Example]
    eval_train: list[Example]
    valid: list[Example]
    test: list[Example]
    max_new_tokens: int

    def prompt(self, example: Example) -> str:
        """The rendered prompt of an example."""
        return render_prompt(
            self.task, example, self.model.tokenizer, self.config.task.official_quirks
        )

    @property
    def is_svf(self) -> bool:
        """Whether the run trains SVF (rather than a LoRA / IA3 / DoRA baseline)."""
        return self.config.adapter.method == "svf"

    def initial_params(self) -> Params:
        """SVF's official initialization (spec section 1.2), or a baseline adapter initialized
        as PEFT does (the base model), replicated over the mesh."""
        key = jax.random.key(self.config.rl.seed)
        if self.is_svf:
            factors = self.model.factors
            shapes = {k: (factors.num_layers, rank) for k, rank in factors.ranks().items()}
            params = svf_lib.init_params(
                key, shapes, self.config.svf.parametrization, std=self.config.svf.init_std
            )
        else:
            adapter = self.config.adapter
            params = adapter_weights.init_adapters(
                key,
                self.model.weights,
                adapter.method,
                resolve_targets(adapter.baseline_targets),
                rank=adapter.rank,
                alpha=adapter.alpha,
            )
        return jax.device_put(params, parallel.replicated(self.model.mesh))

    def choice(self, params: Params) -> Choice:
        """The adapter the parameters make, for generation: SVF's z, or the baseline adapter."""
        if self.is_svf:
            return svf_lib.z_of(params, self.config.svf.parametrization)
        return params

    def base_choice(self) -> Choice:
        """The base model's adapter: z = 1 for SVF (its dense kernels are not loaded), else the
        weights as loaded."""
        return self.model.base_z() if self.is_svf else None


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
    """Loads the adapted model (for SVF: its targets' SVD factors, cached on disk) and the task's
    splits.

    Raises:
        ConfigError: an empty split, bad targets, or next-token training on a task without
            reference solutions.
    """
    task, train, eval_train, valid, test = load_splits(config.task)
    if config.rl.objective == "ntp":
        try:
            task.reference_completion(train[0])
        except NotImplementedError as error:
            raise ConfigError(f"rl.objective='ntp': {error}") from None
    svf = config.adapter.method == "svf"
    try:
        targets = resolve_targets(config.svf.targets if svf else config.adapter.baseline_targets)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    loaded = load_model_section(
        config.model, skip=lambda key: svf and key in targets, progress=config.run.progress
    )
    if svf:
        model = adapted_model(
            loaded, targets, cache_root=config.svf.cache_dir, progress=config.run.progress
        )
    else:
        model = AdaptedModel(loaded, factors=None)
    max_new_tokens = config.task.max_new_tokens or task.max_new_tokens
    sequence = chunked_length(PROMPT_LENGTH_ESTIMATE + max_new_tokens, config.rl.logprob_chunk)
    rl = plan_rules.resolve_rl(config.rl, loaded.config, loaded.mesh, sequence, targets)
    config = dataclasses.replace(config, rl=rl)
    return Setup(
        config=config,
        model=model,
        task=task,
        train=train,
        eval_train=eval_train,
        valid=valid,
        test=test,
        max_new_tokens=max_new_tokens,
    )
