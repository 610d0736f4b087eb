"""Consistency models (Song et al. 2023, "CM"; Song & Dhariwal 2023, "iCT") on any diffjax schedule.

A consistency function maps every point (x_t, t) of a probability-flow ODE trajectory to the trajectory's
origin. CMs are usually written on the VE/EDM process x = x0 + s eps, s in [0.002, 80]. A diffjax schedule
x_t = alpha x0 + sigma eps is that process in the scaled variable y = x_t / alpha with
s = sigma / alpha = exp(-lambda(t)) (the same ODE trajectories, Karras et al. 2022 sec. 2), so here the CM
lives in (y, s) and every schedule works; times come back through ``schedule.t_from_log_snr(-log s)``.

Parameterization (CM paper appendix C): f(x, t) = c_skip(s) y + c_out(s) F with
c_skip = sd^2 / ((s - s_min)^2 + sd^2), c_out = sd (s - s_min) / sqrt(sd^2 + s^2), sd = sigma_data and
s_min = s(t_min). The network is any diffjax network of a prediction type (the teacher's, for CD): its
x0 estimate x0_hat is read as the EDM-preconditioned output F = (x0_hat - c_skip_edm y) / c_out_edm
(EDM Table 1: c_skip_edm = sd^2 / (s^2 + sd^2), c_out_edm = s sd / sqrt(s^2 + sd^2)), so that a CD
student initialised from the teacher's weights starts at f ~ x0_hat for s >> s_min (CM paper: CD starts
from the teacher). With c_out / c_out_edm = 1 - s_min / s this is

    f = c_skip y + (1 - s_min / s) (x0_hat - c_skip_edm y),

and at t <= t_min f = y exactly (the boundary condition, bit for bit: the output is selected there).
On schedules with alpha = 1 (VE) y = x, so f(x, t_min) = x.

Discretisation (CM paper sec. 5 / EDM eq. 5): N boundaries s_1 = s_min < ... < s_N = s_max with
s_i = (s_min^(1/rho) + (i-1)/(N-1) (s_max^(1/rho) - s_min^(1/rho)))^rho, rho = 7; N may be traced.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from diffjax.parameterization import Denoised, check_prediction, from_x0_eps, to_x0_eps
from diffjax.samplers.ancestral import ddim_step, nfe_stats, scan_grid
from diffjax.schedules import Schedule, broadcast_time

__all__ = ["LOSSES", "SOLVERS", "CURRICULA", "NOISE_SAMPLINGS", "WEIGHTINGS", "ConsistencySettings",
           "scaled_sigma", "time_of_sigma", "karras_sigma", "consistency_coeffs", "consistency_x0",
           "make_consistency_fn", "as_prediction", "teacher_step", "ct_num_scales", "ct_ema_rate", "ict_num_scales",
           "lognormal_index_logits", "pseudo_huber_c", "distance", "make_consistency_loss",
           "consistency_sample"]

LOSSES = ("l2", "l1", "pseudo_huber")  # LPIPS (the CM paper's image metric) needs a downloaded VGG: not offered
SOLVERS = ("ddim", "euler", "heun")
CURRICULA = ("fixed", "ct", "ict")
NOISE_SAMPLINGS = ("uniform", "lognormal")
WEIGHTINGS = ("uniform", "ict")


# ---- the VE view of a schedule ------------------------------------------------------------------


def scaled_sigma(schedule: Schedule, t):
    """s(t) = sigma / alpha = exp(-lambda(t)): the noise level of the scaled variable x_t / alpha (VE view)."""
    return jnp.exp(-schedule.log_snr(t))


def time_of_sigma(schedule: Schedule, s):
    """The time t with sigma(t) / alpha(t) = s, through the schedule's inverse log-SNR (lambda = -log s)."""
    return schedule.t_from_log_snr(-jnp.log(s))


def karras_sigma(i, n, s_min, s_max, rho: float = 7.0):
    """Boundary i (0-based, 0 <= i <= n - 1) of n Karras noise levels (EDM eq. 5, increasing: s_0 = s_min);
    ``i`` and ``n`` may be traced. Endpoints are exact."""
    i = jnp.asarray(i)
    n = jnp.asarray(n)
    lo, hi = s_min ** (1.0 / rho), s_max ** (1.0 / rho)
    frac = i.astype(jnp.result_type(float)) / (n - 1).astype(jnp.result_type(float))
    s = (lo + frac * (hi - lo)) ** rho
    return jnp.where(i <= 0, s_min, jnp.where(i >= n - 1, s_max, s))


# ---- the consistency function -------------------------------------------------------------------


def consistency_coeffs(s, s_min, sigma_data):
    """(c_skip, c_out) of the consistency parameterization (CM paper appendix C, in s = sigma / alpha)."""
    d = s - s_min
    c_skip = sigma_data**2 / (d**2 + sigma_data**2)
    c_out = sigma_data * d / jnp.sqrt(sigma_data**2 + s**2)
    return c_skip, c_out


def consistency_x0(x0_hat, x, t, schedule: Schedule, t_min, sigma_data: float):
    """f(x, t) = c_skip y + c_out F with F the EDM output of the network's x0 estimate (module docstring);
    f(x, t) = x / alpha(t) exactly at t <= t_min."""
    tb = broadcast_time(jnp.asarray(t, x.dtype), x)
    y = x / schedule.alpha(tb)
    s, s_min = scaled_sigma(schedule, tb), scaled_sigma(schedule, t_min)
    c_skip, _ = consistency_coeffs(s, s_min, sigma_data)
    c_skip_edm = sigma_data**2 / (s**2 + sigma_data**2)  # EDM Table 1
    # c_out F = (c_out / c_out_edm) (x0_hat - c_skip_edm y), c_out / c_out_edm = 1 - s_min / s
    f = c_skip * y + (1.0 - s_min / s) * (x0_hat - c_skip_edm * y)
    return jnp.where(tb <= t_min, y, f)


def make_consistency_fn(net_fn: Callable, schedule: Schedule, prediction: str, *, t_min, sigma_data: float):
    """``cm(x, t, cond) -> x0``: the consistency function of a network ``net_fn(x, t, cond)`` that predicts
    ``prediction`` (a model_fn of prediction type "x0" for ``diffjax.sample``)."""
    check_prediction(prediction)

    def cm(x, t, cond=None):
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
        x0_hat = to_x0_eps(net_fn(x, t, cond), prediction, x, t, schedule).x0
        return consistency_x0(x0_hat, x, t, schedule, t_min, sigma_data)

    return cm


def as_prediction(cm: Callable, schedule: Schedule, prediction: str):
    """``model_fn(x, t, cond)`` returning the consistency function's x0 as a prediction of type ``prediction``
    (for machinery that reads a run's network by ``config.diffusion.prediction``)."""

    def model_fn(x, t, cond=None):
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
        x0 = cm(x, t, cond)
        tb = broadcast_time(t, x)
        eps = (x - schedule.alpha(tb) * x0) / schedule.sigma(tb)
        return from_x0_eps(Denoised(x0, eps), prediction, x, t, schedule)

    return model_fn


# ---- the teacher's ODE step (CD) ----------------------------------------------------------------


def _velocity(schedule, denoised: Denoised, x, t):
    # PF-ODE dx/dt = alpha'(t) E[x0 | x_t] + sigma'(t) E[eps | x_t] (the flow form of the probability-flow ODE)
    return from_x0_eps(denoised, "flow", x, t, schedule)


def teacher_step(denoiser: Callable, schedule: Schedule, x, t, s, cond=None, solver: str = "ddim"):
    """One PF-ODE solver step x_t -> x_s of the teacher (CM paper eq. 7 / Alg. 2): "ddim" (the exponential-
    integrator Euler step, DDIM eq. 12; Euler in the VE variable, the CM paper's Euler), "euler" / "heun"
    (Euler, and Heun = EDM Alg. 1's second-order step, on dx/dt). ``t``, ``s`` of shape (batch,)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}")
    den = denoiser(x, t, cond)
    if solver == "ddim":
        return ddim_step(schedule, den, broadcast_time(s, x), broadcast_time(t, x))
    h = broadcast_time(s - t, x)
    v1 = _velocity(schedule, den, x, t)
    x_euler = x + h * v1
    if solver == "euler":
        return x_euler
    v2 = _velocity(schedule, denoiser(x_euler, s, cond), x_euler, s)
    return x + 0.5 * h * (v1 + v2)


# ---- schedules of the discretisation, target EMA and loss -----------------------------------------


def ct_num_scales(k, total_steps: int, s0: int, s1: int):
    """N(k) = ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1 (CM paper appendix C, CT); k may be traced."""
    k = jnp.asarray(k, jnp.result_type(float))
    inner = jnp.sqrt(k / total_steps * ((s1 + 1) ** 2 - s0**2) + s0**2)
    return (jnp.ceil(inner - 1.0) + 1.0).astype(jnp.int32)


def ct_ema_rate(n, s0: int, mu0: float):
    """mu(k) = exp(s0 log mu0 / N(k)) (CM paper appendix C, CT), given N(k) = ``n``."""
    return jnp.exp(s0 * math.log(mu0) / jnp.asarray(n, jnp.result_type(float)))


def ict_num_scales(k, total_steps: int, s0: int, s1: int):
    """N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2 floor(s1 / s0) + 1)) (iCT eq. 9)."""
    k_prime = max(math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)), 1)
    doublings = jnp.floor_divide(jnp.asarray(k, jnp.int32), k_prime)
    doublings = jnp.minimum(doublings, math.ceil(math.log2(s1 / s0)))  # past s1 already (no int32 overflow)
    return jnp.minimum(s0 * 2**doublings, s1).astype(jnp.int32) + 1


def lognormal_index_logits(sigmas, n, p_mean: float, p_std: float):
    """log p(i) of interval [s_i, s_{i+1}], i < n - 1 (iCT sec. 3.5: p(i) proportional to
    erf((log s_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((log s_i - P_mean) / (sqrt 2 P_std))); ``sigmas``
    holds boundaries 0..M-1 (M static), those at i >= n are masked out."""
    cdf = jax.scipy.special.erf((jnp.log(sigmas) - p_mean) / (math.sqrt(2.0) * p_std))
    mass = cdf[1:] - cdf[:-1]
    valid = jnp.arange(mass.shape[0]) < n - 1
    return jnp.where(valid, jnp.log(jnp.maximum(mass, 1e-30)), -jnp.inf)


def pseudo_huber_c(dim: int) -> float:
    """The pseudo-Huber constant c = 0.00054 sqrt(d) of iCT sec. 3.3 for data of d dimensions."""
    return 0.00054 * math.sqrt(dim)


def distance(a, b, metric: str, c: Optional[float] = None):
    """Per-example d(a, b): "l2" mean squared error, "l1" mean absolute error (CM paper sec. 3; means over
    dimensions), "pseudo_huber" sqrt(||a - b||^2 + c^2) - c (iCT eq. 8)."""
    diff = (a - b).reshape(a.shape[0], -1)
    if metric == "l2":
        return jnp.mean(diff**2, axis=-1)
    if metric == "l1":
        return jnp.mean(jnp.abs(diff), axis=-1)
    if metric == "pseudo_huber":
        c = pseudo_huber_c(diff.shape[-1]) if c is None else c
        return jnp.sqrt(jnp.sum(diff**2, axis=-1) + c**2) - c
    raise ValueError(f"metric must be one of {LOSSES}; got {metric!r}")


@dataclasses.dataclass(frozen=True)
class ConsistencySettings:
    """Everything a consistency loss needs besides the networks (``config.consistency`` of the task).

    ``num_scales``: N of curriculum "fixed"; ``curriculum``: "fixed", "ct" (``ct_num_scales`` and its
    ``ct_ema_rate`` target EMA) or "ict" (``ict_num_scales``) from ``s0`` to ``s1`` over ``total_steps``;
    ``mu0``: the target EMA rate (curriculum "ct": mu0 of mu(k)); ``target_ema``: False sets
    theta- = stop_gradient(theta) (iCT); ``loss``, ``huber_c`` (None: ``pseudo_huber_c``); ``solver``:
    the teacher's step (CD); ``sigma_data``, ``sigma_min``, ``sigma_max``, ``rho``: the parameterization
    and the discretisation in s = sigma / alpha; ``noise_sampling`` "uniform" or "lognormal"
    (``p_mean``, ``p_std``); ``weighting`` "uniform" or "ict" (1 / (s_{i+1} - s_i), iCT sec. 3.4).
    """

    sigma_min: float
    sigma_max: float
    num_scales: int = 18
    curriculum: str = "fixed"
    s0: int = 2
    s1: int = 150
    total_steps: int = 1
    mu0: float = 0.95
    target_ema: bool = True
    loss: str = "l2"
    huber_c: Optional[float] = None
    solver: str = "heun"
    sigma_data: float = 0.5
    rho: float = 7.0
    noise_sampling: str = "uniform"
    p_mean: float = -1.1
    p_std: float = 2.0
    weighting: str = "uniform"

    @property
    def max_scales(self) -> int:
        """The most boundaries N(k) reaches (a static bound for arrays over the discretisation)."""
        return self.num_scales if self.curriculum == "fixed" else self.s1 + 1

    def num_scales_at(self, k):
        """N at training step ``k`` (traced)."""
        if self.curriculum == "ct":
            return ct_num_scales(k, self.total_steps, self.s0, self.s1)
        if self.curriculum == "ict":
            return ict_num_scales(k, self.total_steps, self.s0, self.s1)
        return jnp.asarray(self.num_scales, jnp.int32)

    def ema_rate_at(self, k):
        """The target network's EMA rate mu at step ``k`` (0 where ``target_ema`` is off)."""
        if not self.target_ema:
            return jnp.zeros(())
        if self.curriculum == "ct":
            return ct_ema_rate(self.num_scales_at(k), self.s0, self.mu0)
        return jnp.asarray(self.mu0)

    def t_min(self, schedule: Schedule):
        """The consistency function's boundary time t_min = t(s_min)."""
        return time_of_sigma(schedule, jnp.asarray(self.sigma_min, jnp.result_type(float)))


def _sample_interval(settings: ConsistencySettings, key, n, batch: int):
    """Lower boundary index i (0 <= i < n - 1) of each example's interval [s_i, s_{i+1}]."""
    if settings.noise_sampling == "lognormal":
        sig = karras_sigma(jnp.arange(settings.max_scales), n, settings.sigma_min, settings.sigma_max, settings.rho)
        logits = lognormal_index_logits(sig, n, settings.p_mean, settings.p_std)
        return jax.random.categorical(key, logits, shape=(batch,))
    return jax.random.randint(key, (batch,), 0, n - 1)


def make_consistency_loss(net_fn: Callable, schedule: Schedule, prediction: str, settings: ConsistencySettings,
                          teacher: Optional[Callable] = None):
    """``loss_fn(params, batch, key, ctx) -> (loss, aux)`` and ``update_extra(ctx, params)`` of consistency
    distillation (``teacher`` given; CM paper Alg. 2) or training (Alg. 3; iCT with ``target_ema`` off).

    ``net_fn(params, x, t, cond, rng)``: the student network in training mode (dropout from ``rng``; the
    online and target passes share it, as the reference code does); ``teacher(extra, x, t, cond) ->
    Denoised``: the teacher's denoiser, reading its weights from ``ctx.extra``. The target network's weights
    are ``ctx.extra["target"]`` (EMA with rate mu, updated after each step), or the online ones under
    ``stop_gradient`` without ``target_ema``. The step index k of the curriculum is ``ctx.step`` (traced).
    """
    check_prediction(prediction)
    t_min = settings.t_min(schedule)

    def f(params, x, t, cond, rng):
        cm = make_consistency_fn(lambda x_, t_, c_: net_fn(params, x_, t_, c_, rng), schedule, prediction,
                                 t_min=t_min, sigma_data=settings.sigma_data)
        return cm(x, t, cond)

    def loss_fn(params, batch, key, ctx):
        x0 = batch["x"]
        cond = batch.get("label")
        b = x0.shape[0]
        k_i, k_z, k_drop = jax.random.split(key, 3)
        n = settings.num_scales_at(ctx.step)
        i = _sample_interval(settings, k_i, n, b)
        s_lo = karras_sigma(i, n, settings.sigma_min, settings.sigma_max, settings.rho)
        s_hi = karras_sigma(i + 1, n, settings.sigma_min, settings.sigma_max, settings.rho)
        t_lo = jnp.where(i == 0, t_min, time_of_sigma(schedule, s_lo))  # the boundary time, bit for bit
        t_hi = time_of_sigma(schedule, s_hi)
        z = jax.random.normal(k_z, x0.shape, x0.dtype)
        x_hi = schedule.marginal(x0, t_hi, z)
        if teacher is None:
            x_lo = schedule.marginal(x0, t_lo, z)  # CT: the same z (CM paper Alg. 3)
        else:
            teach = jax.tree_util.Partial(teacher, ctx.extra)
            x_lo = jax.lax.stop_gradient(teacher_step(teach, schedule, x_hi, t_hi, t_lo, cond, settings.solver))
        target_params = ctx.extra["target"] if settings.target_ema else params
        f_target = jax.lax.stop_gradient(f(target_params, x_lo, t_lo, cond, k_drop))
        f_online = f(params, x_hi, t_hi, cond, k_drop)
        d = distance(f_online, f_target, settings.loss, settings.huber_c)
        # lambda(s_i) = 1 / (s_{i+1} - s_i) (iCT sec. 3.4) or 1
        w = 1.0 / (s_hi - s_lo) if settings.weighting == "ict" else jnp.ones_like(d)
        return jnp.mean(w * d), {"num_scales": n}

    def update_extra(ctx, params):
        if not settings.target_ema:
            return ctx.extra
        # theta- <- stop_grad(mu theta- + (1 - mu) theta) with mu of the step just taken (CM paper Alg. 2-3)
        mu = settings.ema_rate_at(ctx.step - 1)
        target = jax.tree.map(lambda a, p: mu.astype(a.dtype) * a + (1 - mu.astype(a.dtype)) * p,
                              ctx.extra["target"], params)
        return {**ctx.extra, "target": target}

    return loss_fn, update_extra


# ---- multistep consistency sampling -------------------------------------------------------------


def consistency_sample(denoiser: Callable, schedule: Schedule, x_T, ts, key, cond=None, sigma_min: float = 0.002):
    """Multistep consistency sampling (CM paper Alg. 1) along the decreasing grid ``ts``: at each interval
    (t_i, t_{i+1}) x0 = f(x, t_i), then x = alpha(t_{i+1}) x0 + sqrt(sigma(t_{i+1})^2 - (alpha(t_{i+1})
    s_min)^2) z, the paper's x0 + sqrt(tau^2 - eps^2) z in the scaled variable. ``denoiser``: the consistency
    function as a Denoiser (its x0); ``diffjax.sample`` adds the final f at the last time. Returns (x, stats)."""
    if key is None:
        raise ValueError("consistency sampling adds fresh noise at each step and needs a PRNG key")

    def step(x, t, s, k):
        x0 = denoiser(x, t, cond).x0
        alpha, sigma2 = schedule.alpha(s), schedule.sigma2(s)
        std = jnp.sqrt(jnp.maximum(sigma2 - (alpha * sigma_min) ** 2, 0.0))
        return alpha * x0 + std * jax.random.normal(k, x.shape, x.dtype)

    return scan_grid(step, x_T, ts, key, 1)
