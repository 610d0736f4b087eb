"""The model ops every diffjax network is built from: convolution, GroupNorm (+ SiLU), dropout, attention.

Each op is a Flax module with a ``kernels`` field ("auto" | "xla" | "cpu") and a compute ``dtype``
(None or "float32" | "bfloat16"; parameters stay float32):

* "xla", the default path, is stock JAX: ``lax.conv_general_dilated``, GroupNorm math left to
  autodiff, dropout by ``jax.random.bernoulli`` (any key impl, rbg included), and
  ``jax.nn.dot_product_attention`` on (B, T, heads, d), which picks cuDNN / flash attention on GPU.
  Every transformation works on it (``jax.jvp`` through a training-mode model included).
* "cpu" takes the XLA:CPU kernels of ``diffjax.models.cpu_kernels`` (custom-VJP convolution and
  GroupNorm backward with ``train=True`` only, unrolled threefry dropout, split-qkv attention).
* "auto" is "cpu" iff ``jax.default_backend() == "cpu"``, else "xla".

Both paths have the same parameters (names, shapes, dtypes: those of ``flax.linen``'s Conv,
GroupNorm and a fused ``Dense(3 C)`` "qkv") and the same numbers up to float rounding, with the
same dropout masks for threefry keys; a checkpoint of one restores into the other.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "KERNELS",
    "DTYPES",
    "check_kernels",
    "resolve_kernels",
    "compute_dtype",
    "conv2d",
    "same_pads",
    "group_sum",
    "normalize_groups",
    "check_group_norm",
    "group_norm",
    "silu",
    "dropout",
    "apply_keep_mask",
    "attention",
    "qkv_attention",
    "split_qkv",
    "QKV_LAYOUTS",
    "Conv",
    "GroupNorm",
    "Dropout",
    "QKVAttention",
]

KERNELS = ("auto", "xla", "cpu")
DTYPES = (None, "float32", "bfloat16")
GN_ACTIVATIONS = (None, "silu")
QKV_LAYOUTS = ("fused", "split")
_DN = ("NHWC", "HWIO", "NHWC")


# ---- selection --------------------------------------------------------------------------------

def check_kernels(kernels) -> str:
    """Return ``kernels`` if it names a kernel set; else raise a ValueError naming the field."""
    if not isinstance(kernels, str) or kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}; got {kernels!r}")
    return kernels


def resolve_kernels(kernels: str, backend: Optional[str] = None) -> str:
    """The kernel set of ``kernels``: "auto" -> "cpu" iff the backend (default ``jax.default_backend()``) is "cpu"."""
    if check_kernels(kernels) != "auto":
        return kernels
    return "cpu" if (jax.default_backend() if backend is None else backend) == "cpu" else "xla"


def compute_dtype(dtype) -> jnp.dtype:
    """The compute dtype named by a model's ``dtype`` field (None means float32)."""
    if not (dtype is None or isinstance(dtype, str)) or dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} (the compute dtype; parameters stay float32); "
                         f"got {dtype!r}")
    return jnp.dtype(dtype or "float32")


def _cpu():
    """``diffjax.models.cpu_kernels``, imported when first selected (it builds on this module's formulas)."""
    from diffjax.models import cpu_kernels

    return cpu_kernels


# ---- pure functions: the default path, and the formulas the CPU kernels share -----------------

def same_pads(kh: int, kw: int):
    """SAME padding (lo, hi) per spatial axis for stride 1 (lo = (k - 1) // 2, as XLA's SAME)."""
    return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in (kh, kw))


def conv2d(x, w, strides: int = 1, padding="SAME"):
    """2-D convolution of x (N, H, W, Cin) with w (kh, kw, Cin, Cout), NHWC / HWIO, SAME by default."""
    return lax.conv_general_dilated(x, w, (strides, strides), padding, dimension_numbers=_DN)


def group_sum(v, groups: int):
    """(N, 1, C) -> (N, 1, C): the sum over each group's channels, on every channel of the group."""
    n, _, c = v.shape
    return jnp.repeat(v.reshape(n, groups, c // groups).sum(-1), c // groups, axis=1)[:, None, :]


def normalize_groups(x3, scale, bias, groups: int, eps: float):
    """GroupNorm (Wu & He 2018 eq. 1-2) of x3 (N, P, C): (y, mean, rstd), statistics (N, 1, C) per group.

    Statistics E[x] and E[x^2] - E[x]^2 over each group's positions and channels (flax's
    ``use_fast_variance``), then ``(x - mean) * (rstd * scale) + bias`` (flax.linen.GroupNorm's order).
    """
    count = x3.shape[1] * (x3.shape[2] // groups)
    mean = group_sum(jnp.sum(x3, axis=1, keepdims=True), groups) / count
    mean2 = group_sum(jnp.sum(jnp.square(x3), axis=1, keepdims=True), groups) / count
    rstd = lax.rsqrt(jnp.maximum(mean2 - jnp.square(mean), 0.0) + eps)
    return (x3 - mean) * (rstd * scale) + bias, mean, rstd


def check_group_norm(x, scale, bias, num_groups: int, act):
    """Validate GroupNorm arguments; return x as (N, positions, C) and all three in at least float32."""
    if act not in GN_ACTIVATIONS:
        raise ValueError(f"act must be one of {GN_ACTIVATIONS}; got {act!r}")
    c = x.shape[-1]
    if x.ndim < 2 or c % num_groups:
        raise ValueError(f"group_norm: num_groups={num_groups} must divide the channel axis (last) of x with "
                         f"shape {x.shape}")
    for name, v in (("scale", scale), ("bias", bias)):
        if v.shape != (c,):
            raise ValueError(f"group_norm: {name} must have shape ({c},), the channels of x; got {v.shape}")
    dtype = jnp.result_type(x.dtype, scale.dtype, jnp.float32)
    return x.reshape(x.shape[0], -1, c).astype(dtype), scale.astype(dtype), bias.astype(dtype)


def group_norm(x, scale, bias, num_groups: int, eps: float = 1e-6, act=None):
    """GroupNorm of x (N, ..., C) over each group of C // num_groups channels and all positions, then ``act``.

    ``act``: None or "silu". Computes in at least float32 and returns that dtype; plain autodiff.
    """
    x3, scale, bias = check_group_norm(x, scale, bias, num_groups, act)
    y = normalize_groups(x3, scale, bias, num_groups, float(eps))[0]
    return (jax.nn.silu(y) if act == "silu" else y).reshape(x.shape)


def silu(x, kernels: str = "auto"):
    """SiLU x sigmoid(x) (Elfwing et al. 2018) of the selected kernel set."""
    return _cpu().silu(x) if resolve_kernels(kernels) == "cpu" else jax.nn.silu(x)


def apply_keep_mask(x, keep, rate: float):
    """Inverted dropout (Srivastava et al. 2014) given the keep mask: x / (1 - rate) where kept, else 0."""
    return lax.select(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


def dropout(key, x, rate: float):
    """Inverted dropout of x with a keep mask ``jax.random.bernoulli(key, 1 - rate)`` (flax.linen.Dropout's)."""
    return apply_keep_mask(x, jax.random.bernoulli(key, 1.0 - rate, x.shape), rate)


def attention(q, k, v, num_heads: int):
    """softmax(q k^T / sqrt(d)) v per head over positions (Vaswani et al. 2017 eq. 1); q, k, v (B, T, C) -> (B, T, C).

    Head h owns channels [h d, (h + 1) d), d = C / num_heads; ``jax.nn.dot_product_attention`` on
    (B, T, heads, d) (logits and softmax in at least float32).
    """
    b, t, c = q.shape
    split = lambda a: a.reshape(b, t, num_heads, c // num_heads)  # noqa: E731
    return jax.nn.dot_product_attention(split(q), split(k), split(v)).reshape(b, t, c)


def qkv_attention(h, kernel, bias, num_heads: int):
    """Self-attention of h (B, T, C) with q, k, v from one fused projection h kernel + bias, kernel (C, 3 C)."""
    q, k, v = jnp.split(h @ kernel + bias, 3, axis=-1)
    return attention(q, k, v, num_heads)


def split_qkv(h, kernel, bias):
    """q, k, v = h kernel[:, i] + bias[i], i = 0, 1, 2, of the "split" layout: kernel (C, 3, C), bias (3, C).

    One contraction, so its backward sums the three input gradients before any collective.
    """
    qkv = jnp.einsum("btc,cjf->btjf", h, kernel) + bias
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


# ---- modules ----------------------------------------------------------------------------------

class Conv(nn.Module):
    """``flax.linen.Conv(features, (k, k), strides, padding="SAME")``: same parameters, same forward.

    On "cpu" with ``train=True`` a stride-1 convolution takes ``cpu_kernels.conv2d_same``.
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    kernel_init: Callable = nn.linear.default_kernel_init
    bias_init: Callable = nn.initializers.zeros
    kernels: str = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim != 4:
            raise ValueError(f"Conv expects NHWC input of rank 4; got shape {x.shape}")
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        dtype = compute_dtype(self.dtype)
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        if train and self.strides == 1 and resolve_kernels(self.kernels) == "cpu":
            y = _cpu().conv2d_same(x, kernel)
        else:
            y = conv2d(x, kernel, self.strides)
        return y + bias.astype(dtype)


class GroupNorm(nn.Module):
    """``flax.linen.GroupNorm``'s parameters (scale, bias: (C,)) and numbers, optionally followed by SiLU.

    Statistics and normalisation in float32; the output in the compute dtype. On "cpu" with
    ``train=True``, maps of at least ``cpu_kernels.FUSED_MIN_POSITIONS`` positions take the
    hand-written backward.
    """

    num_groups: int
    epsilon: float = 1e-6
    act: Optional[str] = None
    kernels: str = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        if resolve_kernels(self.kernels) == "cpu":
            cpu = _cpu()
            fused = train and math.prod(x.shape[1:-1]) >= cpu.FUSED_MIN_POSITIONS
            y = cpu.group_norm(x, scale, bias, self.num_groups, self.epsilon, self.act, fused_backward=fused)
        else:
            y = group_norm(x, scale, bias, self.num_groups, self.epsilon, self.act)
        return y.astype(compute_dtype(self.dtype))


class Dropout(nn.Module):
    """Inverted dropout (Srivastava et al. 2014) with the 'dropout' rng: ``flax.linen.Dropout(rate)``'s masks.

    On "cpu" a threefry key draws its mask with ``cpu_kernels.dropout`` (bit for bit the same mask).
    """

    rate: float
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"dropout rate must lie in [0, 1); got {self.rate}")
        if deterministic or self.rate == 0.0:
            return x
        key = self.make_rng("dropout")
        if resolve_kernels(self.kernels) == "cpu":
            return _cpu().dropout(key, x, self.rate)
        return dropout(key, x, self.rate)


class QKVAttention(nn.Module):
    """Multi-head self-attention of h (B, T, C); the output projection is the caller's.

    ``layout`` "fused": q, k, v from ``nn.Dense(3 C)``'s kernel (C, 3 C) and bias (3 C), [q|k|v]
    along the features; name it "qkv" to get the parameter tree of a fused ``nn.Dense(3 C, name="qkv")``.
    "split": kernel (C, 3, C) and bias (3, C), q, k, v along axis 1 (each head-major, as the fused
    thirds); splitting the last axis over a mesh axis gives each shard whole heads of q, k and v
    (``diffjax.sharding``). Same initial values (the fused kernel's, reshaped) and the same numbers.
    """

    num_heads: int
    kernel_init: Callable = nn.linear.default_kernel_init
    kernels: str = "auto"
    dtype: Any = None
    layout: str = "fused"

    @nn.compact
    def __call__(self, h):
        c = h.shape[-1]
        if h.ndim != 3 or c % self.num_heads:
            raise ValueError(f"QKVAttention expects h of shape (B, T, C) with C divisible by "
                             f"num_heads={self.num_heads}; got {h.shape}")
        if self.layout not in QKV_LAYOUTS:
            raise ValueError(f"QKVAttention layout must be one of {QKV_LAYOUTS}; got {self.layout!r}")
        dtype = compute_dtype(self.dtype)
        cpu = resolve_kernels(self.kernels) == "cpu"
        if self.layout == "fused":
            kernel = self.param("kernel", self.kernel_init, (c, 3 * c), jnp.float32)
            bias = self.param("bias", nn.initializers.zeros, (3 * c,), jnp.float32)
            args = (h.astype(dtype), kernel.astype(dtype), bias.astype(dtype), self.num_heads)
            return _cpu().qkv_attention(*args) if cpu else qkv_attention(*args)
        init = lambda key, shape, dt: self.kernel_init(key, (c, 3 * c), dt).reshape(shape)  # noqa: E731
        kernel = self.param("kernel", init, (c, 3, c), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (3, c), jnp.float32)
        q, k, v = split_qkv(h.astype(dtype), kernel.astype(dtype), bias.astype(dtype))
        return _cpu().spatial_attention(q, k, v, self.num_heads) if cpu else attention(q, k, v, self.num_heads)
