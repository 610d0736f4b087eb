"""EDM's deterministic Heun sampler and its stochastic form (Karras et al. 2022 Alg. 1 and 2) as a diffrax solver.

The samplers run in the VE view of any schedule: y = x / alpha and s = sigma / alpha = exp(-lambda), where the
PF-ODE is dy/ds = (y - D(y; s)) / s (EDM eq. 3 with s(t) = t) and (y - D) / s is the model's eps prediction.
The diffrax "time" is lambda = -log s (increasing as s decreases, as for ``DPMSolver``), so the term is
``denoiser_term``; the state stays x = alpha y.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

from diffjax.consistency import scaled_sigma, time_of_sigma
from diffjax.samplers.ancestral import nfe_stats
from diffjax.samplers.dpm_solver import _LambdaSolver, denoiser_term
from diffjax.schedules import Schedule

__all__ = ["EDMSolver", "edm_sampler", "churn_gamma", "check_churn"]


def churn_gamma(s, num_intervals: int, S_churn, S_tmin, S_tmax):
    """gamma_i = min(S_churn / N, sqrt(2) - 1) where S_tmin <= s_i <= S_tmax, else 0 (EDM Alg. 2 line 4)."""
    gamma = min(S_churn / num_intervals, math.sqrt(2.0) - 1.0)
    return jnp.where((s >= S_tmin) & (s <= S_tmax), gamma, 0.0)


def check_churn(options) -> None:
    """ValueError naming a bad S_churn / S_tmin / S_tmax / S_noise."""
    for name in ("S_churn", "S_noise", "S_tmin"):
        if name in options and not options[name] >= 0:
            raise ValueError(f"{name} must be >= 0; got {options[name]}")
    if not options.get("S_tmin", 0.0) <= options.get("S_tmax", math.inf):
        raise ValueError(f"S_tmin must be <= S_tmax; got {options.get('S_tmin')} > {options.get('S_tmax')}")


class EDMSolver(_LambdaSolver):
    """One step of EDM Alg. 2 (Alg. 1 when ``key`` is None) from lambda_s to lambda_t, ``heun`` or Euler.

    Churn: s_hat = s_i (1 + gamma_i), y_hat = y + sqrt(s_hat^2 - s_i^2) S_noise eps_i with eps_i drawn from
    ``fold_in(key, i)`` for step i (the step count is the solver state); s_hat is capped at s_top, the
    schedule's s(t = 1), where the model is not defined beyond. Then Euler from s_hat to s_t and, if
    ``heun``, the trapezoidal correction (Alg. 2 lines 5-11). The step to s = 0 is taken by ``edm_sampler``.
    """

    heun: bool = eqx.field(static=True, default=True)
    key: Optional[jax.Array] = None
    num_intervals: int = eqx.field(static=True, default=1)
    S_churn: float = 0.0
    S_tmin: float = 0.0
    S_tmax: float = math.inf
    S_noise: float = 1.0
    s_top: float = math.inf

    def order(self, terms):
        return 2 if self.heun else 1

    def init(self, terms, t0, t1, y0, args):
        return jnp.array(0)

    def _alpha(self, lam):
        return self.schedule.alpha(self.schedule.t_from_log_snr(lam))

    def churn(self, x, lam_s, i):
        """(y_hat, s_hat): the state in the VE view after EDM's noise increase at s = exp(-lambda_s), step i."""
        s = jnp.exp(-lam_s)
        y = x / self._alpha(lam_s)
        if self.key is None:
            return y, s
        gamma = churn_gamma(s, self.num_intervals, self.S_churn, self.S_tmin, self.S_tmax)
        gamma = jnp.clip(jnp.minimum(gamma, self.s_top / s - 1.0), 0.0)  # s_hat <= s_top
        eps = jax.random.normal(jax.random.fold_in(self.key, i), x.shape, x.dtype)
        # y_hat = y + sqrt(s_hat^2 - s^2) S_noise eps with s_hat = (1 + gamma) s   (EDM Alg. 2 lines 5-6)
        return y + s * jnp.sqrt(gamma * (2.0 + gamma)) * self.S_noise * eps, s * (1.0 + gamma)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        i = solver_state
        y_hat, s_hat = self.churn(y0, t0, i)
        lam_hat = -jnp.log(s_hat)
        s_t = jnp.exp(-t1)
        # d = (y - D(y; s)) / s is the eps prediction (EDM Alg. 1 line 4)
        d = terms.vf(lam_hat, self._alpha(lam_hat) * y_hat, args).eps
        y_t = y_hat + (s_t - s_hat) * d
        if self.heun:
            d2 = terms.vf(t1, self._alpha(t1) * y_t, args).eps
            y_t = y_hat + (s_t - s_hat) * 0.5 * (d + d2)  # EDM Alg. 1 line 8
        return self._done(y0, self._alpha(t1) * y_t, i + 1)


def edm_sampler(denoiser: Callable, schedule: Schedule, x_T, ts, key=None, cond=None, *, heun: bool = True,
                S_churn: float = 0.0, S_tmin: float = 0.0, S_tmax: float = math.inf, S_noise: float = 1.0,
                to_zero: bool = False, save_steps: bool = False):
    """EDM Alg. 1 (``key`` None or S_churn = 0) / Alg. 2 on the grid ``ts``, Heun (or Euler) in s = sigma / alpha.

    ``to_zero``: ts[-1] is sigma = 0 and the last interval is Euler to s = 0, x = D(y_hat; s_hat) (Alg. 1 line 7),
    one evaluation. gamma uses N = ts.shape[0] - 1 intervals. Returns (x, stats); ``save_steps`` adds
    stats["states"], the state at every grid time ts[1:] (x_0 included when ``to_zero``).
    """
    check_churn(dict(S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise))
    stochastic = key is not None and S_churn > 0
    n = ts.shape[0] - 1
    solve_ts = ts[:-1] if to_zero else ts
    lams = schedule.log_snr(solve_ts)
    s_top = scaled_sigma(schedule, jnp.ones((), lams.dtype))
    solver = EDMSolver(schedule, heun, key if stochastic else None, n, S_churn, S_tmin, S_tmax, S_noise, s_top)
    x, states, steps = x_T, [], 0
    if solve_ts.shape[0] >= 2:
        saveat = diffrax.SaveAt(steps=True) if save_steps else diffrax.SaveAt(t1=True)
        sol = diffrax.diffeqsolve(denoiser_term(denoiser, schedule), solver, t0=lams[0], t1=lams[-1], dt0=None,
                                  y0=x_T, args=cond, stepsize_controller=diffrax.StepTo(lams),
                                  saveat=saveat, max_steps=solve_ts.shape[0] - 1)
        x, steps = sol.ys[-1], solve_ts.shape[0] - 1
        states = [sol.ys] if save_steps else []
    stats = nfe_stats(steps, 2 if heun else 1)
    if to_zero:
        # Euler to s = 0 from s_hat: y = y_hat - s_hat d = D(y_hat; s_hat), and x = alpha(0) y
        y_hat, s_hat = solver.churn(x, schedule.log_snr(solve_ts[-1]), steps)
        x = schedule.alpha(ts[-1]) * denoiser(schedule.alpha(time_of_sigma(schedule, s_hat)) * y_hat,
                                              time_of_sigma(schedule, s_hat), cond).x0
        stats["nfe"] = stats["nfe"] + 1
        states.append(x[None])
    if save_steps:
        stats["states"] = jnp.concatenate(states) if states else jnp.zeros((0,) + x.shape, x.dtype)
    return x, stats
