"""XLA:CPU kernels of the model ops: what ``diffjax.models.ops`` runs when ``kernels="cpu"``.

Each function computes the same numbers as its default-path counterpart in ``ops`` and differs only
in the program XLA:CPU gets (figures: BENCHMARKS.md, "Model ops on XLA:CPU", and the sections named
below):

* ``conv2d_same``: stride-1 SAME convolution whose gradients are written as canonical convolutions
  (a custom VJP), because XLA:CPU's canonicalising rewrite of autodiff's convolutions did not run
  inside ``lax.scan`` bodies, where the backward then fell back to a naive loop.
* ``group_norm``: GroupNorm (+ SiLU) with a hand-written backward in one reduction pass (custom VJP).
* ``silu``: SiLU written with a final division, so XLA does not recompute it inside its consumers.
* ``threefry_bits`` / ``dropout``: Threefry-2x32 written out round by round instead of JAX's rolled
  CPU ``while`` loop ("Where the step's time goes"); the same bits as ``jax.random.bits``.
* ``qkv_attention``: three (C, C) projections sliced from the fused "qkv" parameters and two batched
  matmuls, instead of slicing one (B, T, 3 C) projection ("Attention block").

A custom VJP has no forward mode (``jax.jvp`` / ``jax.linearize``), so ``ops`` takes the custom-VJP
kernels only with ``train=True``, the training step's reverse mode.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffjax.models import ops

__all__ = [
    "FUSED_MIN_POSITIONS",
    "conv2d_same",
    "group_norm",
    "silu",
    "threefry_bits",
    "dropout",
    "spatial_attention",
    "qkv_attention",
]

# ---- convolution ------------------------------------------------------------------------------
#   dx = conv(g, rot180(W) with in/out swapped),  padding (k - 1 - lo, k - 1 - hi)
#   dW[i, j, c, d] = sum_{n,h,w} x_pad[n, h + i, w + j, c] g[n, h, w, d]
#      = conv(lhs = x as (C, H, W, N): batch C, features N;  kernel = g as (H, W, N, D)), padding (lo, hi)
# Both are in XLA:CPU's canonical form b01f_01io->b01f, with the transposes its rewrite would insert.


def conv2d_same(x, w):
    """Stride-1 SAME convolution of x (N, H, W, Cin) with w (kh, kw, Cin, Cout); canonical-form gradients."""
    if jnp.ndim(x) != 4 or jnp.ndim(w) != 4 or jnp.shape(w)[2] != jnp.shape(x)[-1]:
        raise ValueError(f"conv2d_same: x must be (N, H, W, Cin) and w (kh, kw, Cin, Cout) with the same Cin; "
                         f"got x {jnp.shape(x)}, w {jnp.shape(w)}")
    return _conv2d_same(x, w)


@jax.custom_vjp
def _conv2d_same(x, w):
    return ops.conv2d(x, w)


def _conv_fwd(x, w):
    return _conv2d_same(x, w), (x, w)


def _conv_bwd(res, g):
    x, w = res
    kh, kw = w.shape[:2]
    pads = ops.same_pads(kh, kw)
    w_t = jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2))  # rot180, (kh, kw, Cout, Cin)
    dx = ops.conv2d(g, w_t, padding=tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip((kh, kw), pads)))
    dw = ops.conv2d(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3)), padding=pads)  # (Cin, kh, kw, Cout)
    return dx, jnp.transpose(dw, (1, 2, 0, 3))


_conv2d_same.defvjp(_conv_fwd, _conv_bwd)


# ---- GroupNorm (+ SiLU) -----------------------------------------------------------------------
#   y = xhat * scale + bias,  xhat = (x - mean) * rstd,  gy = dL/dy (through SiLU when fused),
#   A[n, c] = sum_hw gy * xhat,  B[n, c] = sum_hw gy,   dscale = sum_n A,  dbias = sum_n B,
#   dx = rstd * (gy * scale - mean_g(scale * B) - xhat * mean_g(scale * A)),
# mean_g averaging over a group's channels and positions. Only x and the per-(sample, group)
# statistics are saved; the backward is one reduction pass over (N, HW, C) plus one elementwise pass.

# feature maps with fewer positions (H * W) leave the backward to autodiff, which XLA fuses as well
# there (BENCHMARKS.md, "Model ops on XLA:CPU")
FUSED_MIN_POSITIONS = 256


def silu(y):
    """SiLU y * sigmoid(y) (Elfwing et al. 2018), written y / (1 + exp(-y)).

    XLA duplicates no division into the fusions that consume its result, so the activation is read
    once from memory instead of being re-derived inside every transposed copy feeding a
    weight-gradient convolution (BENCHMARKS.md, "Model ops on XLA:CPU"). The exponent is clipped at
    80 so that exp cannot overflow: y / (1 + e^80) and its derivative are within 1e-33 of SiLU's,
    where autodiff of y / inf would give NaN.
    """
    return y / (1.0 + jnp.exp(-jnp.maximum(y, -80.0)))


def _gn_forward(x3, scale, bias, groups, eps, act):
    y, mean, rstd = ops.normalize_groups(x3, scale, bias, groups, eps)
    return (silu(y) if act == "silu" else y), (mean, rstd)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm3(x3, scale, bias, groups, eps, act):
    return _gn_forward(x3, scale, bias, groups, eps, act)[0]


def _gn_fwd(x3, scale, bias, groups, eps, act):
    out, (mean, rstd) = _gn_forward(x3, scale, bias, groups, eps, act)
    return out, (x3, scale, bias, mean, rstd)


def _gn_bwd(groups, eps, act, res, g):
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
    m1 = ops.group_sum(scale * b, groups) / count
    m2 = ops.group_sum(scale * a, groups) / count
    dx = rstd * (gy * scale - m1 - xhat * m2)
    return dx.astype(x3.dtype), jnp.sum(a, axis=(0, 1)).astype(scale.dtype), jnp.sum(b, axis=(0, 1)).astype(bias.dtype)


_group_norm3.defvjp(_gn_fwd, _gn_bwd)


def group_norm(x, scale, bias, num_groups: int, eps: float = 1e-6, act=None, fused_backward: bool = True):
    """``ops.group_norm`` (Wu & He 2018, then ``act`` in None | "silu") with the hand-written backward above.

    ``fused_backward=False`` leaves the same forward to autodiff (every transformation). Computes
    in at least float32 and returns that dtype.
    """
    x3, scale, bias = ops.check_group_norm(x, scale, bias, num_groups, act)
    args = (x3, scale, bias, num_groups, float(eps), act)
    out = _group_norm3(*args) if fused_backward else _gn_forward(*args)[0]
    return out.reshape(x.shape)


# ---- dropout ----------------------------------------------------------------------------------
# Threefry-2x32-20 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"): under JAX's
# default jax_threefry_partitionable=True the counter of element i is its row-major index i, hashed
# with the key, and the two output words are XORed; so a sharded batch draws the mask of an unsharded one.

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))  # rotation constants, alternating by groups of four rounds
_KS_PARITY = np.uint32(0x1BD11BDA)  # the key-schedule parity constant of Threefish/Threefry


def _rotl(x, r: int):
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _threefry2x32(k1, k2, x1, x2):
    """Threefry-2x32 with 20 rounds on counter words (x1, x2) under key (k1, k2): key injection every 4 rounds."""
    ks = (k1, k2, k1 ^ k2 ^ _KS_PARITY)
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = _rotl(x2, r) ^ x1
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def _flat_index(shape) -> jax.Array:
    """uint32 row-major index of every element of ``shape`` (built from iotas, so it shards like the data)."""
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    index = jnp.zeros(shape, jnp.uint32)
    for d, s in enumerate(strides):
        if shape[d] > 1:
            index = index + lax.broadcasted_iota(jnp.uint32, shape, d) * np.uint32(s)
    return index


def is_threefry_key(key) -> bool:
    """Whether ``key`` is a threefry2x32 key: a typed key of that impl, or a raw uint32[2]."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return str(jax.random.key_impl(key)) == "threefry2x32"
    return key.dtype == jnp.uint32 and key.shape == (2,)


def threefry_bits(key, shape) -> jax.Array:
    """uint32 random bits of ``shape`` from a threefry key (raw uint32[2] or typed): ``jax.random.bits``'s values."""
    shape = tuple(int(d) for d in shape)
    if math.prod(shape) >= 2**32:
        raise ValueError(f"threefry_bits draws fewer than 2**32 values; shape {shape} has {math.prod(shape)}")
    if not is_threefry_key(key):
        impl = jax.random.key_impl(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else None
        raise ValueError(f"key must be a threefry2x32 key (typed, or uint32[2]); got "
                         f"{f'a {impl} key' if impl else f'{key.dtype}{list(key.shape)}'}")
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    shape_out, shape = shape, (shape or (1,))
    # the 64-bit counter is (high word, low word) = (0, index) below 2**32 elements
    hi, lo = _threefry2x32(key[0], key[1], jnp.zeros(shape, jnp.uint32), _flat_index(shape))
    return (hi ^ lo).reshape(shape_out)


def dropout(key, x, rate: float):
    """``ops.dropout`` with the mask from ``threefry_bits``: bit for bit ``jax.random.bernoulli``'s for a threefry key.

    The uniform is ``jax.random.uniform``'s float32 from bits (mantissa <- top 23 bits, exponent of
    1.0, minus 1), kept where below 1 - rate. Any other key impl takes ``ops.dropout``.
    """
    if not is_threefry_key(key):
        return ops.dropout(key, x, rate)
    bits = threefry_bits(key, x.shape)
    u = lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32) - 1.0
    return ops.apply_keep_mask(x, u < jnp.float32(1.0 - rate), rate)


# ---- attention --------------------------------------------------------------------------------

def spatial_attention(q, k, v, num_heads: int):
    """``ops.attention`` as two batched matmuls on (B, T, C) or (B, T, heads, d); logits and softmax in >= float32."""
    b, t, c = q.shape
    d = c // num_heads
    f32 = jnp.promote_types(q.dtype, jnp.float32)
    q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    if num_heads == 1:
        logits = jnp.einsum("btc,bsc->bts", q, k, preferred_element_type=f32)
        p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bts,bsc->btc", p, v)
    q, k, v = (a.reshape(b, t, num_heads, d) for a in (q, k, v))
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=f32)
    p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", p, v).reshape(b, t, c)


def qkv_attention(h, kernel, bias, num_heads: int):
    """``ops.qkv_attention`` with q, k, v as three (C, C) projections sliced from the fused (C, 3 C) kernel."""
    c = h.shape[-1]
    q, k, v = (h @ kernel[:, i * c:(i + 1) * c] + bias[i * c:(i + 1) * c] for i in range(3))
    return spatial_attention(q, k, v, num_heads)
