"""Settings of self-adaptation: the few-shot search (`FewShotConfig`) and a two-pass run
(`AdaptOptions`), plain frozen dataclasses with the official defaults, and the command-line form of
the few-shot settings (shared by `t2jax adapt` and the experiments)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Literal

from t2jax.svf.experts import MixSpace
from t2jax.tasks import OFFICIAL_STOP_STRINGS
from t2jax.tasks.cls import DispatchMethod

AlphaShape = Literal["per_matrix", "global"]


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
        logprob_batch_size: rows per teacher-forced pass of the tie-break.
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
    logprob_batch_size: int = 16

    def __post_init__(self):
        if self.alpha_shape not in ("per_matrix", "global"):
            raise AdaptError(
                f"alpha_shape must be 'per_matrix' or 'global', not {self.alpha_shape}"
            )
        if self.mix_space not in ("z", "p"):
            raise AdaptError(f"mix_space must be 'z' or 'p', not {self.mix_space!r}")
        if self.shots < 1 or self.generations < 1:
            raise AdaptError("few-shot search needs at least one shot and one generation")


@dataclasses.dataclass(frozen=True)
class AdaptOptions:
    """Settings of a two-pass run.

    Attributes:
        max_new_tokens: pass-2 generation budget (the task's official value in the CLI).
        stop_strings: pass-2 stop strings.
        rows_per_call: rows per sampler call in pass 2 (None: the whole batch in one call).
        classify_max_new_tokens: pass-1 budget of the dispatch strategies.
        dispatch: how pass 1 reads the category: "generate" (official: generate and parse the
            first `\\boxed{}`) or "likelihood" (the most likely of the four answers).
        official_other: "other" runs with the last-loaded expert (the official bug).
        official_quirks: render the classification prompt with the official Llama-3 template.
        few_shot: settings of strategy "fewshot".
    """

    max_new_tokens: int = 512
    stop_strings: tuple[str, ...] = OFFICIAL_STOP_STRINGS
    rows_per_call: int | None = None
    classify_max_new_tokens: int = 512
    dispatch: DispatchMethod = "generate"
    official_other: bool = False
    official_quirks: bool = False
    few_shot: FewShotConfig = FewShotConfig()


def add_few_shot_arguments(group: argparse._ActionsContainer) -> None:
    """The few-shot options (read back by `few_shot_config`) on a parser or argument group."""
    group.add_argument("--shots", type=int, default=10)
    group.add_argument("--few-shot-seed", type=int, default=None, help="default: official")
    group.add_argument("--generations", type=int, default=50)
    group.add_argument("--population", type=int, default=32)
    group.add_argument("--elite-ratio", type=float, default=0.2)
    group.add_argument("--alpha-shape", choices=("per-matrix", "global"), default="per-matrix")
    group.add_argument(
        "--mix-space", choices=("z", "p"), default="z", help="p: raw parameters (official code)"
    )
    group.add_argument("--no-tie-break", action="store_true")
    group.add_argument(
        "--per-candidate",
        action="store_true",
        help="score each candidate in its own merged call (faster on CPUs from ~3 shots)",
    )
    group.add_argument("--seed", type=int, default=0, help="CEM seed")


def few_shot_config(args: argparse.Namespace) -> FewShotConfig:
    """The `FewShotConfig` of the options `add_few_shot_arguments` added (and --rows-per-call)."""
    return FewShotConfig(
        shots=args.shots,
        generations=args.generations,
        population_size=args.population,
        elite_ratio=args.elite_ratio,
        alpha_shape=args.alpha_shape.replace("-", "_"),
        mix_space=args.mix_space,
        tie_break=not args.no_tie_break,
        seed=args.seed,
        split_seed=args.few_shot_seed,
        rows_per_call=args.rows_per_call,
        per_candidate=args.per_candidate,
    )
