"""DDPM ancestral sampling and DDIM (with eta), DDIM inversion and slerp.

Each sampler walks a decreasing time grid t_0 > t_1 > ... > t_S with ``lax.scan`` (one compiled
loop). On a respaced sub-sequence the posterior q(x_s | x_t, x_0) is re-derived for each pair
(s, t) from the schedule (``Schedule.posterior``; Nichol & Dhariwal 2021 sec. 4 "Speed up
Diffusion Models"), so the full chain is simply the grid of every step.
"""

from __future__ import annotations

from typing import Callable

import numbers

import jax
import jax.numpy as jnp

from diffjax.parameterization import Denoised
from diffjax.schedules import Schedule
from diffjax.timesteps import check_grid

__all__ = ["ddim_step", "ddpm", "ddim", "ddim_invert", "slerp", "scan_grid", "nfe_stats"]


def ddim_step(schedule: Schedule, denoised: Denoised, s, t, noise=None, eta=0.0, noise_var=None):
    """Generalized DDIM step x_t -> x_s (Song et al. 2021 eq. 12, sigma_t(eta) of eq. 16).

    x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + sqrt(v) z with c^2 = eta^2 beta_tilde(s, t)
    and v = c^2 unless ``noise_var`` is given. The one first-order update of the library:
    eta = 0 is DDIM = DPM-Solver-1 = the exponential-integrator step of the PF-ODE (Lu et al.
    2022 eq. 3.7); eta = 1 is the DDPM ancestral step (Ho et al. 2020 Alg. 2, the posterior
    q(x_s | x_t, x0_hat) of eq. 6-7); eta = 1 with ``noise_var`` = beta(s, t) is DDPM's "large"
    variance (sec. 3.2). ``noise`` may be None when the step adds none.
    """
    deterministic = noise_var is None and _is_zero(eta)
    c2 = 0.0 if deterministic else eta**2 * schedule.posterior(s, t)[2]
    alpha_s, sigma2_s = schedule.alpha(s), schedule.sigma2(s)
    direction = jnp.sqrt(jnp.maximum(sigma2_s - c2, 0.0))
    x_s = alpha_s * denoised.x0 + direction * denoised.eps
    if deterministic:
        return x_s
    return x_s + jnp.sqrt(c2 if noise_var is None else noise_var) * noise


def _is_zero(eta) -> bool:
    return isinstance(eta, numbers.Number) and eta == 0


def scan_grid(step, x_T, ts, key, evals_per_step: int):
    """Run ``step(x, t, s, key) -> x`` over the intervals (t, s) of the grid ``ts`` with ``lax.scan``.

    Returns (x, stats) with stats["nfe"] = intervals x ``evals_per_step``.
    """
    n = ts.shape[0] - 1
    keys = jax.random.split(key, n) if key is not None else jnp.zeros((n, 2), jnp.uint32)

    def body(x, inp):
        t, s, k = inp
        return step(x, t, s, k), None

    x, _ = jax.lax.scan(body, x_T, (ts[:-1], ts[1:], keys))
    return x, nfe_stats(n, evals_per_step)


def nfe_stats(num_steps, evals_per_step, at_init=0):
    """The stats of a sampler: model evaluations = at_init + num_steps x evals_per_step."""
    return {"nfe": jnp.asarray(at_init + evals_per_step * num_steps)}


def ddim(denoiser: Callable, schedule: Schedule, x_T, ts, key=None, cond=None, eta=0.0):
    """DDIM sampling along the decreasing grid ``ts`` (Song et al. 2021 eq. 12); returns (x, stats)."""
    stochastic = not _is_zero(eta)
    if stochastic and key is None:
        raise ValueError("ddim with eta != 0 needs a PRNG key")

    def step(x, t, s, k):
        noise = jax.random.normal(k, x.shape, x.dtype) if stochastic else None
        return ddim_step(schedule, denoiser(x, t, cond), s, t, noise, eta)

    return scan_grid(step, x_T, ts, key if stochastic else None, 1)


def ddpm(denoiser: Callable, schedule: Schedule, x_T, ts, key, cond=None, variance: str = "posterior"):
    """DDPM ancestral sampling along the decreasing grid ``ts`` (Ho et al. 2020 Alg. 2): the DDIM
    step with eta = 1, and with ``variance="large"`` the forward variance beta (zero on the step to
    t = 0); returns (x, stats)."""
    if variance not in ("posterior", "large"):
        raise ValueError(f"variance must be 'posterior' or 'large'; got {variance!r}")
    if key is None:
        raise ValueError("ddpm is stochastic and needs a PRNG key")

    def step(x, t, s, k):
        noise = jax.random.normal(k, x.shape, x.dtype)
        noise_var = jnp.where(s > 0, schedule.transition(s, t)[1], 0.0) if variance == "large" else None
        return ddim_step(schedule, denoiser(x, t, cond), s, t, noise, 1.0, noise_var)

    return scan_grid(step, x_T, ts, key, 1)


def ddim_invert(denoiser: Callable, schedule: Schedule, x0, ts, cond=None,
                fixed_point_iters: int = 0):
    """DDIM inversion x_{t_0} -> x_{t_S} along an increasing grid (Song et al. 2021 sec. 4.3, eq. 14).

    Each step applies the deterministic DDIM map with the model evaluated at the current, lower
    time: x_t = alpha_t x0_hat(x_s, s) + sigma_t eps_hat(x_s, s). That is first-order accurate, so
    inverting then sampling returns x_0 only up to O(step). With ``fixed_point_iters = k > 0``
    each step is refined by k fixed-point iterations on the exact inverse of the DDIM step,
    x_t = (alpha_t / alpha_s) [x_s - (sigma_s - alpha_s sigma_t / alpha_t) eps_hat(x_t, t)]
    (Pan et al. 2023, "AIDI"; Hong et al. 2024, exact inversion), so that DDIM sampling on the
    same grid reproduces x_0 up to the fixed-point residual (k extra evaluations per step).
    """

    check_grid(ts, increasing=True)

    def step(x_s, s, t, k):
        x_t = ddim_step(schedule, denoiser(x_s, s, cond), t, s)
        a_s, a_t = schedule.alpha(s), schedule.alpha(t)
        c_eps = schedule.sigma(s) - a_s * schedule.sigma(t) / a_t

        def refine(x_t, _):
            return (a_t / a_s) * (x_s - c_eps * denoiser(x_t, t, cond).eps), None

        x_t, _ = jax.lax.scan(refine, x_t, None, length=fixed_point_iters)
        return x_t

    return scan_grid(step, x0, ts, None, 1 + fixed_point_iters)


def slerp(z0, z1, w):
    """Spherical interpolation of latents (Shoemake 1985; DDIM sec. 5.3), per example."""
    if z0.shape != z1.shape or z0.ndim < 2:
        raise ValueError(f"z0 and z1 must share a shape (batch, ...); got {z0.shape} and {z1.shape}")
    flat0 = z0.reshape(z0.shape[0], -1)
    flat1 = z1.reshape(z1.shape[0], -1)
    cos = jnp.sum(flat0 * flat1, -1) / (
        jnp.linalg.norm(flat0, axis=-1) * jnp.linalg.norm(flat1, axis=-1)
    )
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    theta = theta.reshape((-1,) + (1,) * (z0.ndim - 1))
    w = jnp.asarray(w, z0.dtype)
    sin = jnp.sin(theta)
    # theta -> 0: fall back to linear interpolation
    safe = sin > 1e-6
    a = jnp.where(safe, jnp.sin((1 - w) * theta) / jnp.where(safe, sin, 1.0), 1 - w)
    b = jnp.where(safe, jnp.sin(w * theta) / jnp.where(safe, sin, 1.0), w)
    return a * z0 + b * z1
