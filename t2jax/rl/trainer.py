"""SVF expert training with REINFORCE, as the official code does it (spec section 2), and the
paper's baselines (LoRA / IA3 / DoRA, `adapter.method`; next-token prediction, `rl.objective`)
through the same loop.

One training step (`Trainer._step`):
  1. rollout: merge the adapter (W'(z) for SVF) into the weights once and generate one greedy
     completion per prompt (official) with the t2jax sampler (`t2jax.rl.rollout`);
  2. score: the task's official scorer gives +1 / -1 rewards (next-token training replaces 1-2
     by the reference solutions);
  3. log-prob forward/backward (`t2jax.rl.loss.compute_gradients`) and update
     (`t2jax.rl.loss.apply_gradients`);
  4. every `eval_every` updates (after update i with i % eval_every == 0, as in the official code):
     greedy evaluation on the train and valid splits; the expert with the strictly best valid
     accuracy is kept (the base model is never a candidate) and exported: SVF as a portable
     expert file (`t2jax.svf.experts`), a baseline as a PEFT adapter directory.
The state is checkpointed with orbax (`t2jax.rl.checkpoint`) so a killed run resumes where it
stopped and ends with the same expert.

Sharding: the batch is split over the mesh's data axes, weights and factors are FSDP-sharded as
loaded, and p, the optimizer state and z are replicated. Every process runs the same steps; only
process 0 writes metrics, plots and expert files (orbax coordinates checkpoint writes).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from t2jax import metrics as metrics_lib
from t2jax import parallel
from t2jax.adapted import Choice
from t2jax.evaluation import paired_comparison
from t2jax.rl import checkpoint as checkpoint_lib
from t2jax.rl.batch import batch_schedule
from t2jax.rl.config import TrainConfig
from t2jax.rl.loss import LossOptions, Params, apply_gradients, compute_gradients, init_state
from t2jax.rl.rollout import (
    evaluate_split,
    generate_rollouts,
    policy_batch,
    reference_batch,
    rollout_metrics,
    score_rollouts,
)
from t2jax.rl.run_dir import RunDirectory, expert_name
from t2jax.rl.setup import Setup, load_setup

logger = logging.getLogger(__name__)


def _copy(tree: Any) -> Any:
    """A copy of an array pytree (which survives donation of the original)."""
    return jax.tree.map(jnp.copy, tree)


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
    params of the newest checkpoint, written just before it), final_expert.safetensors (for a
    baseline: best_adapter/, latest_adapter/, final_adapter/ in PEFT's format),
    learning_curve.png and summary.json (written last: the run is finished).
    """

    def __init__(self, setup: Setup):
        self.setup = setup
        self.config = setup.config
        self.is_main = parallel.is_main_process()
        self.mesh = setup.model.mesh
        self.files = RunDirectory(self.config.run.workdir, is_main=self.is_main)
        self.workdir = self.files.path
        self.files.write_config(self.config, self.mesh)
        self.checkpoints = checkpoint_lib.TrainCheckpoints(
            self.workdir / "checkpoints", keep=self.config.run.keep_checkpoints
        )

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
                recorder.write(0, self._evaluate(self.setup.base_choice(), 0))
            tree, best, elapsed = self._loop(tree, best, start, elapsed, recorder)
        finally:
            recorder.close()
        summary = self._finish(tree, best, elapsed)
        self.checkpoints.close()
        return summary

    def _loop(self, tree, best: Best, start: int, elapsed: float, recorder):
        """Updates `start` .. `num_iters` - 1, each followed by its evaluation and checkpoint when
        due. Returns the final (tree, best, elapsed seconds)."""
        rl = self.config.rl
        bar = tqdm.tqdm(
            total=rl.num_iters,
            initial=start,
            desc=f"{self.config.adapter.method} {self.setup.task.name}",
            disable=not (self.config.run.progress and self.is_main),
        )
        for index in range(start, rl.num_iters):
            began = time.perf_counter()
            tree, record = self._step(tree, index)
            step = index + 1
            if index % rl.eval_every == 0 or (self.config.run.eval_at_end and step == rl.num_iters):
                tree, best = self._evaluate_and_keep_best(tree, best, step, record)
            elapsed += time.perf_counter() - began
            record.update({"best/valid_accuracy": best.accuracy, "best/step": best.step or 0})
            recorder.write(step, record)
            if step % self.config.run.checkpoint_every == 0 or step == rl.num_iters:
                self._checkpoint(tree, best, step, elapsed)
            bar.update(1)
            progress = {"reward": "rollout/reward", "acc": "rollout/accuracy", "loss": "loss/loss"}
            bar.set_postfix(
                **{name: f"{record[key]:.3f}" for name, key in progress.items() if key in record},
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
        data_metrics: dict[str, Any] = {}
        if config.rl.objective == "ntp":
            with timer.phase("batch"):
                batch, num_microbatches = reference_batch(setup, examples)
        else:
            with timer.phase("rollout"):
                rollouts = generate_rollouts(setup, setup.choice(state.params), examples, seed)
            with timer.phase("score"):
                rollouts = score_rollouts(setup, rollouts)
            with timer.phase("batch"):
                batch, num_microbatches = policy_batch(setup, rollouts)
            data_metrics = rollout_metrics(rollouts)
        with timer.phase("logprob_fwd_bwd"):
            grads, loss_metrics = compute_gradients(
                setup.model.config,
                LossOptions.from_config(config.adapter, config.svf, config.rl),
                state.params,
                setup.model.weights,
                setup.model.factors,
                batch,
                num_microbatches,
                None if setup.is_svf else jax.random.key_data(jax.random.fold_in(key, 1)),
            )
            jax.block_until_ready(grads)
        with timer.phase("update"):
            state, update_metrics = apply_gradients(config.rl, state, grads)
            jax.block_until_ready(state)
        record = {
            **data_metrics,
            **{f"loss/{k}": float(v) for k, v in loss_metrics.items()},
            **{f"optim/{k}": float(v) for k, v in update_metrics.items()},
            **timer.metrics(),
        }
        return {**tree, "state": state}, record

    def _evaluate_and_keep_best(
        self, tree: dict[str, Any], best: Best, step: int, record: dict[str, Any]
    ) -> tuple[dict[str, Any], Best]:
        """Evaluates the current params into `record`; a strictly better valid accuracy makes them
        the best expert (kept in the tree and exported)."""
        evaluation = self._evaluate(self.setup.choice(tree["state"].params), step)
        record.update(evaluation)
        accuracy = evaluation["eval/valid/accuracy"]
        if accuracy > best.accuracy:
            best = Best(accuracy, step)
            tree["best_params"] = _copy(tree["state"].params)
            self._export(tree["best_params"], "best")
        return tree, best

    def _checkpoint(self, tree: dict[str, Any], best: Best, step: int, elapsed: float) -> None:
        """Exports the latest expert, then saves the checkpoint of `step`."""
        meta = {"best_accuracy": best.accuracy, "best_step": best.step, "elapsed_s": elapsed}
        self._export(tree["state"].params, "latest")
        self.checkpoints.save(step, tree, meta)

    def _evaluate(self, choice: Choice, step: int) -> dict[str, float]:
        """Greedy evaluation of the adapter `choice` on the train (unless eval_train_limit is 0)
        and valid examples; per-sample records go to eval/step_N/{train,valid}."""
        began = time.perf_counter()
        out = self.workdir / "eval" / f"step_{step:06d}"
        record = {}
        if self.setup.eval_train:
            record.update(
                evaluate_split(self.setup, choice, "train", self.setup.eval_train, out / "train")
            )
        record.update(evaluate_split(self.setup, choice, "valid", self.setup.valid, out / "valid"))
        record["time/eval"] = time.perf_counter() - began
        return record

    def _export(self, params: Params, which: str) -> None:
        """Writes the "best", "latest" or "final" params (main process): SVF as a portable
        expert file, a baseline as a PEFT adapter directory."""
        name = expert_name(which, self.config.adapter.method)
        if self.setup.is_svf:
            self.files.export(
                params, name, self.config.svf.parametrization, self.setup.model.factors.fingerprint
            )
            return
        self.files.export_adapter(
            params,
            name,
            self.setup.model.config,
            alpha=self.config.adapter.alpha,
            base_model=self.config.model.name,
        )

    def _finish(self, tree: dict[str, Any], best: Best, elapsed: float) -> dict[str, Any]:
        """Exports the final expert, compares best and base on valid and test (if any), plots
        the learning curve and writes summary.json."""
        params, method = tree["state"].params, self.config.adapter.method
        self._export(params, "final")
        found = best.step is not None
        summary = {
            "status": "finished",
            "task": self.setup.task.name,
            "model": self.config.model.name,
            "steps": int(tree["state"].step),
            "best_step": best.step,
            "best_valid_accuracy": best.accuracy if found else None,
            "method": self.config.adapter.method,
            "objective": self.config.rl.objective,
            "best_expert": str(self.workdir / expert_name("best", method)) if found else None,
            "final_expert": str(self.workdir / expert_name("final", method)),
            "train_seconds": elapsed,
        }
        eval_dir = self.workdir / "eval"
        if self.config.run.eval_base and found:
            summary["valid_vs_base"] = paired_comparison(
                eval_dir / "step_000000" / "valid", eval_dir / f"step_{best.step:06d}" / "valid"
            )
        if self.setup.test:
            summary.update(self._test(tree["best_params"] if found else params))
        title = f"{method.upper()} {self.setup.task.name} / {self.config.model.name}"
        self.files.finish(summary, best.step, title)
        return summary

    def _test(self, chosen: Params) -> dict[str, Any]:
        """Greedy accuracies of the base model and of the chosen params on the test split, and
        their paired comparison."""
        eval_dir = self.workdir / "eval"
        results = {}
        for name, choice in (
            ("base", self.setup.base_choice()),
            ("best", self.setup.choice(chosen)),
        ):
            results[f"test_{name}"] = evaluate_split(
                self.setup, choice, "test", self.setup.test, eval_dir / f"test_{name}"
            )
        results["test_vs_base"] = paired_comparison(eval_dir / "test_base", eval_dir / "test_best")
        return results


def train(config: TrainConfig) -> dict[str, Any]:
    """Loads everything and runs (or resumes, or just re-finishes) a training run.

    Returns:
        The run summary (also written to `run.workdir/summary.json`).
    """
    return Trainer(load_setup(config)).run()
