"""Time grids for samplers: decreasing arrays t_0 = t_start > ... > t_S = t_end.

Continuous grids (DPM-Solver's ``get_time_steps``): time-uniform, time-quadratic, logSNR-uniform,
Karras et al.'s rho-grid in s = sigma / alpha (EDM eq. 5), or any explicit grid; discrete
sub-sequences of a ``DiscreteDDPM`` chain (DDIM sec. 4.2 / C.1): linear ``tau_i = floor(c i)``,
quadratic ``tau_i = floor(c i^2)``, diffusers' leading and trailing spacings, as continuous times.

A grid is named by a string, optionally with options after a colon: ``"karras"``,
``"karras:rho=5"``, ``"ddim_leading:steps_offset=1"`` (``parse_grid``). Names of other libraries
that denote the same times are aliases (``GRID_ALIASES``):

* ``log_sigma`` (k-diffusion's ``get_sigmas_exponential``: uniform in log(sigma / alpha)) is
  ``logSNR`` exactly, since log(sigma / alpha) = -lambda;
* ``linspace`` (diffusers' unrounded "linspace" spacing of Euler-type schedulers: times from
  t_max to Ho's step 1, then sigma = 0) is ``time_uniform``: the same times; where a time falls
  between two chain steps diffusers interpolates sigma linearly, ``DiscreteDDPM`` log alpha;
* ``leading`` (diffusers' "leading" spacing, tau_i = i floor(N / S) + steps_offset, 0-based) is
  ``ddim_leading``; DDIM's ``ddim_linear`` (floor(i N / S)) equals it only when N mod S <= 1 and
  steps_offset = 0, so it is not an alias;
* diffusers' "trailing" is ``ddim_trailing`` on a chain; the continuous ``trailing`` grid takes the
  same times unrounded (equal when S divides N).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from diffjax.schedules import DiscreteDDPM, Schedule, _is_concrete, check_time

__all__ = ["GRIDS", "SUBSEQUENCE_GRIDS", "GRID_ALIASES", "time_uniform", "time_quadratic", "logsnr_uniform",
           "karras", "discrete_subsequence", "parse_grid", "check_grid_name", "make_grid", "check_grid"]


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


def karras(schedule: Schedule, t_start: float, t_end: float, num_steps: int, rho: float = 7.0):
    """Karras et al. 2022 eq. 5 in s = sigma / alpha: s_i^(1/rho) uniform from s(t_start) to s(t_end),
    mapped to t by the inverse log-SNR; ends kept exact."""
    from diffjax.consistency import karras_sigma, scaled_sigma  # consistency imports the samplers

    _check_steps(num_steps, t_start, t_end)
    if not rho > 0:
        raise ValueError(f"karras grid: rho must be positive; got {rho}")
    s_max, s_min = scaled_sigma(schedule, t_start), scaled_sigma(schedule, t_end)
    if _is_concrete(s_max) and not (np.isfinite(float(s_max)) and float(s_min) > 0):
        raise ValueError(
            "karras grid needs 0 < sigma/alpha < inf at both ends (t_start < 1 where alpha(1) = 0, t_end > 0 "
            f"where sigma(0) = 0); got sigma/alpha({t_start}) = {float(s_max)}, sigma/alpha({t_end}) = {float(s_min)}"
        )
    s = karras_sigma(jnp.arange(num_steps, -1, -1), num_steps + 1, s_min, s_max, rho)
    ts = schedule.t_from_log_snr(-jnp.log(s))
    return ts.at[0].set(t_start).at[-1].set(t_end)


def discrete_subsequence(schedule: DiscreteDDPM, num_steps: int, kind: str = "linear", steps_offset: int = 0):
    """A DDIM sub-sequence of Ho's steps, as times tau_i / N, from the last step down to t = 0.

    ``linear``: tau_i = floor(c i) + 1 with c = N / S; ``quadratic``: tau_i = floor(c i^2) + 1 with
    c = 0.8 N / S^2 (DDIM appendix C.1), i = 0..S-1, 1-based. Both "leading" sequences start below
    step N (e.g. 901 of 1000), so x_T belongs to that first time. ``trailing``: tau_i = round(N - c i)
    (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2)
    starts at step N. ``leading``: diffusers' tau_i = i floor(N / S) + ``steps_offset`` (0-based; DDIMScheduler's
    default offset 0, Stable Diffusion's 1). The chain ends at t = 0 (x_0).
    """
    _check_steps(num_steps)
    if not isinstance(steps_offset, (int, np.integer)) or steps_offset < 0:
        raise ValueError(f"steps_offset must be a non-negative integer; got {steps_offset!r}")
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
    elif kind == "leading":
        # diffusers' "leading": tau_i = i floor(N / S) + steps_offset (0-based)
        tau = i * (n // num_steps) + steps_offset
    else:
        raise ValueError(f"kind must be 'linear', 'quadratic', 'trailing' or 'leading'; got {kind!r}")
    if tau.max() >= n:
        raise ValueError(f"{kind} sub-sequence with steps_offset={steps_offset} passes the chain's last step {n}")
    tau = np.unique(tau) + 1  # 0-based -> Ho's 1-based steps
    if tau.size != num_steps:
        raise ValueError(f"{kind} sub-sequence of {num_steps} steps has repeated steps for N = {n}")
    t = np.concatenate([tau[::-1], [0]]) / n
    return jnp.asarray(t, jnp.result_type(float))


# "trailing": uniform in t like time_uniform, but a grid that ends at t = 0 puts all num_steps intervals on
# [t_start, 0] (the last one the step to x_0) instead of num_steps - 1 on [t_start, t_min] and the step to 0:
# diffusers' "trailing" spacing (Lin et al. 2024 Table 2), the grid few-step students are trained on
GRIDS = ("time_uniform", "time_quadratic", "logSNR", "trailing", "karras", "log_sigma", "linspace")
SUBSEQUENCE_GRIDS = ("ddim_linear", "ddim_quadratic", "ddim_trailing", "ddim_leading", "leading")  # DiscreteDDPM only
# other libraries' names for the same times (module docstring)
GRID_ALIASES = {"log_sigma": "logSNR", "linspace": "time_uniform", "leading": "ddim_leading"}
# the options each grid takes after a colon, with their types
GRID_OPTIONS = {"karras": {"rho": float}, "ddim_leading": {"steps_offset": int}}


def parse_grid(grid: str):
    """``"name"`` or ``"name:key=value,..."`` -> (canonical name, options); a ValueError names a bad part."""
    name, _, rest = grid.partition(":")
    name = GRID_ALIASES.get(name, name)
    if name not in GRIDS + SUBSEQUENCE_GRIDS:
        raise ValueError(f"grid must be one of {GRIDS + SUBSEQUENCE_GRIDS} (options after ':', e.g. "
                         f"'karras:rho=5') or an array of times; got {grid!r}")
    allowed = GRID_OPTIONS.get(name, {})
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in allowed:
            raise ValueError(f"grid {grid!r}: {name!r} takes options {sorted(allowed) or 'none'} as key=value; "
                             f"got {item!r}")
        try:
            options[key] = allowed[key](value)
        except ValueError:
            raise ValueError(f"grid {grid!r}: {key} must be a {allowed[key].__name__}; got {value!r}") from None
    return name, options


def check_grid_name(grid) -> None:
    """Raise a ValueError unless ``grid`` is None, a valid grid string or an array (config validation)."""
    if isinstance(grid, str):
        parse_grid(grid)


def make_grid(schedule: Schedule, t_start: float, t_end: float, num_steps: int,
              grid: str = "logSNR"):
    """A decreasing grid of num_steps + 1 times by name (a continuous grid of ``GRIDS``, with its options,
    ``parse_grid``), or ``grid`` itself if it is an array."""
    if not isinstance(grid, str):
        ts = jnp.asarray(grid, jnp.result_type(float))
        check_grid(ts)
        return ts
    name, options = parse_grid(grid)
    if name in ("time_uniform", "trailing"):
        return time_uniform(t_start, t_end, num_steps)
    if name == "time_quadratic":
        return time_quadratic(t_start, t_end, num_steps)
    if name == "logSNR":
        return logsnr_uniform(schedule, t_start, t_end, num_steps)
    if name == "karras":
        return karras(schedule, t_start, t_end, num_steps, **options)
    raise ValueError(f"grid {grid!r} is a sub-sequence of a DiscreteDDPM chain, not a continuous grid")


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
