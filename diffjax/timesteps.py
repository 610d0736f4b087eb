"""Time grids for samplers: decreasing arrays t_0 = t_start > ... > t_S = t_end.

Continuous grids (DPM-Solver's ``get_time_steps``): time-uniform, time-quadratic, logSNR-uniform,
or any explicit grid; discrete sub-sequences of a ``DiscreteDDPM`` chain (DDIM sec. 4.2 / C.1):
linear ``tau_i = floor(c i)`` and quadratic ``tau_i = floor(c i^2)``, as continuous times.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from diffjax.schedules import DiscreteDDPM, Schedule, _is_concrete, check_time

__all__ = ["GRIDS", "time_uniform", "time_quadratic", "logsnr_uniform", "discrete_subsequence",
           "make_grid", "check_grid"]


def _check_steps(num_steps, t_start=None, t_end=None):
    if not isinstance(num_steps, (int, np.integer)) or num_steps <= 0:
        raise ValueError(f"num_steps must be a positive integer; got {num_steps!r}")
    if t_start is not None:
        check_time(t_start, "t_start")
        check_time(t_end, "t_end")


def time_uniform(t_start: float, t_end: float, num_steps: int):
    """Uniform in t: t_i = t_start + i (t_end - t_start) / S."""
    _check_steps(num_steps, t_start, t_end)
    return jnp.linspace(t_start, t_end, num_steps + 1)


def time_quadratic(t_start: float, t_end: float, num_steps: int):
    """Uniform in sqrt(t) (DPM-Solver 'time_quadratic'; DDIM's quadratic spacing)."""
    _check_steps(num_steps, t_start, t_end)
    return jnp.linspace(np.sqrt(t_start), np.sqrt(t_end), num_steps + 1) ** 2


def logsnr_uniform(schedule: Schedule, t_start: float, t_end: float, num_steps: int):
    """Uniform in lambda = log(alpha/sigma) (DPM-Solver sec. 3.4 'logSNR'); ends kept exact."""
    _check_steps(num_steps, t_start, t_end)
    lam = jnp.linspace(schedule.log_snr(t_start), schedule.log_snr(t_end), num_steps + 1)
    if _is_concrete(lam) and not np.all(np.isfinite(np.asarray(lam))):
        raise ValueError(
            "logSNR-uniform grid needs finite log-SNR at both ends; "
            f"got lambda({t_start}) = {float(lam[0])}, lambda({t_end}) = {float(lam[-1])}"
        )
    ts = schedule.t_from_log_snr(lam)
    return ts.at[0].set(t_start).at[-1].set(t_end)


def discrete_subsequence(schedule: DiscreteDDPM, num_steps: int, kind: str = "linear"):
    """A DDIM sub-sequence of Ho's steps, as times tau_i / N, from the last step down to t = 0.

    ``linear``: tau_i = floor(c i) + 1 with c = N / S; ``quadratic``: tau_i = floor(c i^2) + 1 with
    c = 0.8 N / S^2 (DDIM appendix C.1), i = 0..S-1, 1-based. Both "leading" sequences start below
    step N (e.g. 901 of 1000), so x_T belongs to that first time. ``trailing``: tau_i = round(N - c i)
    (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2)
    starts at step N. The chain ends at t = 0 (x_0).
    """
    _check_steps(num_steps)
    n = schedule.num_timesteps
    if num_steps > n:
        raise ValueError(f"num_steps ({num_steps}) exceeds the chain length ({n})")
    i = np.arange(num_steps)
    if kind == "linear":
        tau = np.floor(i * (n / num_steps)).astype(int)
    elif kind == "quadratic":
        tau = np.floor((np.sqrt(0.8 * n) * i / max(num_steps - 1, 1)) ** 2).astype(int)
    elif kind == "trailing":
        tau = np.round(n - i * (n / num_steps)).astype(int) - 1
    else:
        raise ValueError(f"kind must be 'linear', 'quadratic' or 'trailing'; got {kind!r}")
    tau = np.unique(tau) + 1  # 0-based -> Ho's 1-based steps
    if tau.size != num_steps:
        raise ValueError(f"{kind} sub-sequence of {num_steps} steps has repeated steps for N = {n}")
    t = np.concatenate([tau[::-1], [0]]) / n
    return jnp.asarray(t, jnp.result_type(float))


# "trailing": uniform in t like time_uniform, but a grid that ends at t = 0 puts all num_steps intervals on
# [t_start, 0] (the last one the step to x_0) instead of num_steps - 1 on [t_start, t_min] and the step to 0:
# diffusers' "trailing" spacing (Lin et al. 2024 Table 2), the grid few-step students are trained on
GRIDS = ("time_uniform", "time_quadratic", "logSNR", "trailing")
SUBSEQUENCE_GRIDS = ("ddim_linear", "ddim_quadratic", "ddim_trailing")  # DiscreteDDPM chains only


def make_grid(schedule: Schedule, t_start: float, t_end: float, num_steps: int,
              grid: str = "logSNR"):
    """A decreasing grid of num_steps + 1 times by name, or ``grid`` itself if it is an array."""
    if not isinstance(grid, str):
        ts = jnp.asarray(grid, jnp.result_type(float))
        check_grid(ts)
        return ts
    if grid in ("time_uniform", "trailing"):
        return time_uniform(t_start, t_end, num_steps)
    if grid == "time_quadratic":
        return time_quadratic(t_start, t_end, num_steps)
    if grid == "logSNR":
        return logsnr_uniform(schedule, t_start, t_end, num_steps)
    raise ValueError(f"grid must be one of {GRIDS} or an array of times; got {grid!r}")


def check_grid(ts, increasing: bool = False):
    """Validate a 1-D grid in [0, 1] that is strictly decreasing (or increasing)."""
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"time grid must be 1-D with at least 2 times; got shape {ts.shape}")
    check_time(ts, "time grid")
    if _is_concrete(ts):
        d = np.diff(np.asarray(ts))
        if not (np.all(d > 0) if increasing else np.all(d < 0)):
            raise ValueError(
                f"time grid must be strictly {'increasing' if increasing else 'decreasing'}"
            )
