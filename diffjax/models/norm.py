"""GroupNorm (+ SiLU) as one op with a hand-written backward (Wu & He 2018).

``GroupNorm`` has the parameters of ``flax.linen.GroupNorm`` (``scale``, ``bias``, shape (C,)) and
its numbers (statistics E[x], E[x^2] - E[x]^2 over each group's positions and channels, then
(x - mean) * rsqrt(var + eps) * scale + bias), so checkpoints carry over. What differs is the
gradient: the autodiff of GroupNorm -> SiLU compiled on XLA:CPU into several multi-input fusions
that each re-read the activations and end in strided channel reductions; ``group_norm`` saves only
x and the per-(sample, group) statistics and does the backward in one reduction pass over (N, HW, C) to
per-(sample, channel) sums plus one elementwise pass:

  y = xhat * scale + bias,  xhat = (x - mean) * rstd,  gy = dL/dy (through SiLU when fused),
  A[n, c] = sum_hw gy * xhat,  B[n, c] = sum_hw gy,
  dscale = sum_n A,  dbias = sum_n B,
  dx = rstd * (gy * scale - mean_g(scale * B) - xhat * mean_g(scale * A)),
where mean_g averages over a group's channels and positions. ``GroupNorm`` takes this backward on
feature maps of at least ``FUSED_MIN_POSITIONS`` positions and leaves smaller ones to autodiff
(measured below); the forward is the same either way. A custom VJP has no forward mode
(``jax.jvp``/``jax.linearize``, used by the likelihood), so the module takes it only with
``train=True`` (the training step) and leaves evaluation to plain autodiff.
"""

from __future__ import annotations

import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["GroupNorm", "group_norm", "silu"]

ACTIVATIONS = (None, "silu")
# GroupNorm layers over at least this many positions (H * W) take the hand-written backward; below
# it XLA's fusion of the autodiff graph was as fast or faster in the whole U-Net step
# (experiments/bench_train.py's bare fwd+bwd, 2-core EPYC, median ms/step: size A, 8x8 and 4x4 maps,
# 292 with this threshold vs 312 hand-written everywhere; size B, 32x32 to 8x8 maps, 965 vs 1140
# with autodiff everywhere)
FUSED_MIN_POSITIONS = 256


def _group_sum(v, groups: int):
    """(N, 1, C) -> (N, 1, C): the sum over each group's channels, on every channel of the group."""
    n, _, c = v.shape
    return jnp.repeat(v.reshape(n, groups, c // groups).sum(-1), c // groups, axis=1)[:, None, :]


def _stats(x3, groups: int, eps: float):
    """Per-(sample, group) mean and 1/std of x3 (N, P, C) (P = positions), on each channel: (N, 1, C)."""
    count = x3.shape[1] * (x3.shape[2] // groups)
    mean = _group_sum(jnp.sum(x3, axis=1, keepdims=True), groups) / count
    mean2 = _group_sum(jnp.sum(jnp.square(x3), axis=1, keepdims=True), groups) / count
    var = jnp.maximum(mean2 - jnp.square(mean), 0.0)  # flax's use_fast_variance
    return mean, jax.lax.rsqrt(var + eps)


def silu(y):
    """SiLU y * sigmoid(y) (Elfwing et al. 2018), written y / (1 + exp(-y)) so that its last op is a division.

    Why: XLA does not duplicate an "expensive" op (a float division is one; a multiply is not) into
    the fusions that consume its result. With ``y * sigmoid(y)`` XLA:CPU re-derived the activation
    (GroupNorm, SiLU, upsampling) inside every transposed copy that feeds a weight-gradient
    convolution, in that copy's cache-hostile element order; with the division the activation is
    read once from memory. Measured (both forms compiled in one process, timed in alternating rounds,
    2-core EPYC): the digits train step, 4 steps per call, 233 vs 258 ms/step (0.90x, faster in all 6
    rounds); bench_train's size-B bare forward+backward 944 vs 1010 ms (0.93x). The
    exponent is clipped at 80 so that exp cannot overflow: then y / (1 + e^80) and its derivative are
    within 1e-33 of SiLU's, where autodiff of y / inf would give NaN.
    """
    return y / (1.0 + jnp.exp(-jnp.maximum(y, -80.0)))


def _forward(x3, scale, bias, groups, eps, act):
    mean, rstd = _stats(x3, groups, eps)
    y = (x3 - mean) * (rstd * scale) + bias  # flax.linen.GroupNorm's order of operations
    return (silu(y) if act == "silu" else y), (mean, rstd)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm3(x3, scale, bias, groups, eps, act):
    return _forward(x3, scale, bias, groups, eps, act)[0]


def _fwd(x3, scale, bias, groups, eps, act):
    out, (mean, rstd) = _forward(x3, scale, bias, groups, eps, act)
    return out, (x3, scale, bias, mean, rstd)


def _bwd(groups, eps, act, res, g):
    x3, scale, bias, mean, rstd = res
    xhat = (x3 - mean) * rstd
    gy = g
    if act == "silu":
        y = xhat * scale + bias
        s = jax.nn.sigmoid(y)
        gy = g * s * (1.0 + y * (1.0 - s))
    a = jnp.sum(gy * xhat, axis=1, keepdims=True)  # (N, 1, C)
    b = jnp.sum(gy, axis=1, keepdims=True)
    count = x3.shape[1] * (x3.shape[2] // groups)
    m1 = _group_sum(scale * b, groups) / count
    m2 = _group_sum(scale * a, groups) / count
    dx = rstd * (gy * scale - m1 - xhat * m2)
    return dx.astype(x3.dtype), jnp.sum(a, axis=(0, 1)).astype(scale.dtype), jnp.sum(b, axis=(0, 1)).astype(bias.dtype)


_group_norm3.defvjp(_fwd, _bwd)


def group_norm(x, scale, bias, num_groups: int, eps: float = 1e-6, act=None, fused_backward: bool = True):
    """GroupNorm of x (N, ..., C) over each group of C // num_groups channels and all positions, then act.

    ``act``: None or "silu" (applied to the normalized, scaled and shifted output).
    ``fused_backward``: the hand-written backward above (reverse mode only); False leaves the same
    forward to autodiff (every transformation).
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}; got {act!r}")
    c = x.shape[-1]
    if x.ndim < 2 or c % num_groups:
        raise ValueError(f"group_norm: num_groups={num_groups} must divide the channel axis (last) of x with "
                         f"shape {x.shape}")
    for name, v in (("scale", scale), ("bias", bias)):
        if v.shape != (c,):
            raise ValueError(f"group_norm: {name} must have shape ({c},), the channels of x; got {v.shape}")
    x3 = x.reshape(x.shape[0], -1, c)
    dtype = jnp.result_type(x.dtype, scale.dtype, jnp.float32)
    args = (x3.astype(dtype), scale.astype(dtype), bias.astype(dtype), num_groups, float(eps), act)
    out = _group_norm3(*args) if fused_backward else _forward(*args)[0]
    return out.reshape(x.shape)


class GroupNorm(nn.Module):
    """``flax.linen.GroupNorm``'s parameters and numbers, with an optional fused activation and ``group_norm``'s backward."""

    num_groups: int
    epsilon: float = 1e-6
    act: str | None = None
    fused_min_positions: int = FUSED_MIN_POSITIONS

    @nn.compact
    def __call__(self, x, train: bool = False):
        """``train=True`` (reverse mode only) takes the hand-written backward on large maps; else autodiff."""
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return group_norm(x, scale, bias, self.num_groups, self.epsilon, self.act,
                          fused_backward=train and math.prod(x.shape[1:-1]) >= self.fused_min_positions)
