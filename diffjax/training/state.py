"""The training state pytree, the optimizer and the EMA.

``TrainState`` holds everything a run needs to continue bit for bit: parameters, their EMA,
the optimizer state, the step and the run's PRNG key (per-step keys are ``fold_in(key, step)``,
so the key stream after a restore is the one an uninterrupted run would have drawn).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

__all__ = ["TrainState", "make_optimizer", "ema_decay_at", "ema_update", "all_finite"]


class TrainState(flax.struct.PyTreeNode):
    """params, ema_params, opt_state, step (int32 scalar), key (raw uint32 PRNG key) and ``extra``: what a
    task keeps beside them (a distillation teacher's weights, a consistency target network; None for plain
    diffusion, an empty subtree, so such states and their checkpoints are as before)."""

    params: Any
    ema_params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array
    extra: Any = None

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation, key, extra=None):
        """Fresh state at step 0; the EMA starts at the initial parameters."""
        return cls(params=params, ema_params=jax.tree.map(jnp.copy, params), opt_state=optimizer.init(params),
                   step=jnp.zeros((), jnp.int32), key=jnp.asarray(key), extra=extra)


def make_optimizer(*, learning_rate: float, warmup_steps: int = 0, grad_clip: float = 0.0,
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   optimizer: str = "adam") -> optax.GradientTransformation:
    """Adam / AdamW with linear warm-up and global-norm gradient clipping (Ho et al. 2020 app. B settings).

    Warm-up: lr ramps linearly from 0 to ``learning_rate`` over ``warmup_steps`` and stays there.
    """
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0; got {learning_rate}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0; got {warmup_steps}")
    if grad_clip < 0:
        raise ValueError(f"grad_clip must be >= 0 (0 disables clipping); got {grad_clip}")
    if optimizer not in ("adam", "adamw"):
        raise ValueError(f"optimizer must be 'adam' or 'adamw'; got {optimizer!r}")
    lr = optax.linear_schedule(0.0, learning_rate, warmup_steps) if warmup_steps > 0 else learning_rate
    if optimizer == "adamw":
        opt = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    else:
        opt = optax.adam(lr, b1=b1, b2=b2, eps=eps)
    return optax.chain(optax.clip_by_global_norm(grad_clip), opt) if grad_clip > 0 else opt


def ema_decay_at(step, decay: float, warmup: bool = False):
    """EMA decay of the update after ``step`` updates: ``decay``, or with warm-up min(decay, (1 + step) / (10 + step))
    (TF ``ExponentialMovingAverage(num_updates=step)``, as in score_sde and diffusers' ``EMAModel``)."""
    if not warmup:
        return decay  # a Python float: (1 - decay) folds in double precision, as without the option
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def ema_update(ema_params, params, decay):
    """Exponential moving average ema <- decay ema + (1 - decay) params (Polyak averaging)."""
    return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema_params, params)


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when every floating leaf of ``tree`` is finite (a scalar bool array).

    One compiled program for the whole tree. Eager ops leaf by leaf would dispatch two programs per
    leaf; on sharded leaves each one holds a collective, and dozens of them queued at once can take
    every thread of XLA:CPU's work runner (one per device) while the programs ahead of them still
    need one: 8 simulated devices deadlocked that way in a checkpoint save."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)
