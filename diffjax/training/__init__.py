"""Training: state and optimizer, one jitted (sharded) step, orbax checkpoints, the loop and evaluation.

``loss_fn(params, batch, key)`` comes from ``diffjax.losses``; this package owns no math.
"""

from diffjax.training.checkpoint import Checkpointer, NonFiniteError
from diffjax.training.state import TrainState, all_finite, ema_update, make_optimizer
from diffjax.training.step import (ContextLoss, StepContext, global_batch, make_mesh, make_train_step, shard_state,
                                   state_shardings)
from diffjax.training.tasks import TaskSpec, get_task

__all__ = [
    "Checkpointer",
    "NonFiniteError",
    "TrainState",
    "all_finite",
    "ema_update",
    "make_optimizer",
    "global_batch",
    "make_mesh",
    "make_train_step",
    "ContextLoss",
    "StepContext",
    "TaskSpec",
    "get_task",
    "shard_state",
    "state_shardings",
]
