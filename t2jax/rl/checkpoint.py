"""Orbax checkpoints of an SVF training run, for resuming after preemption or a kill (issue 5).

One `CheckpointManager` step directory per saved update holds two items:
  * "state": an array pytree (SVF parameters, optimizer state, step counter, best-valid
    parameters, the RNG key and the batch schedule), restored onto the shardings of a target;
  * "meta": JSON bookkeeping (best validation accuracy and step, wall time so far).
Saves are synchronous: when `save` returns, the step is on disk. Orbax writes each step to a
temporary directory and renames it when complete, so a run killed mid-save resumes from the
previous step. All processes call `save` and `restore` (orbax coordinates multi-host writes).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import orbax.checkpoint as ocp


class TrainCheckpoints:
    """The checkpoints of one run directory.

    Args:
        directory: where step directories go (created).
        keep: how many of the most recent steps to keep.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def latest_step(self) -> int | None:
        """The newest complete step, or None when nothing was saved."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
        """Saves an array pytree and JSON metadata as `step` (overwrites nothing: a step that
        already exists is skipped)."""
        if step in self._manager.all_steps():
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))
            ),
        )

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """Restores step `step` onto the structure, dtypes and shardings of `target`.

        Returns:
            (the restored pytree, the metadata dict).
        """
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.state, dict(restored.meta)

    def close(self) -> None:
        """Waits for pending writes and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
