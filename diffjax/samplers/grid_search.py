"""Optimised time grids: the sampler's time points searched to minimise the measured error.

For a denoiser (a model or the oracle), schedule, sampler and step budget, ``optimise_grid``
searches the decreasing grid that minimises the mean squared distance of the sampler's output to a
reference endpoint from the same x_T (by default the PF-ODE solved by Tsit5 at rtol = atol = 1e-6),
in the spirit of Align Your Steps (Sabour et al. 2024), which fits the grid to one model and one
sampler, but with the measured endpoint error as the objective instead of a KL bound. The search
is a coordinate search in lambda = log(alpha / sigma): each free point in turn is moved to the best
of ``candidates`` positions between its neighbours (one jitted ``lax.map`` over the candidate
grids, through the same sampler function ``diffjax.sample`` runs), in a window that shrinks every sweep;
the current position is always a candidate, so the loss never increases. Ends: t_start is fixed;
with ``t_end = 0`` the grid ends with the step to sigma = 0 and its last nonzero time is free in
(previous time, ``schedule.t_min``]; otherwise t_end is fixed.

``save_grid`` / ``load_grid`` store the grid with its metadata (schedule, sampler, options, NFE,
losses) in an ``.npz`` file; ``diffjax.sample(..., grid=load_grid(path))`` reuses it.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.parameterization import as_denoiser
from diffjax.samplers.api import SAMPLERS, sample, solve_grid
from diffjax.schedules import Schedule, check_time
from diffjax.timesteps import check_grid, make_grid

__all__ = ["optimise_grid", "grid_error", "save_grid", "load_grid"]


def _mse(a, b):
    return jnp.mean(jnp.square(a - b))


def _describe(init):
    return init if isinstance(init, str) else [float(t) for t in np.asarray(init)]


def grid_error(model_fn, schedule, x_T, reference, grid, *, method: str, prediction=None, cond=None,
               key=None, **options) -> float:
    """RMS distance of ``diffjax.sample(..., grid=grid)`` from ``reference`` (the endpoints of the same x_T)."""
    x = sample(model_fn, schedule, x_T, method=method, num_steps=len(grid) - 1, grid=grid,
               prediction=prediction, cond=cond, key=key, **options)
    return float(jnp.sqrt(_mse(x, reference)))


def optimise_grid(
    model_fn: Callable,
    schedule: Optional[Schedule],
    x_T,
    *,
    method: str,
    num_steps: int,
    reference=None,
    prediction: Optional[str] = None,
    cond: Any = None,
    key: Optional[jax.Array] = None,
    t_start: Optional[float] = None,
    t_end: float = 0.0,
    init: str = "logSNR",
    sweeps: int = 8,
    candidates: int = 17,
    window: float = 0.5,
    shrink: float = 0.6,
    **options,
):
    """Search the ``num_steps``-interval grid of ``method`` that minimises the endpoint error from ``x_T``.

    Args:
      model_fn, schedule, prediction, cond, key, options: as for ``diffjax.sample`` (a stochastic
        method uses the fixed ``key``, so its error is that of one noise draw).
      x_T: the training starting points (batch, ...); judge the result on other x_T.
      reference: the exact endpoints of ``x_T``; default the PF-ODE by Tsit5 at rtol = atol = 1e-6.
      t_start, t_end: as for ``diffjax.sample`` (t_end = 0: the grid ends with the step to sigma = 0).
      init: the starting grid: a name (``diffjax.timesteps.make_grid``) or an array of ``num_steps + 1``
        decreasing times from t_start (ending at 0 if t_end = 0, else at t_end), e.g. a stored grid to refine;
        or a sequence of them: each is searched and the grid with the lowest error on ``x_T`` is returned
        (the search is local, so several starts find better optima).
      sweeps, candidates, window, shrink: ``sweeps`` passes over the free points; each tries
        ``candidates`` positions (odd, so the current one is among them) spread over +- ``window``
        of the gap between its neighbours, the window multiplied by ``shrink`` after every pass.

    Returns:
      (ts, info): the grid (numpy, decreasing, ``num_steps + 1`` times) and its metadata (method,
      options, num_steps, nfe, schedule, t_start, t_end, the chosen init and its rms_init, rms; every init
      with its starting and searched rms; the search settings).
    """
    if method not in SAMPLERS:
        raise ValueError(f"method must be one of {tuple(SAMPLERS)}; got {method!r}")
    spec = SAMPLERS[method]
    if spec.adaptive(options):
        raise ValueError(f"method {method!r} with options {options} picks its own steps; it has no grid to optimise")
    unknown = set(options) - spec.sample_options
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for method {method!r}; allowed: {sorted(spec.sample_options)}")
    spec.check(options)
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2; got {num_steps!r}")
    if not (isinstance(candidates, int) and candidates >= 3 and candidates % 2 == 1):
        raise ValueError(f"candidates must be an odd integer >= 3; got {candidates!r}")
    if not (isinstance(sweeps, int) and sweeps >= 1):
        raise ValueError(f"sweeps must be a positive integer; got {sweeps!r}")
    if not 0 < window <= 1:
        raise ValueError(f"window must be in (0, 1]; got {window}")
    if not 0 < shrink <= 1:
        raise ValueError(f"shrink must be in (0, 1]; got {shrink}")
    if spec.stochastic(options) and key is None:
        raise ValueError(f"method {method!r} is stochastic and needs key=")
    denoiser = as_denoiser(model_fn, schedule, prediction)
    schedule = denoiser.schedule
    x_T = jnp.asarray(x_T)
    t_start = float(schedule.t_max if t_start is None else t_start)
    check_time(t_start, "t_start")
    check_time(t_end, "t_end")
    final_to_zero = t_end == 0.0 and float(schedule.sigma2(0.0)) == 0.0
    t_last = float(schedule.t_min) if final_to_zero else float(t_end)
    if not t_last < t_start:
        raise ValueError(f"t_end must be < t_start; got t_end={t_end}, t_start={t_start}")
    if reference is None:
        reference = sample(denoiser, None, x_T, method="pf_ode", num_steps=2, solver="tsit5", rtol=1e-6,
                           atol=1e-6, t_start=t_start, t_end=t_end, cond=cond)
    reference = jnp.asarray(reference)
    if reference.shape != x_T.shape:
        raise ValueError(f"reference must have the shape of x_T {x_T.shape}; got {reference.shape}")

    # the grid's nonzero times, as lambda; lam[0] (t_start) is fixed, lam[-1] too unless it is free
    n_pts = num_steps if final_to_zero else num_steps + 1
    several = isinstance(init, (list, tuple)) and (len(init) == 0 or any(isinstance(i, str) or np.ndim(i) >= 1 for i in init))
    inits = list(init) if several else [init]
    if not inits:
        raise ValueError("init must be a grid name, an array of times, or a non-empty sequence of them")

    def start_lambdas(init):
        if isinstance(init, str):
            ts0 = make_grid(schedule, t_start, t_last, n_pts - 1, init)
        else:
            ts0 = np.asarray(init, np.float64)
            check_grid(jnp.asarray(ts0))
            if ts0.shape != (num_steps + 1,) or ts0[0] != t_start or ts0[-1] != float(t_end):
                raise ValueError(f"init must be num_steps + 1 = {num_steps + 1} times from t_start = {t_start} to "
                                 f"t_end = {t_end}; got {ts0.shape[0]} from {ts0[0]} to {ts0[-1]}")
            ts0 = jnp.asarray(ts0[:n_pts])
            if final_to_zero and not float(ts0[-1]) >= t_last:
                raise ValueError(f"init's last time before 0 must be >= schedule.t_min = {t_last}; got {float(ts0[-1])}")
        return np.asarray(schedule.log_snr(ts0), np.float64)

    starts = [start_lambdas(i) for i in inits]  # every init is checked before any search runs
    lam_hi = float(schedule.log_snr(t_last))  # the free last point stays at or above t_min (at or below lambda(t_min))
    free = list(range(1, n_pts - 1)) + ([n_pts - 1] if final_to_zero else [])
    key = jax.random.PRNGKey(0) if key is None else key
    opts = dict(options)
    dtype = x_T.dtype

    def to_ts(lam_row):
        ts = schedule.t_from_log_snr(lam_row).at[0].set(t_start)
        if final_to_zero:
            return jnp.concatenate([ts, jnp.zeros((1,), ts.dtype)])
        return ts.at[-1].set(t_end)

    @jax.jit
    def losses(lam_rows):  # (K, n_pts) -> (K,), one grid after the other (memory of one sampler call)
        return jax.lax.map(lambda row: _mse(solve_grid(spec, denoiser, x_T, to_ts(row), key, cond, final_to_zero, opts)[0],
                                            reference), lam_rows)

    offsets = np.linspace(-1.0, 1.0, candidates)

    def search(lam):
        best = float(losses(jnp.asarray(lam[None], dtype))[0])
        w = window
        for _ in range(sweeps):
            for i in free:
                lo, hi = lam[i - 1], (lam[i + 1] if i + 1 < n_pts else lam_hi)
                gap = hi - lo
                u0 = (lam[i] - lo) / gap
                u_max = 1.0 if i == n_pts - 1 else 1.0 - 1e-3  # interior points stay strictly between neighbours
                u = np.clip(u0 + w * offsets, 1e-3, u_max)
                u[candidates // 2] = u0
                rows = np.repeat(lam[None], candidates, axis=0)
                rows[:, i] = lo + u * gap
                vals = np.asarray(losses(jnp.asarray(rows, dtype)))
                j = int(np.nanargmin(vals))
                if vals[j] < best:
                    best, lam = float(vals[j]), rows[j]
            w *= shrink
        return lam, best

    loss_inits = [float(losses(jnp.asarray(l[None], dtype))[0]) for l in starts]
    results = [search(l) for l in starts]
    pick = int(np.argmin([b for _, b in results]))
    lam, best = results[pick]
    loss_init = loss_inits[pick]
    ts = np.asarray(to_ts(jnp.asarray(lam, dtype)))
    check_grid(jnp.asarray(ts))
    nfe = sample(denoiser, None, x_T, method=method, num_steps=num_steps, grid=ts, cond=cond, key=key,
                 return_nfe=True, **options)[1]
    info = dict(method=method, options={k: v for k, v in options.items()}, num_steps=int(num_steps), nfe=int(nfe),
                schedule=repr(schedule), t_start=t_start, t_end=float(t_end),
                init=_describe(inits[pick]), inits=[_describe(i) for i in inits],
                rms_inits=[float(np.sqrt(l)) for l in loss_inits], rms_searched=[float(np.sqrt(b)) for _, b in results],
                rms_init=float(np.sqrt(loss_init)), rms=float(np.sqrt(best)), n_train=int(x_T.shape[0]),
                search=dict(kind="coordinate search in lambda", sweeps=sweeps, candidates=candidates,
                            window=window, shrink=shrink))
    return ts, info


def save_grid(path: str, ts, **metadata) -> None:
    """Write the grid ``ts`` and its JSON-serialisable ``metadata`` (e.g. ``optimise_grid``'s info) to ``path`` (.npz)."""
    if not str(path).endswith(".npz"):
        raise ValueError(f"path must end in .npz; got {path!r}")
    ts = np.asarray(ts, np.float64)
    check_grid(jnp.asarray(ts))
    np.savez(path, ts=ts, metadata=np.asarray(json.dumps(metadata, sort_keys=True)))


def load_grid(path: str, with_metadata: bool = False):
    """The grid stored by ``save_grid`` (numpy float64), or (grid, metadata dict) if ``with_metadata``."""
    with np.load(path) as data:
        if "ts" not in data or "metadata" not in data:
            raise ValueError(f"{path} is not a grid file written by save_grid (needs arrays 'ts' and 'metadata')")
        ts = np.asarray(data["ts"], np.float64)
        metadata = json.loads(str(data["metadata"]))
    check_grid(jnp.asarray(ts))
    return (ts, metadata) if with_metadata else ts
