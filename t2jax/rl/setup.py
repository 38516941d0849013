"""What a training run loads once: the model without the targets' dense kernels, their SVD factors
(cached on disk), the task and its splits, and the RL settings `t2jax.plan` resolves for the mesh.
"""

from __future__ import annotations

import dataclasses

import jax

from t2jax import parallel
from t2jax.adapted import AdaptedModel, adapted_model
from t2jax.configuration import ConfigError
from t2jax.evaluation import subsample
from t2jax.loading import load_model_section
from t2jax.padding import chunked_length
from t2jax.plan import rules as plan_rules
from t2jax.rl.config import TaskSection, TrainConfig
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

    def initial_params(self) -> svf_lib.SVFParams:
        """The official initialization (spec section 1.2), replicated over the mesh."""
        factors = self.model.factors
        shapes = {key: (factors.num_layers, rank) for key, rank in factors.ranks().items()}
        params = svf_lib.init_params(
            jax.random.key(self.config.rl.seed),
            shapes,
            self.config.svf.parametrization,
            std=self.config.svf.init_std,
        )
        return jax.device_put(params, parallel.replicated(self.model.mesh))


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
    """Loads the adapted model (SVD factors cached on disk) and the task's splits.

    Raises:
        ConfigError: an empty split.
    """
    task, train, eval_train, valid, test = load_splits(config.task)
    if config.rl.objective == "ntp":
        try:
            task.reference_completion(train[0])
        except NotImplementedError as error:
            raise ConfigError(f"rl.objective='ntp': {error}") from None
    targets = resolve_targets(config.svf.targets)
    loaded = load_model_section(
        config.model, skip=lambda key: key in targets, progress=config.run.progress
    )
    model = adapted_model(
        loaded, targets, cache_root=config.svf.cache_dir, progress=config.run.progress
    )
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
