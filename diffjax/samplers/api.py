"""``diffjax.sample``: one call for every sampler, schedule and prediction type.

Every method is one function of the same shape,
``fn(denoiser, schedule, x_T, ts, key, cond, **options) -> (x, stats)`` with ``stats["nfe"]`` the
model evaluations it made, registered in ``SAMPLERS`` with what it needs (a key?), its default
grid and the options it takes. This module only chooses the grid, validates input and jits the
whole loop; the step to sigma = 0 (or a final denoising) is added here, for every method but those
that take it themselves (``SamplerSpec.own_final_step``: EDM's churn and step count reach it), and
trajectories (``save_at``) are taken here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.consistency import consistency_sample
from diffjax.parameterization import Denoiser, as_denoiser, check_prediction
from diffjax.samplers.ancestral import ddim, ddpm, nfe_stats
from diffjax.samplers.dpm_solver import check_dpm_adaptive, dpm_adaptive, dpm_solver, extrapolate_x0
from diffjax.samplers.edm import check_churn, edm_sampler
from diffjax.samplers.ode import ODE_SOLVERS, is_adaptive, pf_ode
from diffjax.samplers.trajectory import Trajectory, check_save_at
from diffjax.samplers.unipc import check_unipc, check_unipc_adaptive, unipc, unipc_adaptive
from diffjax.samplers.sde import euler_maruyama, predictor_corrector
from diffjax.schedules import DiscreteDDPM, Schedule, check_time
from diffjax.timesteps import check_grid, discrete_subsequence, make_grid, parse_grid

__all__ = ["SAMPLERS", "METHODS", "SamplerSpec", "Trajectory", "sample", "solve_grid"]

FINAL_STEPS = ("denoise", "extrapolate")


def _check_pf_ode(options):
    solver = options.get("solver", "tsit5")
    if solver not in ODE_SOLVERS:
        raise ValueError(f"solver must be one of {tuple(ODE_SOLVERS)}; got {solver!r}")
    for tol in ("rtol", "atol"):
        if tol in options and not options[tol] > 0:
            raise ValueError(f"{tol} must be positive; got {options[tol]}")


def _no_check(options):
    return None


def _always(options):
    return True


def _never(options):
    return False


def _pf_ode_adaptive(options):
    return is_adaptive(options.get("solver", "tsit5"), options.get("adaptive"))


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: ``fn(denoiser, schedule, x_T, ts, key, cond, **options) -> (x, stats)``.

    ``stochastic(options)``: whether this call needs a PRNG key; ``grid``: the default time grid;
    ``options``: the keyword options ``fn`` accepts; ``check(options)``: raises a ValueError
    naming a bad option value; ``log_snr_steps``: steps in log-SNR (the grid needs finite lambda);
    ``extrapolates``: its stats carry the x0 ``"history"``, so ``sample`` offers
    ``final_step="extrapolate"``; ``adaptive(options)``: the solver picks its own steps between the
    grid's ends; ``chain_grid``: the default grid on a DiscreteDDPM chain sampled to t = 0;
    ``own_final_step``: ``fn`` takes the whole grid and ``to_zero`` (its last time is sigma = 0) and makes
    that step itself, and with ``save_steps=True`` returns stats["states"], its state at ts[1:];
    ``markov``: the state alone determines the rest of the solve (no multistep history), so a trajectory
    can be taken by solving the grid in segments.
    """

    fn: Callable
    stochastic: Callable[[dict], bool]
    grid: str
    options: frozenset = frozenset()
    check: Callable[[dict], None] = _no_check
    log_snr_steps: bool = False
    extrapolates: bool = False
    adaptive: Callable[[dict], bool] = _never
    chain_grid: Optional[str] = None
    own_final_step: bool = False
    markov: bool = True

    @property
    def sample_options(self) -> frozenset:
        """The options ``sample`` accepts for this method: ``fn``'s, and ``final_step`` if it extrapolates."""
        return self.options | ({"final_step"} if self.extrapolates else set())


def _ddim_stochastic(options):
    return options.get("eta", 0.0) != 0.0


def _churn_stochastic(options):
    return options.get("S_churn", 0.0) > 0


def _dpm(order, multistep=False):
    return functools.partial(dpm_solver, order=order, multistep=multistep)


_CHURN = frozenset({"S_churn", "S_tmin", "S_tmax", "S_noise"})

SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(ddpm, _always, "time_uniform", frozenset({"variance"}), chain_grid="ddim_trailing"),
    "ddim": SamplerSpec(ddim, _ddim_stochastic, "time_uniform", frozenset({"eta"}), chain_grid="ddim_trailing"),
    "euler_maruyama": SamplerSpec(euler_maruyama, _always, "time_uniform"),
    "pc": SamplerSpec(predictor_corrector, _always, "time_uniform",
                      frozenset({"snr", "n_corrector", "predictor", "corrector", "ald_step"})),
    "pf_ode": SamplerSpec(pf_ode, _never, "time_uniform",
                          frozenset({"solver", "rtol", "atol", "max_steps", "adaptive"}), _check_pf_ode,
                          adaptive=_pf_ode_adaptive),
    # fixed-grid PF-ODE solvers by name (k-diffusion's sample_euler / sample_heun in t; rectified flow's Euler)
    "euler": SamplerSpec(functools.partial(pf_ode, solver="euler"), _never, "time_uniform"),
    "heun": SamplerSpec(functools.partial(pf_ode, solver="heun"), _never, "time_uniform"),
    "dpm_solver_1": SamplerSpec(_dpm(1), _never, "logSNR", log_snr_steps=True),
    "dpm_solver_2": SamplerSpec(_dpm(2), _never, "logSNR", log_snr_steps=True),
    "dpm_solver_3": SamplerSpec(_dpm(3), _never, "logSNR", log_snr_steps=True),
    "dpm_solver++_2m": SamplerSpec(_dpm(2, True), _never, "logSNR", log_snr_steps=True, extrapolates=True,
                                   markov=False),
    "dpm_solver++_3m": SamplerSpec(_dpm(3, True), _never, "logSNR", log_snr_steps=True, extrapolates=True,
                                   markov=False),
    # EDM Alg. 1 / 2 (Karras et al. 2022) in sigma / alpha; S_churn > 0 needs a key
    "edm_heun": SamplerSpec(edm_sampler, _churn_stochastic, "karras", _CHURN, check_churn, log_snr_steps=True,
                            own_final_step=True),
    "edm_euler": SamplerSpec(functools.partial(edm_sampler, heun=False), _churn_stochastic, "karras", _CHURN,
                             check_churn, log_snr_steps=True, own_final_step=True),
    # UniPC (Zhao et al. 2023), multistep UniP-p + UniC-p
    "unipc": SamplerSpec(unipc, _never, "logSNR", frozenset({"order", "variant", "predict_x0", "corrector",
                                                           "lower_order_final"}),
                         check_unipc, log_snr_steps=True, own_final_step=True, markov=False),
    # multistep consistency sampling (Song et al. 2023 Alg. 1) of a consistency model read as an x0 model_fn
    "consistency": SamplerSpec(consistency_sample, _always, "trailing", frozenset({"sigma_min"})),
    # adaptive DPM-Solver-12 / -23 (Lu et al. 2022 sec. 4.2), or DPM-Solver++(2M)/(3M) with multistep=True: the
    # solver picks its steps in lambda
    "dpm_adaptive": SamplerSpec(dpm_adaptive, _never, "logSNR", frozenset({"order", "multistep", "rtol", "atol", "h_init",
                                                                 "max_steps"}),
                                check_dpm_adaptive, log_snr_steps=True, adaptive=_always),
    # adaptive UniPC: UniP-p predicts, UniC-p corrects with the evaluation at the predicted x_t, and their
    # difference drives the same controller
    "unipc_adaptive": SamplerSpec(unipc_adaptive, _never, "logSNR", frozenset({"order", "variant", "rtol", "atol",
                                                                      "h_init", "max_steps"}),
                                  check_unipc_adaptive, log_snr_steps=True, adaptive=_always, markov=False),
}

METHODS = tuple(SAMPLERS)  # the method names


def _grid(schedule, spec, num_steps, t_start, t_end, grid, options, clean_end):
    """The decreasing time grid of a call. ``clean_end``: t_end = 0 where sigma(0) = 0, so the
    last interval is the exact step to x_0 and the solve itself stops at ``schedule.t_min``."""
    if spec.adaptive(options):
        # adaptive: the solver picks its own steps between the ends (num_steps is unused)
        ends = [t_start, min(float(schedule.t_min), 0.5 * t_start), 0.0] if clean_end else [t_start, t_end]
        return jnp.asarray(ends, jnp.result_type(float))
    if grid is None:
        chain_end = spec.chain_grid is not None and isinstance(schedule, DiscreteDDPM) and t_end == 0.0
        grid = spec.chain_grid if chain_end else spec.grid
    name, grid_options = parse_grid(grid)
    if name.startswith("ddim_"):
        if not isinstance(schedule, DiscreteDDPM):
            raise ValueError(f"grid {grid!r} needs a DiscreteDDPM schedule")
        # the sub-sequence fixes its own first time (x_T is at ts[0], as in DDIM) and ends at t = 0
        return discrete_subsequence(schedule, num_steps, name[len("ddim_"):], **grid_options)
    if clean_end and name == "trailing":
        return make_grid(schedule, t_start, 0.0, num_steps, grid)  # the last interval is the step to t = 0
    if clean_end:
        # lay num_steps - 1 intervals down to t_min, then the exact step to t = 0
        t_min = float(schedule.t_min)
        if num_steps == 1 or not t_min < t_start:
            return jnp.asarray([t_start, 0.0], jnp.result_type(float))
        ts = make_grid(schedule, t_start, t_min, num_steps - 1, grid)
        return jnp.concatenate([ts, jnp.zeros((1,), ts.dtype)])
    return make_grid(schedule, t_start, t_end, num_steps, grid)


def solve_grid(spec, denoiser, x, ts, key, cond, final_to_zero, options, save_steps=False):
    """The sampler ``spec`` on the grid ``ts`` exactly as ``sample`` runs it, inside a jitted function: ``spec.fn``
    and, if ``final_to_zero`` (ts[-1] is sigma = 0), the step there; ``options`` as ``sample``'s (final_step
    included). Returns (x, stats); ``save_steps`` (an ``own_final_step`` method) adds stats["states"]."""
    options = dict(options)
    final_step = options.pop("final_step", "denoise")
    key = key if spec.stochastic(options) else None
    if spec.own_final_step:
        return spec.fn(denoiser, denoiser.schedule, x, ts, key, cond, to_zero=final_to_zero, save_steps=save_steps,
                       **options)
    solve_ts = ts[:-1] if final_to_zero else ts
    stats = nfe_stats(0, 0)
    if solve_ts.shape[0] >= 2:
        x, stats = spec.fn(denoiser, denoiser.schedule, x, solve_ts, key, cond, **options)
    if final_to_zero:
        # The step to sigma = 0 is x_0 = E[x_0 | x_t]: the limit of every sampler's update as
        # sigma_s -> 0 (DDIM / DDPM / DPM-Solver-1 to s = 0), one evaluation.
        x0 = denoiser(x, solve_ts[-1], cond).x0
        if final_step == "extrapolate" and "history" in stats:
            x0 = extrapolate_x0(x0, *stats["history"])  # O(u^2) instead of O(u), no extra evaluation
        x, stats = x0, {**stats, "nfe": stats["nfe"] + 1}
    return x, stats


def _trajectory(spec, denoiser, x_T, ts, key, cond, final_to_zero, options, save_at):
    """(x, nfe, states at the grid indices ``save_at``): natively (``own_final_step``) or by solving the grid
    in segments between saved indices (a Markov method; a stochastic one draws segment k's noise from
    ``fold_in(key, k)``)."""
    n = ts.shape[0] - 1
    if spec.own_final_step:
        x, stats = solve_grid(spec, denoiser, x_T, ts, key, cond, final_to_zero, options, save_steps=True)
        states = jnp.concatenate([x_T[None], stats["states"]])
        return x, stats["nfe"], [states[i] for i in save_at]
    bounds = sorted(set(save_at) | {0, n})
    x, nfe, at = x_T, jnp.asarray(0), {0: x_T}
    for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        seg_key = None if key is None else jax.random.fold_in(key, k)
        x, stats = solve_grid(spec, denoiser, x, ts[a:b + 1], seg_key, cond, final_to_zero and b == n, options)
        nfe, at[b] = nfe + stats["nfe"], x
    return x, nfe, [at[i] for i in save_at]


@eqx.filter_jit
def _sample_jit(denoiser, x_T, ts, key, cond, config):
    method, final_to_zero, denoise_final, options, save_at = config
    spec = SAMPLERS[method]
    traj = None
    if save_at is None:
        x, stats = solve_grid(spec, denoiser, x_T, ts, key, cond, final_to_zero, options)
        nfe = stats["nfe"]
    else:
        x, nfe, states = _trajectory(spec, denoiser, x_T, ts, key, cond, final_to_zero, options, save_at)
        # E[x_0 | x_t] at each saved state; at sigma = 0 the state is the sample itself
        x0s = [s if final_to_zero and i == ts.shape[0] - 1 else denoiser(s, ts[i], cond).x0
               for i, s in zip(save_at, states)]
        traj = Trajectory(ts[jnp.asarray(save_at)], jnp.stack(states), jnp.stack(x0s))
    if denoise_final and not final_to_zero:
        x, nfe = denoiser(x, ts[-1], cond).x0, nfe + 1  # the final denoising, E[x_0 | x_{t_end}]
    return x, nfe, traj


def sample(
    model_fn: Callable | Denoiser,
    schedule: Optional[Schedule],
    x_T,
    *,
    method: str,
    num_steps: int,
    key: Optional[jax.Array] = None,
    prediction: Optional[str] = None,
    cond: Any = None,
    t_start: Optional[float] = None,
    t_end: Optional[float] = None,
    grid=None,
    denoise_final: bool = False,
    return_nfe: bool = False,
    save_at=None,
    **options,
):
    """Sample from a diffusion model by any method: the whole loop is one jitted call.

    Args:
      model_fn: a ``Denoiser`` (``diffjax.make_denoiser``, possibly guided), or ``model_fn(x, t)`` /
        ``model_fn(x, t, cond)`` with its ``prediction`` type; ``t`` arrives as a float array of
        shape (batch,) in the schedule's time units, the output has the shape of ``x``. A pytree
        callable such as ``jax.tree_util.Partial(apply, params)`` has its arrays traced, so new
        parameters reuse the compiled loop; a plain function is part of the compiled program.
      schedule: any ``diffjax.schedules.Schedule``; None (or the same schedule) with a Denoiser.
      x_T: the starting point at ``t_start`` (e.g. ``schedule.prior_sample``).
      method: one of ``SAMPLERS``: ``ddpm`` (option ``variance``), ``ddim`` (option ``eta``),
        ``euler_maruyama``, ``pc`` (options ``snr``, ``n_corrector``, ``predictor``, ``corrector``,
        ``ald_step``), ``pf_ode`` (options ``solver`` in tsit5/dopri5/euler/heun, ``rtol``,
        ``atol``, ``max_steps``, ``adaptive``), ``euler`` and ``heun`` (``pf_ode``'s fixed-grid solvers),
        ``dpm_solver_1``, ``dpm_solver_2``,
        ``dpm_solver_3``, ``dpm_solver++_2m``, ``dpm_solver++_3m`` (option ``final_step``:
        ``denoise``, the default, or ``extrapolate``: with ``t_end = 0`` the step to sigma = 0
        extrapolates the last two x0 predictions to sigma = 0, error O(sigma^4) instead of
        O(sigma^2) in the last grid point's sigma / alpha, at no extra evaluation; it pays off
        when the grid stops at a sizeable sigma, e.g. ``grid="ddim_trailing"``; see
        ``diffjax.samplers.extrapolate_x0``), ``consistency`` (a consistency model, ``diffjax.consistency``:
        f at each grid time and fresh noise down to the next, CM Alg. 1; option ``sigma_min``, the model's
        s_min = 0.002; needs a key; default grid trailing: 1 step = 1 NFE from t_max, 2 steps via t_max / 2),
        ``edm_heun`` / ``edm_euler`` (EDM Alg. 1, Heun in s = sigma / alpha, 2 evaluations per step and one
        Euler step to sigma = 0 (k-diffusion's ``sample_heun`` / ``sample_euler``); options ``S_churn``,
        ``S_tmin``, ``S_tmax``, ``S_noise``: Alg. 2's churn, S_churn > 0 needs a key; default grid karras),
        ``unipc`` (UniPC, one evaluation per step; options ``order`` 1-3 (default 2), ``variant`` bh1 / bh2
        (default bh2), ``predict_x0`` (default True; False: noise-prediction form), ``corrector`` (default
        True), ``lower_order_final`` (default True: order <= the intervals left, as diffusers)),
        ``dpm_adaptive`` (adaptive DPM-Solver-12 / -23, Lu et al. 2022 sec. 4.2, or with ``multistep=True``
        DPM-Solver++(2M) / (3M) with the lower-order solution as the error estimate; options ``order`` 2 | 3,
        ``multistep``, ``rtol``, ``atol``, ``h_init``, ``max_steps``; only the grid's ends are used),
        ``unipc_adaptive`` (UniP-p then UniC-p with the evaluation at the predicted point, their difference as
        the error estimate, one evaluation per attempted step; options ``order`` 1-3 (default 3), ``variant``,
        ``rtol``, ``atol``, ``h_init``, ``max_steps`` as ``dpm_adaptive``).
      num_steps: solver steps (grid intervals); adaptive ``pf_ode``, ``dpm_adaptive`` and ``unipc_adaptive``
        ignore it.
      key: PRNG key, required by stochastic methods.
      prediction: what ``model_fn`` predicts: eps (the default), x0, v, score or flow; with a
        Denoiser, omit it (a different one raises a ValueError).
      cond: passed to ``model_fn`` unchanged.
      t_start, t_end: integration interval, default ``schedule.t_max`` and ``schedule.t_min``.
        ``t_end = 0`` ends with the exact step to sigma = 0 (the denoised x_0).
      grid: time_uniform (alias linspace), time_quadratic, logSNR (alias log_sigma), karras (EDM eq. 5 in
        sigma / alpha, rho = 7; ``"karras:rho=5"`` sets rho), trailing (uniform in t; ending at t = 0, all
        ``num_steps`` intervals reach down to 0, the last being the step to x_0), ddim_trailing / ddim_linear / ddim_quadratic
        / ddim_leading (alias leading: diffusers' leading spacing, ``"leading:steps_offset=1"`` for Stable
        Diffusion's offset)
        (sub-sequences of a DiscreteDDPM chain, ending at t = 0; ddim_trailing, the default for
        ddpm/ddim with t_end=0, starts at step N; the DDIM paper's linear/quadratic start below it
        and x_T is taken at their first time), or an explicit decreasing array of times (which
        fixes t_start and t_end).
      denoise_final: return E[x_0 | x_{t_end}] instead of x_{t_end} (one more evaluation).
      return_nfe: also return the number of model evaluations made.
      save_at: grid indices (0 = x_T, -1 = the last grid time) or ``"all"``: also return a ``Trajectory``
        (t, x, x0) of the states and E[x_0 | x_t] there (``diffjax.samplers.trajectory``). Methods with a
        multistep history save from inside their solve (edm_*, unipc); other methods without one solve the
        grid in segments between the saved indices (a stochastic one then draws each segment's noise from
        ``fold_in(key, segment)``, another path than without save_at); dpm_solver++_2m / 3m raise.

    Returns:
      ``x``; with ``save_at`` and / or ``return_nfe``: ``(x, trajectory)``, ``(x, nfe)`` or
      ``(x, trajectory, nfe)``.
    """
    if method not in SAMPLERS:
        raise ValueError(f"method must be one of {tuple(SAMPLERS)}; got {method!r}")
    spec = SAMPLERS[method]
    if prediction is not None:
        check_prediction(prediction)
    denoiser = as_denoiser(model_fn, schedule, prediction)
    schedule = denoiser.schedule
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps <= 0:
        raise ValueError(f"num_steps must be a positive integer; got {num_steps!r}")
    unknown = set(options) - spec.sample_options
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for method {method!r}; "
            f"allowed: {sorted(spec.sample_options)}"
        )
    if options.get("final_step", "denoise") not in FINAL_STEPS:
        raise ValueError(f"final_step must be one of {FINAL_STEPS}; got {options['final_step']!r}")
    spec.check(options)
    if spec.stochastic(options) and key is None:
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
            check_time(v, name)
        if not t_end < t_start:
            raise ValueError(f"t_end must be < t_start; got t_end={t_end}, t_start={t_start}")
        ts = _grid(schedule, spec, num_steps, t_start, t_end, grid, options,
                   clean_end=t_end == 0.0 and sigma_vanishes_at_0)
    final_to_zero = float(ts[-1]) == 0.0 and sigma_vanishes_at_0

    if spec.log_snr_steps:
        lam = np.asarray(schedule.log_snr(ts[:-1] if final_to_zero else ts))
        if not np.all(np.isfinite(lam)):
            raise ValueError(
                "DPM-Solver steps need finite log-SNR on the grid (t_start < 1 where alpha(1) = 0); "
                f"got lambda in [{lam.min()}, {lam.max()}]"
            )

    if save_at is not None:
        if not (spec.markov or spec.own_final_step):
            raise ValueError(f"save_at is not available for method {method!r} (a multistep history that "
                             "the sampler does not save)")
        save_at = check_save_at(save_at, ts.shape[0])
    config = (method, final_to_zero, bool(denoise_final), tuple(sorted(options.items())), save_at)
    key = jax.random.PRNGKey(0) if key is None else key
    x, nfe, traj = _sample_jit(denoiser, x_T, ts, key, cond, config)
    out = (x,) + ((traj,) if save_at is not None else ()) + ((int(nfe),) if return_nfe else ())
    return out[0] if len(out) == 1 else out
