"""Orbax checkpoints of the ``TrainState``: periodic, keep-last-N, atomic, never of a non-finite state.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact (unfinished temporaries are cleaned up on the next
start). Restoring goes through an abstract state carrying the target shardings, so a checkpoint
written on one mesh restores onto another.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import orbax.checkpoint as ocp

from diffjax.training.state import TrainState, all_finite

__all__ = ["NonFiniteError", "Checkpointer"]


class NonFiniteError(FloatingPointError):
    """A loss, gradient or parameter became NaN/inf; nothing non-finite is checkpointed."""


class Checkpointer:
    """Keep-last-``max_to_keep`` checkpoints of a TrainState under ``directory`` (orbax CheckpointManager)."""

    def __init__(self, directory: str, max_to_keep: int = 3):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1; got {max_to_keep}")
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self):
        return list(self._manager.all_steps())

    def save(self, state: TrainState, *, force: bool = True) -> int:
        """Save at ``state.step`` after checking that every parameter and moment is finite."""
        step = int(jax.device_get(state.step))
        if not bool(jax.device_get(all_finite(state))):
            raise NonFiniteError(f"refusing to checkpoint a non-finite state at step {step}")
        if step in self._manager.all_steps():
            return step
        self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
        self._manager.wait_until_finished()
        return step

    def restore(self, target: TrainState, step: Optional[int] = None) -> TrainState:
        """Restore ``step`` (default: the latest) into the structure, dtypes and shardings of ``target``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self):
        self._manager.close()
