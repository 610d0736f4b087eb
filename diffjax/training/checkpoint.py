"""Orbax checkpoints of the ``TrainState``: periodic, keep-last-N, atomic, never of a non-finite state.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact (unfinished temporaries are cleaned up on the next
start). Restoring goes through an abstract state carrying the target shardings, so a checkpoint
written on one mesh restores onto another.

The run's config is stored beside each step as ``config_<step>.json`` (written before the step, so
a step never exists without its config; removed with it): ``diffjax.load_run`` rebuilds the model
from the config of the step it restores.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import jax
import orbax.checkpoint as ocp

from diffjax.training.state import TrainState, all_finite

__all__ = ["NonFiniteError", "Checkpointer"]


class NonFiniteError(FloatingPointError):
    """A loss, gradient or parameter became NaN/inf; nothing non-finite is checkpointed."""


class Checkpointer:
    """Keep-last-``max_to_keep`` checkpoints of a TrainState under ``directory`` (orbax CheckpointManager).

    ``read_only``: restore only, and leave the directory as it is (a run still training there keeps its
    unfinished save), for reading another job's checkpoints.
    """

    def __init__(self, directory: str, max_to_keep: int = 3, *, read_only: bool = False):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1; got {max_to_keep}")
        self.directory = os.path.abspath(directory)
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                               enable_async_checkpointing=False, read_only=read_only,
                                               cleanup_tmp_directories=not read_only)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self):
        return list(self._manager.all_steps())

    def save(self, state: TrainState, *, config=None, force: bool = True) -> int:
        """Save at ``state.step`` after checking that every parameter and moment is finite; ``config``
        (a ConfigDict) is written beside the step."""
        step = int(jax.device_get(state.step))
        if self.read_only:
            raise ValueError(f"this Checkpointer of {self.directory} is read-only; not saving step {step}")
        if not bool(jax.device_get(all_finite(state))):
            raise NonFiniteError(f"refusing to checkpoint a non-finite state at step {step}")
        if step in self._manager.all_steps():
            return step
        if config is not None and jax.process_index() == 0:
            path = self.config_path(step)
            with open(path + ".tmp", "w") as f:
                f.write(config.to_json_best_effort(indent=2, sort_keys=True))
            os.replace(path + ".tmp", path)
        self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            self._remove_stale_configs()
        return step

    def config_path(self, step: int) -> str:
        return os.path.join(self.directory, f"config_{step}.json")

    def config(self, step: Optional[int] = None) -> Optional[dict]:
        """The config stored with ``step`` (default: the latest) as a dict, or None (a run from before
        configs were stored with checkpoints)."""
        step = self.latest_step() if step is None else step
        path = None if step is None else self.config_path(step)
        if path is None or not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def _remove_stale_configs(self):
        kept = {os.path.basename(self.config_path(s)) for s in self._manager.all_steps()}
        for name in os.listdir(self.directory):  # configs of deleted steps, and any a kill left half-written
            if name.startswith("config_") and name not in kept:
                os.remove(os.path.join(self.directory, name))

    def restore(self, target: TrainState, step: Optional[int] = None) -> TrainState:
        """Restore ``step`` (default: the latest) into the structure, dtypes and shardings of ``target``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self):
        self._manager.close()
