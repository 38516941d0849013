"""Settings of self-adaptation, with the official defaults: the few-shot search (`FewShotConfig`),
the options of a two-pass run (`AdaptOptions`) and a whole configured run (`AdaptConfig`: model,
experts, requests, options; what `t2jax adapt` and adaptation sweeps run, converted by
`t2jax.configuration` like the training config), plus the command-line form of the few-shot
settings (shared by `t2jax adapt` and the experiments)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Literal

from t2jax import configuration
from t2jax.config import ModelSection
from t2jax.configuration import check_choices, require
from t2jax.svf.experts import MixSpace
from t2jax.tasks import OFFICIAL_STOP_STRINGS, Task
from t2jax.tasks.cls import DispatchMethod

AlphaShape = Literal["per_matrix", "global"]
Strategy = Literal["prompt", "cls", "fewshot"]
DEFAULT_MAX_NEW_TOKENS = 512  # pass-2 budget of free prompts (no task to take it from)


class AdaptError(ValueError):
    """Strategies, experts, settings or data that do not fit together."""


@dataclasses.dataclass(frozen=True)
class FewShotConfig:
    """Settings of the few-shot search (official defaults, spec 4.4).

    Attributes:
        shots: examples of the task the search scores candidates on.
        generations: CEM generations (`scripts/eval_few_shot.sh`: 50).
        population_size: candidates per generation.
        elite_ratio: fraction of candidates kept as elites.
        std_init: initial std of every coefficient.
        alpha_shape: "per_matrix" ([K, #matrices], the official `per_layer=true`) or "global" [K].
        mix_space: mix z ("z", the paper) or raw pre-sigmoid p ("p", the official code).
        normalize: divide alpha by its sum over experts (official scripts: no).
        tie_break: break accuracy ties by the mean log-likelihood of the correct answers.
        seed: PRNG seed of the search.
        split_seed: seed of the shots / reported items split (None: the task's official seed).
        rows_per_call: rows per sampler call when scoring a generation (None: all P x N at once).
        per_candidate: score each candidate in its own merged sampler call instead (see
            `few_shot.score_population`; faster on CPUs from about 3 shots).
        logprob_rows_per_call: rows per teacher-forced pass of the tie-break.
    """

    shots: int = 10
    generations: int = 50
    population_size: int = 32
    elite_ratio: float = 0.2
    std_init: float = 0.5
    alpha_shape: AlphaShape = "per_matrix"
    mix_space: MixSpace = "z"
    normalize: bool = False
    tie_break: bool = True
    seed: int = 0
    split_seed: int | None = None
    rows_per_call: int | None = None
    per_candidate: bool = False
    logprob_rows_per_call: int = 16

    def __post_init__(self):
        check_choices(self, "few_shot")
        require(
            self.shots >= 1 and self.generations >= 1 and self.population_size >= 1,
            "few-shot search needs at least one shot, generation and candidate",
        )
        require(0 < self.elite_ratio <= 1, f"few_shot.elite_ratio={self.elite_ratio} not in (0, 1]")


@dataclasses.dataclass(frozen=True)
class AdaptOptions:
    """Settings of a two-pass run.

    Attributes:
        max_new_tokens: pass-2 generation budget (None: the task's official one; 512 for free
            prompts).
        stop_strings: pass-2 stop strings (None: the task's; the official ones for free prompts).
        rows_per_call: rows per sampler call in pass 2 (None: the whole batch in one call).
        classify_max_new_tokens: pass-1 budget of the dispatch strategies.
        dispatch: how pass 1 reads the category: "generate" (official: generate and parse the
            first `\\boxed{}`), "likelihood" (the most likely of the four answers) or
            "calibrated" (that likelihood less its value after content-free questions).
        official_other: "other" runs with the last-loaded expert (the official bug).
        official_quirks: render the classification prompt with the official Llama-3 template.
        few_shot: settings of strategy "fewshot".
    """

    max_new_tokens: int | None = None
    stop_strings: tuple[str, ...] | None = None
    rows_per_call: int | None = None
    classify_max_new_tokens: int = 512
    dispatch: DispatchMethod = "generate"
    official_other: bool = False
    official_quirks: bool = False
    few_shot: FewShotConfig = FewShotConfig()

    def __post_init__(self):
        check_choices(self, "options")
        for name in ("max_new_tokens", "rows_per_call", "classify_max_new_tokens"):
            value = getattr(self, name)
            require(value is None or value > 0, f"options.{name} must be positive, got {value}")

    def for_task(self, task: Task | None) -> AdaptOptions:
        """These options with the generation budget and stop strings filled in from `task` (the
        defaults for free prompts without one)."""
        max_new_tokens = self.max_new_tokens or (
            task.max_new_tokens if task is not None else DEFAULT_MAX_NEW_TOKENS
        )
        stop_strings = self.stop_strings
        if stop_strings is None:
            stop_strings = tuple(task.stop_strings) if task is not None else OFFICIAL_STOP_STRINGS
        return dataclasses.replace(self, max_new_tokens=max_new_tokens, stop_strings=stop_strings)


@dataclasses.dataclass(frozen=True)
class RequestsSection:
    """What a run answers: a task's items, free prompts, or both (few-shot then adapts on the
    task's shots and answers the prompts).

    Attributes:
        task: a `t2jax.tasks` name (None: prompts only).
        split: the task's split.
        limit: answer the first N items left after the few-shot shots (None: all).
        data_dir: benchmark data (None: `$T2JAX_DATA`).
        prompts: free requests, rendered with the model's chat template.
    """

    task: str | None = None
    split: str = "test"
    limit: int | None = None
    data_dir: str | None = None
    prompts: tuple[str, ...] = ()

    def __post_init__(self):
        require(self.limit is None or self.limit > 0, f"requests.limit={self.limit} must be > 0")


@dataclasses.dataclass(frozen=True)
class OutputSection:
    """Where a run writes and how it reports.

    Attributes:
        workdir: run directory (None: runs/adapt/MODEL-STRATEGY-TASK).
        progress: show progress bars.
    """

    workdir: str | None = None
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class AdaptConfig:
    """Everything a self-adaptation run needs (`t2jax.adaptation.run.run_adapt`).

    Attributes:
        model: the model to load.
        strategy: "prompt", "cls" or "fewshot".
        experts: expert files "NAME=PATH,..." (dispatch uses the names code, math, reasoning),
            or "builtin": the model's shipped experts (`t2jax expert list`).
        cls_expert: the classification expert file (strategy "cls"), or "builtin".
        cache_dir: SVD factor cache root (None: the user cache directory).
        compare_base: also answer the task's items with the base weights (written to base/ in
            the run directory) and compare them item by item (comparison.md).
        requests: what is answered.
        options: settings of the two passes and the few-shot search.
        run: output directory and progress.
    """

    model: ModelSection = ModelSection()
    strategy: Strategy = "prompt"
    experts: str = ""
    cls_expert: str | None = None
    cache_dir: str | None = None
    compare_base: bool = False
    requests: RequestsSection = RequestsSection()
    options: AdaptOptions = AdaptOptions()
    run: OutputSection = OutputSection()

    def __post_init__(self):
        check_choices(self)

    def validate(self) -> AdaptConfig:
        """Checks that the settings make a run (the defaults alone do not: they name no
        experts). Returns the config.

        Raises:
            ConfigError: no experts, or requests / experts the strategy cannot use.
        """
        require(
            bool(self.experts),
            "experts must name at least one expert file (--experts NAME=PATH,...)",
        )
        has_task, has_prompts = self.requests.task is not None, bool(self.requests.prompts)
        if self.strategy == "fewshot":
            require(
                has_task, "strategy 'fewshot' needs requests.task (--task): the shots come from it"
            )
        else:
            require(
                has_task != has_prompts,
                "give either requests.task (--task) or requests.prompts (--prompt)",
            )
        require(
            self.strategy != "cls" or self.cls_expert is not None,
            "strategy 'cls' needs cls_expert (--cls-expert)",
        )
        require(
            not self.compare_base or (has_task and not has_prompts),
            "compare_base (--compare-base) compares answers to a task's items, not free prompts",
        )
        return self


def add_few_shot_arguments(group: argparse._ActionsContainer) -> None:
    """The few-shot options (read back by `few_shot_overrides`) on a parser or argument group;
    options not given keep the config's values (the official defaults)."""
    group.add_argument("--shots", type=int, help="default: 10")
    group.add_argument("--few-shot-seed", type=int, help="default: official")
    group.add_argument("--generations", type=int, help="default: 50")
    group.add_argument("--population", type=int, help="default: 32")
    group.add_argument("--elite-ratio", type=float, help="default: 0.2")
    group.add_argument(
        "--alpha-shape", choices=("per-matrix", "global"), help="default: per-matrix"
    )
    group.add_argument("--mix-space", choices=("z", "p"), help="p: raw parameters (official code)")
    group.add_argument("--no-tie-break", action="store_const", const=True)
    group.add_argument(
        "--per-candidate",
        action="store_const",
        const=True,
        help="score each candidate in its own merged call (faster on CPUs from ~3 shots)",
    )
    group.add_argument("--seed", type=int, help="CEM seed (default: 0)")


# Few-shot option (argparse dest) -> FewShotConfig field.
_FEW_SHOT_FIELDS = {
    "shots": "shots",
    "few_shot_seed": "split_seed",
    "generations": "generations",
    "population": "population_size",
    "elite_ratio": "elite_ratio",
    "alpha_shape": "alpha_shape",
    "mix_space": "mix_space",
    "per_candidate": "per_candidate",
    "seed": "seed",
    "rows_per_call": "rows_per_call",
}


def few_shot_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """{FewShotConfig field: value} of the options `add_few_shot_arguments` added that were
    given (and --rows-per-call, which also sizes the CEM's sampler calls)."""
    values = {field: getattr(args, dest, None) for dest, field in _FEW_SHOT_FIELDS.items()}
    values = {field: value for field, value in values.items() if value is not None}
    if "alpha_shape" in values:
        values["alpha_shape"] = values["alpha_shape"].replace("-", "_")
    if getattr(args, "no_tie_break", None):
        values["tie_break"] = False
    return values


def few_shot_config(args: argparse.Namespace) -> FewShotConfig:
    """The `FewShotConfig` of the official defaults and the options given."""
    return configuration.with_overrides(FewShotConfig(), few_shot_overrides(args))
