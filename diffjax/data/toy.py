"""Continuous 2-D / low-dimensional toy distributions, sampled in-process from a JAX key.

Every sampler is ``sample(key, n) -> (x float (n, *shape), labels int32 (n,))``:

- ``ring``: ``diffjax.testing.gmm.ring_mixture()`` (8 equal modes on a circle of radius 2, std
  0.15); labels are the mode, 8 classes.
- ``gmm``: ``random_mixture(jax.random.PRNGKey(0), dim=8, num_components=4)`` (spread 1.5,
  per-dim std in [0.2, 0.6), uneven weights); labels are the component, 4 classes. Both mixtures
  have closed-form densities and scores (the oracle of ``diffjax.testing.gmm``).
- ``two_moons``: scikit-learn's ``make_moons`` geometry with noise std 0.1, centred by
  subtracting (0.5, 0.25); labels are the moon, 2 classes.
- ``checkerboard``: the FFJORD checkerboard (Grathwohl et al. 2019), uniform on the 8 dark
  squares of a 4x4 board covering [-4, 4]^2; no classes, labels are zeros.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.data.spec import DatasetSpec
from diffjax.testing.gmm import random_mixture, ring_mixture

TOY_EVAL_SIZE = 10_000  # examples in a toy data set's fixed evaluation split
TOY_BLOCK = 1024  # samples are drawn in blocks of this size: one compilation per data set

TOY_SPECS = {
    "ring": DatasetSpec((2,), 8, None, "toy"),
    "gmm": DatasetSpec((8,), 4, None, "toy"),
    "two_moons": DatasetSpec((2,), 2, None, "toy"),
    "checkerboard": DatasetSpec((2,), None, None, "toy"),
}


@functools.cache
def ring():
    """The ``ring`` data set's mixture: ``ring_mixture()`` with its defaults."""
    return ring_mixture()


@functools.cache
def gmm():
    """The ``gmm`` data set's mixture: ``random_mixture(PRNGKey(0), dim=8, num_components=4)``."""
    # under jit: one compilation instead of one per op
    return jax.jit(random_mixture, static_argnames=("dim", "num_components"))(
        jax.random.PRNGKey(0), dim=8, num_components=4)


def _sample_two_moons(key, n):
    """Two interleaved half circles + N(0, 0.1^2) noise (sklearn ``make_moons`` geometry), centred."""
    k_moon, k_angle, k_noise = jax.random.split(key, 3)
    labels = jax.random.bernoulli(k_moon, 0.5, (n,)).astype(jnp.int32)
    angle = jax.random.uniform(k_angle, (n,), maxval=jnp.pi)
    upper = jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=-1)
    lower = jnp.stack([1.0 - jnp.cos(angle), 0.5 - jnp.sin(angle)], axis=-1)
    x = jnp.where(labels[:, None] == 0, upper, lower) - jnp.array([0.5, 0.25])
    return x + 0.1 * jax.random.normal(k_noise, (n, 2)), labels


def _sample_checkerboard(key, n):
    """FFJORD checkerboard: x1 ~ U[-2, 2), x2 on the squares of parity floor(x1), scaled by 2."""
    k1, k2, k3 = jax.random.split(key, 3)
    x1 = jax.random.uniform(k1, (n,), minval=-2.0, maxval=2.0)
    x2 = jax.random.uniform(k2, (n,)) - 2.0 * jax.random.bernoulli(k3, 0.5, (n,))
    x2 = x2 + jnp.mod(jnp.floor(x1), 2.0)
    return 2.0 * jnp.stack([x1, x2], axis=-1), jnp.zeros((n,), jnp.int32)


_MIXTURES = {"ring": ring, "gmm": gmm}
_SAMPLERS = {"two_moons": _sample_two_moons, "checkerboard": _sample_checkerboard}


def sample_toy(name: str, key, n: int):
    """n exact samples of toy data set ``name``: NumPy (x float32 (n, *shape), labels int32 (n,)).

    Drawn in blocks of ``TOY_BLOCK`` from ``fold_in(key, block)``, so any n compiles once per
    data set and a smaller n gives a prefix of a larger one.
    """
    mixture = _MIXTURES[name]() if name in _MIXTURES else None  # built outside the trace
    blocks = [_sample_block(name, mixture, jax.random.fold_in(key, b)) for b in range(-(-n // TOY_BLOCK))]
    x, labels = (np.concatenate([np.asarray(p) for p in parts])[:n] for parts in zip(*blocks))
    return x.astype(np.float32), labels


@functools.partial(jax.jit, static_argnames="name")
def _sample_block(name, mixture, key):
    if mixture is not None:
        x, labels = mixture.sample(key, TOY_BLOCK)
        return x, labels.astype(jnp.int32)
    return _SAMPLERS[name](key, TOY_BLOCK)


def eval_key(name: str, split: str):
    """The fixed key of a toy evaluation split, from crc32 of "name/split" (not a training key)."""
    return jax.random.PRNGKey(zlib.crc32(f"{name}/{split}".encode()))
