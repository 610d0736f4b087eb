"""Distribution distances used by tests and benchmarks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["sliced_wasserstein"]


def sliced_wasserstein(x, y, key, num_projections: int = 256):
    """Sliced 1-Wasserstein distance between two equal-size samples (Rabin et al. 2011).

    Mean over random unit directions of the 1-D W1 distance of the projections (sorted match).
    Two independent samples of the same law give a positive floor of order 1/sqrt(n):
    compare against it, never against zero.
    """
    x = x.reshape(x.shape[0], -1)
    y = y.reshape(y.shape[0], -1)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape; got {x.shape} and {y.shape}")
    d = jax.random.normal(key, (num_projections, x.shape[1]), x.dtype)
    d = d / jnp.linalg.norm(d, axis=1, keepdims=True)
    px = jnp.sort(x @ d.T, axis=0)
    py = jnp.sort(y @ d.T, axis=0)
    return jnp.mean(jnp.abs(px - py))
