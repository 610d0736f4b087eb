"""A closed-form oracle: a diagonal Gaussian mixture pushed through any schedule.

If x_0 ~ sum_k w_k N(mu_k, diag(s_k^2)) and x_t = alpha x_0 + sigma eps, then exactly

    p_t(x) = sum_k w_k N(x; alpha mu_k, diag(alpha^2 s_k^2 + sigma^2)),

so the noised density, its score, the posterior means E[x_0 | x_t] and E[eps | x_t] and exact data
samples are all available in closed form (log-sum-exp stable) at every t, for every schedule.
Class-conditional versions use component k as class k. This is the ground truth that tests and
benchmarks compare samplers, likelihoods and losses against.
"""

from __future__ import annotations

import math
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.parameterization import Denoised, check_prediction, from_x0_eps
from diffjax.schedules import Schedule, _is_concrete

__all__ = ["GaussianMixture", "ring_mixture", "random_mixture"]

_LOG_2PI = math.log(2.0 * math.pi)


class GaussianMixture(eqx.Module):
    """sum_k weights[k] N(means[k], diag(variances[k])) in D dimensions."""

    weights: jax.Array  # (K,)
    means: jax.Array  # (K, D)
    variances: jax.Array  # (K, D)

    def __init__(self, weights, means, variances):
        dtype = jnp.result_type(float)
        weights, means, variances = (jnp.asarray(a, dtype) for a in (weights, means, variances))
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, D); got {means.shape}")
        k, d = means.shape
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape ({k},); got {weights.shape}")
        if variances.ndim == 1 and variances.shape == (k,):
            variances = jnp.broadcast_to(variances[:, None], (k, d))
        if variances.shape != (k, d):
            raise ValueError(f"variances must have shape ({k}, {d}) or ({k},); got {variances.shape}")
        if _is_concrete(weights) and _is_concrete(variances):
            if not np.all(np.asarray(weights) > 0):
                raise ValueError("weights must be positive")
            if not np.all(np.asarray(variances) > 0):
                raise ValueError("variances must be positive")
        self.weights = weights / jnp.sum(weights)
        self.means = means
        self.variances = variances

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    # ---- exact data ---------------------------------------------------------------------------
    def sample(self, key, n: int, labels: Optional[jax.Array] = None):
        """Exact samples x_0 ~ p_data (or ~ component ``labels``); returns (x, labels)."""
        k_cat, k_noise = jax.random.split(key)
        if labels is None:
            labels = jax.random.categorical(k_cat, jnp.log(self.weights), shape=(n,))
        z = jax.random.normal(k_noise, (n, self.dim), self.means.dtype)
        x = self.means[labels] + jnp.sqrt(self.variances[labels]) * z
        return x, labels

    def sample_t(self, key, n: int, schedule: Schedule, t, labels=None):
        """Exact samples of x_t ~ p_t (or of its class-conditional)."""
        k0, k1 = jax.random.split(key)
        x0, labels = self.sample(k0, n, labels)
        noise = jax.random.normal(k1, x0.shape, x0.dtype)
        return schedule.marginal(x0, t, noise), labels

    # ---- the noised mixture ---------------------------------------------------------------
    def _stats(self, x, t, schedule: Schedule, cond):
        """Per-component means/variances of p_t at each example and log posterior weights."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (batch, {self.dim}); got {x.shape}")
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))[:, None, None]
        alpha = schedule.alpha(t)  # (B, 1, 1)
        sigma2 = schedule.sigma2(t)
        mean = alpha * self.means[None]  # (B, K, D)
        var = alpha**2 * self.variances[None] + sigma2
        diff = x[:, None, :] - mean
        log_comp = -0.5 * jnp.sum(diff**2 / var + jnp.log(var) + _LOG_2PI, axis=-1)  # (B, K)
        log_w = jnp.log(self.weights)[None, :]
        if cond is not None:
            onehot = jax.nn.one_hot(jnp.asarray(cond), self.num_components, dtype=bool)
            log_w = jnp.where(onehot, 0.0, -jnp.inf)
        log_joint = log_comp + log_w
        return alpha, diff, var, log_joint

    def log_prob(self, x, cond=None):
        """log p_data(x) (or log of component ``cond``), shape (batch,)."""
        return self._log_prob_stats(x, 0.0, _IDENTITY, cond)

    def _log_prob_stats(self, x, t, schedule, cond):
        _, _, _, log_joint = self._stats(x, t, schedule, cond)
        return jax.nn.logsumexp(log_joint, axis=-1)

    def log_prob_t(self, x, schedule: Schedule, t, cond=None):
        """Exact log p_t(x) of the noised mixture at time t, shape (batch,)."""
        return self._log_prob_stats(x, t, schedule, cond)

    def score(self, x, schedule: Schedule, t, cond=None):
        """Exact score grad_x log p_t(x) = sum_k r_k(x) (alpha mu_k - x) / v_k."""
        _, diff, var, log_joint = self._stats(x, t, schedule, cond)
        resp = jax.nn.softmax(log_joint, axis=-1)[..., None]
        return -jnp.sum(resp * diff / var, axis=1)

    def denoise(self, x, schedule: Schedule, t, cond=None) -> Denoised:
        """Exact (E[x_0 | x_t], E[eps | x_t]) (Tweedie; per-component Gaussian posterior means)."""
        alpha, diff, var, log_joint = self._stats(x, t, schedule, cond)
        resp = jax.nn.softmax(log_joint, axis=-1)[..., None]
        # E[x0 | x_t, k] = mu_k + alpha s_k^2 / v_k (x - alpha mu_k)
        x0 = jnp.sum(resp * (self.means[None] + alpha * self.variances[None] / var * diff), axis=1)
        tb = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))[:, None]
        sigma = schedule.sigma(tb)
        # E[eps | x_t] = -sigma score
        eps = sigma * jnp.sum(resp * diff / var, axis=1)
        return Denoised(x0, eps)

    def model_fn(self, schedule: Schedule, prediction: str = "eps"):
        """The Bayes-optimal network: ``model_fn(x, t, cond=None)`` predicting the given type."""
        check_prediction(prediction)

        def model_fn(x, t, cond=None):
            if prediction == "score":
                return self.score(x, schedule, t, cond)
            return from_x0_eps(self.denoise(x, schedule, t, cond), prediction, x, t, schedule)

        return model_fn


class _Identity(Schedule):
    """alpha = 1, sigma = 0: evaluates the mixture at the data (used by ``log_prob``)."""

    def _log_alpha(self, t):
        return jnp.zeros_like(t)

    def _sigma2(self, t):
        return jnp.zeros_like(t)

    def _t_from_log_snr(self, lam):
        return jnp.zeros_like(lam)


_IDENTITY = _Identity()


def ring_mixture(num_modes: int = 8, radius: float = 2.0, std: float = 0.15) -> GaussianMixture:
    """A 2-D multimodal oracle: equal-weight modes on a circle (the standard '8 Gaussians')."""
    angles = 2 * np.pi * np.arange(num_modes) / num_modes
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    return GaussianMixture(np.ones(num_modes), means, np.full((num_modes, 2), std**2))


def random_mixture(key, dim: int, num_components: int = 4, spread: float = 1.5,
                   std_range=(0.2, 0.6)) -> GaussianMixture:
    """A random diagonal mixture in ``dim`` dimensions with uneven weights."""
    k1, k2, k3 = jax.random.split(key, 3)
    means = spread * jax.random.normal(k1, (num_components, dim))
    stds = jax.random.uniform(k2, (num_components, dim), minval=std_range[0], maxval=std_range[1])
    weights = jax.random.uniform(k3, (num_components,), minval=0.5, maxval=1.5)
    return GaussianMixture(weights, means, stds**2)
