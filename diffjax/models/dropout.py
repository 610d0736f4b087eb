"""Dropout whose mask is drawn by Threefry-2x32 written out round by round: bit for bit Flax's ``nn.Dropout``.

JAX lowers its ``threefry2x32`` primitive on CPU as a rolled ``while`` loop (five iterations of
four rounds) to keep compile times down; XLA:CPU runs it as a loop of small kernels with
loop-carried copies, and in the digits U-Net's forward + backward those loops were 16 ``while``
thunks with ~1200 ``copy`` thunks per step (BENCHMARKS.md, "Where the step's time goes"). Here
the same 20 rounds are plain elementwise ops, which XLA fuses into one kernel per mask.

``threefry_bits(key, shape)`` equals ``jax.random.bits(key, shape)`` (uint32) under JAX's default
``jax_threefry_partitionable=True``: the counter of element i is its row-major index i, hashed with
the key (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3", Threefry-2x32-20),
and the two output words are XORed. So ``Dropout`` keeps exactly the units ``nn.Dropout`` keeps
for the same rng (tests check both), and it partitions like any elementwise op: a sharded batch
draws the same mask as an unsharded one.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["Dropout", "threefry_bits"]

# Threefry-2x32 rotation constants (Salmon et al. 2011), alternating by groups of four rounds
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
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


def threefry_bits(key, shape) -> jax.Array:
    """uint32 random bits of ``shape`` from a threefry key (raw uint32[2] or typed): ``jax.random.bits``'s values."""
    shape = tuple(int(d) for d in shape)
    if math.prod(shape) >= 2**32:
        raise ValueError(f"threefry_bits draws fewer than 2**32 values; shape {shape} has {math.prod(shape)}")
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(key)) != "threefry2x32":
            raise ValueError(f"threefry_bits needs a threefry2x32 key; got a {jax.random.key_impl(key)} key")
        key = jax.random.key_data(key)
    if key.dtype != jnp.uint32 or key.shape != (2,):
        raise ValueError(f"key must be a uint32[2] threefry key; got {key.dtype}{list(key.shape)}")
    if not shape:
        shape_out, shape = (), (1,)
    else:
        shape_out = shape
    # the 64-bit counter is (high word, low word) = (0, index) below 2**32 elements
    hi, lo = _threefry2x32(key[0], key[1], jnp.zeros(shape, jnp.uint32), _flat_index(shape))
    return (hi ^ lo).reshape(shape_out)


class Dropout(nn.Module):
    """Inverted dropout (Srivastava et al. 2014): keep each unit with probability 1 - rate, scale by 1 / (1 - rate).

    Same mask as ``flax.linen.Dropout(rate)`` for the same 'dropout' rng (a uint32 from
    ``threefry_bits`` -> a uniform in [0, 1) from its top 23 bits, kept where below 1 - rate, as
    ``jax.random.bernoulli``), without the rolled threefry loop.
    """

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"dropout rate must lie in [0, 1); got {self.rate}")
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        bits = threefry_bits(self.make_rng("dropout"), x.shape)
        # jax.random.uniform's float32 from bits: mantissa <- top 23 bits, exponent of 1.0, minus 1
        u = lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32) - 1.0
        mask = u < jnp.float32(keep)
        return lax.select(mask, x / keep, jnp.zeros_like(x))
