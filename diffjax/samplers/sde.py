"""Reverse-SDE samplers: Euler–Maruyama on diffrax, and predictor–corrector (Langevin / NCSN ALD)."""

from __future__ import annotations

from typing import Callable

import diffrax
import jax
import jax.numpy as jnp

from diffjax.samplers.ancestral import nfe_stats, scan_grid
from diffjax.schedules import Schedule
from diffjax.sde import reverse_sde_drift, reverse_sde_terms

__all__ = ["euler_maruyama", "predictor_corrector", "langevin_step"]


def euler_maruyama(denoiser: Callable, schedule: Schedule, x_T, ts, key, cond=None):
    """Euler–Maruyama on the reverse SDE dx = [f x - g^2 score] dt + g dw_bar (Song et al. eq. 6).

    Runs ``diffrax.Euler`` backwards in time on the decreasing grid ``ts`` (``StepTo``). The
    Brownian path is a ``VirtualBrownianTree`` from ``key``: the same key gives the same path
    whatever the grid, so results converge as the grid is refined. Returns (x, stats).
    """
    if key is None:
        raise ValueError("euler_maruyama is stochastic and needs a PRNG key")
    t_hi, t_lo = ts[0], ts[-1]
    tol = (t_hi - t_lo) * 2.0**-20
    path = diffrax.VirtualBrownianTree(t_lo, t_hi, tol=tol, shape=x_T.shape, key=key)
    sol = diffrax.diffeqsolve(
        reverse_sde_terms(denoiser, schedule, path),
        diffrax.Euler(),
        t0=t_hi,
        t1=t_lo,
        dt0=None,
        y0=x_T,
        args=cond,
        stepsize_controller=diffrax.StepTo(ts),
        saveat=diffrax.SaveAt(t1=True),
        max_steps=ts.shape[0] - 1,
    )
    return sol.ys[0], nfe_stats(sol.stats["num_steps"], 1)


def langevin_step(score, x, noise, snr):
    """One Langevin corrector step with step size set by a target signal-to-noise ratio.

    score_sde ``LangevinCorrector``: eps = 2 (snr ||z|| / ||score||)^2,
    x <- x + eps score + sqrt(2 eps) z, with the norms averaged over the batch as score_sde does
    (one step size per noise level; per-example norms blow the step up where the score vanishes).
    """
    axes = tuple(range(1, x.ndim))
    g_norm = jnp.mean(jnp.sqrt(jnp.sum(score**2, axis=axes)))
    z_norm = jnp.mean(jnp.sqrt(jnp.sum(noise**2, axis=axes)))
    step = 2.0 * (snr * z_norm / jnp.maximum(g_norm, 1e-20)) ** 2
    return x + step * score + jnp.sqrt(2.0 * step) * noise


def predictor_corrector(denoiser: Callable, schedule: Schedule, x_T, ts, key, cond=None,
                        snr: float = 0.16, n_corrector: int = 1, predictor: str = "euler_maruyama",
                        corrector: str = "langevin", ald_step: float = 2e-5):
    """Predictor–corrector sampling (Song et al. 2021 Alg. 2-3; NCSN annealed Langevin).

    At each grid time t_i: ``n_corrector`` corrector steps at t_i, then (unless
    ``predictor="none"``) one reverse-SDE Euler–Maruyama step to t_{i+1}. Correctors:
    ``"langevin"`` (step from ``snr``) and ``"ald"`` (annealed Langevin dynamics, Song & Ermon
    2019 Alg. 1: step ald_step sigma_i^2 / sigma_min^2 with sigma_min the grid's last sigma).
    Returns (x, stats).
    """
    if predictor not in ("euler_maruyama", "none"):
        raise ValueError(f"predictor must be 'euler_maruyama' or 'none'; got {predictor!r}")
    if corrector not in ("langevin", "ald"):
        raise ValueError(f"corrector must be 'langevin' or 'ald'; got {corrector!r}")
    if key is None:
        raise ValueError("predictor_corrector is stochastic and needs a PRNG key")
    sigma2_last = schedule.sigma2(ts[-1])

    def score_at(x, t):
        return -denoiser(x, t, cond).eps / schedule.sigma(t)

    def correct(x, t, k):
        def body(x, kk):
            z = jax.random.normal(kk, x.shape, x.dtype)
            score = score_at(x, t)
            if corrector == "langevin":
                return langevin_step(score, x, z, snr), None
            step = ald_step * schedule.sigma2(t) / sigma2_last
            return x + 0.5 * step * score + jnp.sqrt(step) * z, None

        x, _ = jax.lax.scan(body, x, jax.random.split(k, n_corrector))
        return x

    def step(x, t, s, k):
        k_c, k_p = jax.random.split(k)
        x = correct(x, t, k_c)
        if predictor == "none":
            return x
        dt = s - t  # negative
        drift = reverse_sde_drift(schedule, denoiser(x, t, cond), x, t)
        z = jax.random.normal(k_p, x.shape, x.dtype)
        return x + drift * dt + jnp.sqrt(schedule.g2(t) * -dt) * z

    return scan_grid(step, x_T, ts, key, n_corrector + (predictor != "none"))
