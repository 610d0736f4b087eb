"""``diffjax.sample``: one call for every sampler, schedule and prediction type.

Underneath, each method is a pure low-level function of (denoiser, schedule, x_T, time grid) in
``diffjax.samplers``; this module only chooses the grid, validates input and jits the whole loop.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.parameterization import check_prediction, make_denoiser
from diffjax.samplers.ancestral import ddim, ddpm
from diffjax.samplers.dpm_solver import dpm_solver, extrapolate_x0
from diffjax.samplers.ode import ODE_SOLVERS, pf_ode
from diffjax.samplers.sde import euler_maruyama, predictor_corrector
from diffjax.schedules import DiscreteDDPM, Schedule
from diffjax.timesteps import GRIDS, SUBSEQUENCE_GRIDS, check_grid, discrete_subsequence, make_grid

__all__ = ["METHODS", "sample"]

# method -> (model evaluations per step, needs a PRNG key, default grid)
METHODS = {
    "ddpm": (1, True, "time_uniform"),
    "ddim": (1, False, "time_uniform"),
    "euler_maruyama": (1, True, "time_uniform"),
    "pc": (None, True, "time_uniform"),  # 1 + n_corrector
    "pf_ode": (None, False, "time_uniform"),  # adaptive: counted by diffrax
    "dpm_solver_1": (1, False, "logSNR"),
    "dpm_solver_2": (2, False, "logSNR"),
    "dpm_solver_3": (3, False, "logSNR"),
    "dpm_solver++_2m": (1, False, "logSNR"),
    "dpm_solver++_3m": (1, False, "logSNR"),
}

_OPTIONS = {
    "ddpm": {"variance"},
    "ddim": {"eta"},
    "euler_maruyama": set(),
    "pc": {"snr", "n_corrector", "predictor", "corrector", "ald_step"},
    "pf_ode": {"solver", "rtol", "atol", "max_steps", "adaptive"},
    "dpm_solver_1": set(),
    "dpm_solver_2": set(),
    "dpm_solver_3": set(),
    "dpm_solver++_2m": {"final_step"},
    "dpm_solver++_3m": {"final_step"},
}
FINAL_STEPS = ("denoise", "extrapolate")


def _is_adaptive(options):
    adaptive = options.get("adaptive")
    if adaptive is None:
        adaptive = options.get("solver", "tsit5") in ("tsit5", "dopri5")
    return adaptive


def _grid(schedule, method, num_steps, t_start, t_end, grid, options, clean_end):
    """The decreasing time grid of a call. ``clean_end``: t_end = 0 where sigma(0) = 0, so the
    last interval is the exact step to x_0 and the solve itself stops at ``schedule.t_min``."""
    if method == "pf_ode" and _is_adaptive(options):
        # adaptive: the solver picks its own steps between the ends (num_steps is unused)
        ends = [t_start, min(float(schedule.t_min), 0.5 * t_start), 0.0] if clean_end else [t_start, t_end]
        return jnp.asarray(ends, jnp.result_type(float))
    if grid is None:
        if method in ("ddpm", "ddim") and isinstance(schedule, DiscreteDDPM) and t_end == 0.0:
            grid = "ddim_trailing"
        else:
            grid = METHODS[method][2]
    if isinstance(grid, str) and grid.startswith("ddim_"):
        if not isinstance(schedule, DiscreteDDPM):
            raise ValueError(f"grid {grid!r} needs a DiscreteDDPM schedule")
        # the sub-sequence fixes its own first time (x_T is at ts[0], as in DDIM) and ends at t = 0
        return discrete_subsequence(schedule, num_steps, grid[len("ddim_"):])
    if isinstance(grid, str) and grid not in GRIDS:
        raise ValueError(
            f"grid must be one of {GRIDS + SUBSEQUENCE_GRIDS} or an array; "
            f"got {grid!r}"
        )
    if clean_end:
        # lay num_steps - 1 intervals down to t_min, then the exact step to t = 0
        t_min = float(schedule.t_min)
        if num_steps == 1 or not t_min < t_start:
            return jnp.asarray([t_start, 0.0], jnp.result_type(float))
        ts = make_grid(schedule, t_start, t_min, num_steps - 1, grid)
        return jnp.concatenate([ts, jnp.zeros((1,), ts.dtype)])
    return make_grid(schedule, t_start, t_end, num_steps, grid)


@eqx.filter_jit
def _sample_jit(model_fn, schedule, x_T, ts, key, cond, config):
    method, prediction, final_to_zero, denoise_final, options = config
    options = dict(options)
    denoise = make_denoiser(model_fn, schedule, prediction)
    solve_ts = ts[:-1] if final_to_zero else ts
    nfe = jnp.asarray(0)
    x = x_T
    if solve_ts.shape[0] >= 2:
        if method == "ddpm":
            x = ddpm(denoise, schedule, x, solve_ts, key, cond, **options)
        elif method == "ddim":
            eta = options.get("eta", 0.0)
            x = ddim(denoise, schedule, x, solve_ts, key if eta != 0.0 else None, cond, **options)
        elif method == "euler_maruyama":
            x = euler_maruyama(denoise, schedule, x, solve_ts, key, cond)
        elif method == "pc":
            x = predictor_corrector(denoise, schedule, x, solve_ts, key, cond, **options)
        elif method == "pf_ode":
            x, nfe = pf_ode(denoise, schedule, x, solve_ts, cond, **options)
        elif method.startswith("dpm_solver++_"):
            x, history = dpm_solver(denoise, schedule, x, solve_ts, cond, order=int(method[-2]),
                                    multistep=True, return_history=True)
        else:
            x = dpm_solver(denoise, schedule, x, solve_ts, cond, order=int(method[-1]))
    if final_to_zero or denoise_final:
        # The step to sigma = 0 (or the final denoising) is x_0 = E[x_0 | x_t]: the limit of every
        # sampler's update as sigma_s -> 0 (DDIM / DDPM / DPM-Solver-1 to s = 0), one evaluation.
        x0 = denoise(x, solve_ts[-1], cond).x0
        if final_to_zero and options.get("final_step") == "extrapolate" and solve_ts.shape[0] >= 2:
            x0 = extrapolate_x0(x0, *history)  # O(u^2) instead of O(u), no extra evaluation
        x = x0
    return x, nfe


def sample(
    model_fn: Callable,
    schedule: Schedule,
    x_T,
    *,
    method: str,
    num_steps: int,
    key: Optional[jax.Array] = None,
    prediction: str = "eps",
    cond: Any = None,
    t_start: Optional[float] = None,
    t_end: Optional[float] = None,
    grid=None,
    denoise_final: bool = False,
    return_nfe: bool = False,
    **options,
):
    """Sample from a diffusion model by any method: the whole loop is one jitted call.

    Args:
      model_fn: ``model_fn(x, t)`` or ``model_fn(x, t, cond)``; ``t`` arrives as a float array of
        shape (batch,) in the schedule's time units, the output has the shape of ``x``. A pytree
        callable such as ``jax.tree_util.Partial(apply, params)`` has its arrays traced, so new
        parameters reuse the compiled loop; a plain function is part of the compiled program.
      schedule: any ``diffjax.schedules.Schedule``.
      x_T: the starting point at ``t_start`` (e.g. ``schedule.prior_sample``).
      method: one of ``METHODS``: ``ddpm``, ``ddim`` (option ``eta``), ``euler_maruyama``,
        ``pc`` (options ``snr``, ``n_corrector``, ``predictor``, ``corrector``), ``pf_ode``
        (options ``solver`` in tsit5/dopri5/euler/heun, ``rtol``, ``atol``), ``dpm_solver_1``,
        ``dpm_solver_2``, ``dpm_solver_3``, ``dpm_solver++_2m``, ``dpm_solver++_3m`` (option
        ``final_step``: ``denoise``, the default, or ``extrapolate``: with ``t_end = 0`` the step to
        sigma = 0 extrapolates the last two x0 predictions to sigma = 0, error O(sigma^4) instead
        of O(sigma^2) in the last grid point's sigma / alpha, at no extra evaluation; it pays off
        when the grid stops at a sizeable sigma, e.g. ``grid="ddim_trailing"``; see
        ``diffjax.samplers.extrapolate_x0``).
      num_steps: solver steps (grid intervals); adaptive ``pf_ode`` ignores it.
      key: PRNG key, required by stochastic methods.
      prediction: what ``model_fn`` predicts: eps, x0, v, score or flow.
      cond: passed to ``model_fn`` unchanged.
      t_start, t_end: integration interval, default ``schedule.t_max`` and ``schedule.t_min``.
        ``t_end = 0`` ends with the exact step to sigma = 0 (the denoised x_0).
      grid: time_uniform, time_quadratic, logSNR, ddim_trailing / ddim_linear / ddim_quadratic
        (sub-sequences of a DiscreteDDPM chain, ending at t = 0; ddim_trailing, the default for
        ddpm/ddim with t_end=0, starts at step N; the DDIM paper's linear/quadratic start below it
        and x_T is taken at their first time), or an explicit decreasing array of times (which
        fixes t_start and t_end).
      denoise_final: return E[x_0 | x_{t_end}] instead of x_{t_end} (one more evaluation).
      return_nfe: also return the number of model evaluations made.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}; got {method!r}")
    check_prediction(prediction)
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps <= 0:
        raise ValueError(f"num_steps must be a positive integer; got {num_steps!r}")
    unknown = set(options) - _OPTIONS[method]
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for method {method!r}; "
            f"allowed: {sorted(_OPTIONS[method])}"
        )
    per_step, stochastic, _ = METHODS[method]
    if stochastic or (method == "ddim" and options.get("eta", 0.0) != 0.0):
        if key is None:
            raise ValueError(f"method {method!r} is stochastic and needs key=")
    x_T = jnp.asarray(x_T)
    if x_T.ndim < 1:
        raise ValueError(f"x_T must have a leading batch axis; got shape {x_T.shape}")

    sigma_vanishes_at_0 = float(schedule.sigma2(0.0)) == 0.0
    if grid is not None and not isinstance(grid, str):
        ts = jnp.asarray(grid, jnp.result_type(float))
        check_grid(ts)
    else:
        t_start = float(schedule.t_max if t_start is None else t_start)
        t_end = float(schedule.t_min if t_end is None else t_end)
        for name, v in (("t_start", t_start), ("t_end", t_end)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in the schedule's time range [0, 1]; got {v}")
        if not t_end < t_start:
            raise ValueError(f"t_end must be < t_start; got t_end={t_end}, t_start={t_start}")
        ts = _grid(schedule, method, num_steps, t_start, t_end, grid, options,
                   clean_end=t_end == 0.0 and sigma_vanishes_at_0)
    final_to_zero = float(ts[-1]) == 0.0 and sigma_vanishes_at_0

    if options.get("final_step", "denoise") not in FINAL_STEPS:
        raise ValueError(f"final_step must be one of {FINAL_STEPS}; got {options['final_step']!r}")
    if method == "pf_ode":
        solver = options.get("solver", "tsit5")
        if solver not in ODE_SOLVERS:
            raise ValueError(f"solver must be one of {tuple(ODE_SOLVERS)}; got {solver!r}")
        for tol in ("rtol", "atol"):
            if tol in options and not options[tol] > 0:
                raise ValueError(f"{tol} must be positive; got {options[tol]}")
    if method.startswith("dpm_solver"):
        lam = np.asarray(schedule.log_snr(ts[:-1] if final_to_zero else ts))
        if not np.all(np.isfinite(lam)):
            raise ValueError(
                "DPM-Solver steps need finite log-SNR on the grid (t_start < 1 where alpha(1) = 0); "
                f"got lambda in [{lam.min()}, {lam.max()}]"
            )

    config = (method, prediction, final_to_zero, bool(denoise_final),
              tuple(sorted(options.items())))
    key = jax.random.PRNGKey(0) if key is None else key
    x, nfe = _sample_jit(model_fn, schedule, x_T, ts, key, cond, config)

    if return_nfe:
        n_intervals = ts.shape[0] - 1 - int(final_to_zero)
        if method == "pf_ode":
            total = int(nfe)
        elif method == "pc":
            total = n_intervals * (1 + options.get("n_corrector", 1))
            if options.get("predictor") == "none":
                total -= n_intervals
        else:
            total = n_intervals * per_step
        total += int(final_to_zero or denoise_final)
        return x, total
    return x
