"""One jitted train step, laid out on a device mesh with ``jax.sharding``.

The same code runs on one CPU, on 8 simulated devices and on a multi-host pod: the batch is split
over the mesh's ``data`` and ``fsdp`` axes, parameters are replicated or sharded over ``fsdp`` /
``model`` by the rule set in ``diffjax.sharding`` (Megatron tensor parallelism for transformer
blocks), and XLA's SPMD partitioner inserts the gradient all-reduce (or reduce-scatter), the
parameter all-gathers and the tensor-parallel activation all-reduces.
Random numbers are drawn from ``fold_in(state.key, step)`` inside the step; with JAX's
partitionable threefry (dropout masks included, ``diffjax.models.ops``) the counter of each
element is its index, so the draws do not depend on how the batch is laid out, and a run on 8
devices draws the same noise and masks as a run on 1.

Several steps can be fused into one call (``steps_per_call``) with ``lax.scan`` (score_sde's
``n_jitted_steps``): the host then feeds a stack of batches (steps_per_call, batch, ...).

Gradient accumulation (``grad_accum_steps`` = k) splits each step's batch into k micro-batches
of batch / k, strided (micro-batch i holds rows i, i + k, i + 2k, ...) so that each device keeps
its own rows, runs forward and backward on them in a ``lax.scan``, and applies the mean gradient in
one optimizer update: the update of the whole batch, up to float rounding, with 1/k the activation
memory. Micro-batch i draws its noise, times and dropout masks from ``fold_in(step_key, i)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffjax.sharding import batch_sharding, global_batch, make_mesh, tree_shardings
from diffjax.training.state import TrainState, ema_decay_at, ema_update

__all__ = ["make_mesh", "state_shardings", "shard_state", "global_batch", "make_train_step", "split_micro_batches",
           "StepContext", "ContextLoss"]


class StepContext(NamedTuple):
    """What a step's loss may read of the train state besides the parameters it differentiates."""

    step: jax.Array  # updates made before this one (int32 scalar)
    ema_params: Any
    extra: Any  # TrainState.extra: e.g. a teacher's weights


@dataclasses.dataclass(frozen=True)
class ContextLoss:
    """A loss that reads the train state: ``loss_fn(params, batch, key, ctx) -> (loss, aux)`` with ``ctx`` a
    ``StepContext`` (distillation teachers, consistency target networks, stage counters), and
    ``update_extra(ctx, params) -> extra``, the new ``TrainState.extra`` after the update (``ctx`` then
    holds the new step and EMA and the old extra, ``params`` the updated parameters; None: extra
    unchanged)."""

    loss_fn: Callable
    update_extra: Optional[Callable] = None


def state_shardings(state: TrainState, mesh: Mesh, min_size: int = 2**14):
    """NamedShardings for every leaf of the state by ``diffjax.sharding``'s rule set (``leaf_spec`` of the leaf's
    path and shape: transformer-block rules, else the shape rule), so params, EMA and moments of a tensor alike."""
    return tree_shardings(state, mesh, min_size)


def shard_state(state: TrainState, shardings) -> TrainState:
    """Place the state on the mesh (each process holds its addressable shards)."""
    return jax.device_put(state, shardings)


def make_train_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    ema_decay: float,
    ema_warmup: bool = False,
    shardings=None,
    mesh: Optional[Mesh] = None,
    steps_per_call: int = 1,
    grad_accum_steps: int = 1,
    donate: bool = True,
):
    """``step(state, batch) -> (state, metrics)``, jitted (score_sde ``train_step`` / VDM ``train_step``).

    ``loss_fn(params, batch, key) -> (loss, aux)``, or a ``ContextLoss`` that also reads the state. metrics: ``loss`` and ``grad_norm`` per step
    (shape (steps_per_call,)). ``shardings``/``mesh`` lay the state and the batch out on the mesh;
    the state's buffers are donated, so the input state must not be used after the call.
    ``grad_accum_steps`` = k: the mean gradient of k micro-batches (module docstring); the batch
    size must be a multiple of k (of k x the batch shards on a mesh). ``ema_warmup``: ``ema_decay_at``.
    """
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must lie in [0, 1); got {ema_decay}")
    if steps_per_call < 1:
        raise ValueError(f"steps_per_call must be >= 1; got {steps_per_call}")
    if not (isinstance(grad_accum_steps, int) and grad_accum_steps >= 1):
        raise ValueError(f"grad_accum_steps must be an integer >= 1; got {grad_accum_steps!r}")
    task = loss_fn if isinstance(loss_fn, ContextLoss) else ContextLoss(lambda p, b, k, ctx: loss_fn(p, b, k))
    value_and_grad = jax.value_and_grad(task.loss_fn, has_aux=True)

    def loss_and_grads(params, batch, key, ctx):
        if grad_accum_steps == 1:
            (loss, _), grads = value_and_grad(params, batch, key, ctx)
            return loss, grads
        micro = jax.tree.map(lambda v: split_micro_batches(v, grad_accum_steps), batch)

        def accumulate(carry, xs):
            i, mb = xs
            (loss, _), grads = value_and_grad(params, mb, jax.random.fold_in(key, i), ctx)
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro))
        return jax.tree.map(lambda v: v / grad_accum_steps, total)

    def one_step(state: TrainState, batch):
        key = jax.random.fold_in(state.key, state.step)
        loss, grads = loss_and_grads(state.params, batch, key, StepContext(state.step, state.ema_params, state.extra))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay_at(state.step, ema_decay, ema_warmup)
        new = state.replace(params=params, opt_state=opt_state, step=state.step + 1,
                            ema_params=ema_update(state.ema_params, params, decay))
        if task.update_extra is not None:
            new = new.replace(extra=task.update_extra(StepContext(new.step, new.ema_params, state.extra), params))
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def step(state, batches):
        if steps_per_call == 1:
            state, m = one_step(state, batches)
            return state, jax.tree.map(lambda v: v[None], m)
        return jax.lax.scan(one_step, state, batches)

    kwargs = {"donate_argnums": (0,)} if donate else {}
    if shardings is not None:
        if mesh is None:
            raise ValueError("shardings needs the mesh they live on")
        kwargs.update(in_shardings=(shardings, batch_sharding(mesh, stacked=steps_per_call > 1)),
                      out_shardings=(shardings, NamedSharding(mesh, P())))
    return jax.jit(step, **kwargs)


def split_micro_batches(v, k: int):
    """(B, ...) -> (k, B / k, ...), micro-batch i = rows i, i + k, ... (each device keeps its rows)."""
    if v.shape[0] % k:
        raise ValueError(f"batch of {v.shape[0]} rows is not divisible by grad_accum_steps={k}")
    return jnp.moveaxis(v.reshape(v.shape[0] // k, k, *v.shape[1:]), 1, 0)
