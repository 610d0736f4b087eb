"""Likelihoods: log p(x) through the probability-flow ODE, bits/dim, and the DDPM variational bound.

PF-ODE change of variables (Song et al. 2021 eq. 39; Chen et al. 2018 "instantaneous change of
variables"): along dx/dt = v(x, t),

    d log p_t(x_t) / dt = -div v(x_t, t)
    =>  log p_{t_eps}(x) = log p_T(x_T) + int_{t_eps}^{T} div v(x_t, t) dt.

The augmented state (x, int div v) is integrated forward in time by one diffrax solve under jit.
Each evaluation linearizes the drift once (``jax.linearize``) and pushes tangents through that
linearization: all D basis vectors (exact trace, vmapped) or a few random probes (Hutchinson),
so the drift and the divergence come from a single forward pass.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr

from diffjax.data.spec import to_data_range
from diffjax.parameterization import Denoiser, as_denoiser, check_prediction
from diffjax.samplers.ode import ODE_SOLVERS
from diffjax.schedules import DiscreteDDPM, Schedule, _is_concrete, broadcast_time
from diffjax.sde import pf_ode_drift
from diffjax.sharding import shard_batch, to_host

__all__ = [
    "LikelihoodResult",
    "log_likelihood",
    "bits_per_dim",
    "dequantize",
    "ddpm_vlb",
    "ddpm_vlb_term",
    "ddpm_prior_kl",
    "ddpm_log_variance",
    "discretized_gaussian_log_likelihood",
]

_LN2 = math.log(2.0)


class LikelihoodResult(NamedTuple):
    """Per-example log-density in nats, the model evaluations made, and the latent x_T."""

    logp: jax.Array  # (batch,)
    nfe: jax.Array  # scalar
    z: jax.Array  # (batch, ...)


def _check_x(x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"x must be a floating-point array; got dtype {x.dtype} "
            "(integer data goes through bits_per_dim, which dequantizes it)"
        )
    if x.ndim < 2:
        raise ValueError(f"x must have shape (batch, ...data dims); got rank {x.ndim} shape {x.shape}")
    if _is_concrete(x) and x.is_fully_addressable and not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"x must be finite; got {int(jnp.sum(~jnp.isfinite(x)))} non-finite values")
    return x


def _divergence_fn(trace: str):
    """div v per example from a linearized drift: exact (basis vectors) or Hutchinson (probes)."""

    def exact(jvp_fn, x, probes):
        d = math.prod(x.shape[1:])
        basis = jnp.eye(d, dtype=x.dtype).reshape((d, 1) + x.shape[1:])
        cols = jax.vmap(jvp_fn)(jnp.broadcast_to(basis, (d,) + x.shape))  # (D, B, ...)
        cols = cols.reshape(d, x.shape[0], d)
        return jnp.trace(cols, axis1=0, axis2=2)  # sum_i (J e_i)_i, per example

    def hutchinson(jvp_fn, x, probes):
        jv = jax.vmap(jvp_fn)(probes)  # (K, B, ...)
        axes = tuple(range(2, probes.ndim))
        return jnp.mean(jnp.sum(probes * jv, axis=axes), axis=0)

    return exact if trace == "exact" else hutchinson


def _make_probes(key, num_probes, shape, dtype, probe):
    if probe == "rademacher":
        return jax.random.rademacher(key, (num_probes,) + shape, dtype)
    return jax.random.normal(key, (num_probes,) + shape, dtype)


def log_likelihood(
    model_fn: Callable | Denoiser,
    schedule: Optional[Schedule],
    x,
    *,
    key: Optional[jax.Array] = None,
    prediction: Optional[str] = None,
    cond=None,
    trace: str = "exact",
    num_probes: int = 1,
    probe: str = "rademacher",
    solver: str = "tsit5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_eps: Optional[float] = None,
    t_end: Optional[float] = None,
    prior_logp: Optional[Callable] = None,
    max_steps: int = 4096,
    error_control: str = "per_example",
    coordinates: str = "schedule",
) -> LikelihoodResult:
    """log p_{t_eps}(x) in nats per example via the PF-ODE (Song et al. 2021 eq. 39 / app. D.2).

    Args:
      model_fn: a ``Denoiser`` (``schedule`` None or the same, ``prediction`` omitted) or a
        ``model_fn(x, t[, cond])`` predicting ``prediction`` (default eps).
      x: finite float array (batch, ...) in the model's data space.
      trace: ``"exact"`` (D tangents per evaluation; small D) or ``"hutchinson"`` (Hutchinson
        1989 / FFJORD: ``num_probes`` fixed ``probe`` vectors, rademacher or gaussian, from ``key``).
      solver, rtol, atol: diffrax solver (adaptive tsit5 / dopri5) and its tolerances.
      t_eps, t_end: integration interval, default ``schedule.t_min`` (VE: 0) and ``schedule.t_max``.
      prior_logp: log-density of x_T, default N(0, sigma(t_end)^2 I) (``schedule.prior_logp``);
        a given callable gets z and returns (batch,) nats. Like ``model_fn`` it is a static
        argument of the compiled solve: define it once and reuse it (a fresh lambda per call
        recompiles every time).
      coordinates: ``"schedule"`` (default): integrate in (x, t). ``"scaled"``: integrate in
        (x / alpha, sigma / alpha), Karras et al.'s coordinates (and k-diffusion's), where
        trajectories are nearly straight: the same result, and at loose tolerances (1e-2) a 3-50x
        smaller error on the oracle at a similar step count (tests/test_likelihood.py).
      error_control: ``"per_example"`` (default): the step-size controller bounds each example's
        own error (x and its log-density), so one point cannot drift at loose tolerances.
        ``"batch"``: the RMS over the batch of the x error and, separately, of the log-density
        error (torchdiffeq's norm for a tuple state, what k-diffusion's ``log_likelihood`` uses):
        fewer steps, but single points may drift when the tolerance is loose.
    The step sequence is shared by the batch.
    Returns ``LikelihoodResult(logp, nfe, z)``; differentiable in x (diffrax's checkpointed adjoint).
    """
    x = _check_x(x)
    if prediction is not None:
        check_prediction(prediction)
    denoiser = as_denoiser(model_fn, schedule, prediction)
    schedule = denoiser.schedule
    if trace not in ("exact", "hutchinson"):
        raise ValueError(f"trace must be 'exact' or 'hutchinson'; got {trace!r}")
    if probe not in ("rademacher", "gaussian"):
        raise ValueError(f"probe must be 'rademacher' or 'gaussian'; got {probe!r}")
    if not (isinstance(num_probes, (int, np.integer)) and num_probes >= 1):
        raise ValueError(f"num_probes must be a positive integer; got {num_probes!r}")
    if solver not in ("tsit5", "dopri5"):
        raise ValueError(f"solver must be 'tsit5' or 'dopri5' (adaptive); got {solver!r}")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if _is_concrete(tol) and not tol > 0:
            raise ValueError(f"{name} must be positive; got {tol}")
    if trace == "hutchinson" and key is None:
        raise ValueError("trace='hutchinson' needs key= for its probe vectors")
    if coordinates not in ("schedule", "scaled"):
        raise ValueError(f"coordinates must be 'schedule' or 'scaled'; got {coordinates!r}")
    if error_control not in _ERROR_NORMS:
        raise ValueError(f"error_control must be one of {tuple(_ERROR_NORMS)}; got {error_control!r}")
    t_eps = float(schedule.t_min if t_eps is None else t_eps)
    t_end = float(schedule.t_max if t_end is None else t_end)
    if not 0.0 <= t_eps < t_end <= 1.0:
        raise ValueError(f"need 0 <= t_eps < t_end <= 1; got t_eps={t_eps}, t_end={t_end}")
    if float(schedule.sigma2(t_eps)) == 0.0:
        raise ValueError(f"t_eps={t_eps} has sigma = 0, where the PF-ODE drift is singular; use t_eps > 0")
    return _log_likelihood_jit(
        denoiser, x, key if key is not None else jax.random.PRNGKey(0), cond, prior_logp,
        (trace, int(num_probes), probe, solver, t_eps, t_end, int(max_steps), error_control,
         coordinates),
        jnp.asarray(rtol, x.dtype), jnp.asarray(atol, x.dtype),
    )


def _per_example_norm(scaled_error):
    """Max over examples of each example's RMS scaled error, the x part and the log-density part
    taken separately: every point's log p meets the tolerance (an RMS over the whole batch lets a
    few points drift by many nats at loose tolerances)."""
    x_err, delta_err = scaled_error
    per_x = jnp.sqrt(jnp.mean(jnp.reshape(x_err, (x_err.shape[0], -1)) ** 2, axis=-1))
    return jnp.maximum(jnp.max(per_x), jnp.max(jnp.abs(delta_err)))


def _batch_norm(scaled_error):
    """RMS over the batch of the x error and of the log-density error, the larger of the two
    (torchdiffeq's mixed norm for the tuple state (x, delta logp), as in k-diffusion)."""
    x_err, delta_err = scaled_error
    return jnp.maximum(jnp.sqrt(jnp.mean(x_err**2)), jnp.sqrt(jnp.mean(delta_err**2)))


_ERROR_NORMS = {"per_example": _per_example_norm, "batch": _batch_norm}


def _log_likelihood_impl(denoise, x, key, cond, prior_logp, config, rtol, atol):
    trace, num_probes, probe, solver, t_eps, t_end, max_steps, error_control, coords = config
    schedule = denoise.schedule
    divergence = _divergence_fn(trace)
    probes = None
    if trace == "hutchinson":
        probes = _make_probes(key, num_probes, x.shape, x.dtype, probe)

    if coords == "scaled":
        # Karras et al. 2022 (eq. 4 with s(t) = alpha, sigma(t) -> sigma / alpha): in y = x / alpha
        # and time s = sigma / alpha = exp(-lambda) the PF-ODE is dy/ds = (y - x0_hat) / s,
        # whose trajectories are nearly straight (exactly so for a point mass), so loose
        # tolerances stay accurate (the step count is about that of the schedule's own t). The
        # density of x = alpha y picks up -D log alpha at each end (a linear map at each time).
        def vf(s, state, args):
            y, _ = state
            t = schedule.t_from_log_snr(-jnp.log(s))  # s = sigma / alpha = exp(-lambda)
            a = schedule.alpha(t)
            drift, jvp_fn = jax.linearize(lambda y: (y - denoise(a * y, t, cond).x0) / s, y)
            return drift, divergence(jvp_fn, y, probes)

        s_eps, s_end = jnp.exp(-schedule.log_snr(t_eps)), jnp.exp(-schedule.log_snr(t_end))
        log_a_eps, log_a_end = schedule.log_alpha(t_eps), schedule.log_alpha(t_end)
        a_eps, a_end = jnp.exp(log_a_eps), jnp.exp(log_a_end)
        y0, t0, t1 = x / a_eps, s_eps, s_end
    else:
        def vf(t, state, args):
            y, _ = state
            drift, jvp_fn = jax.linearize(
                lambda y: pf_ode_drift(schedule, denoise(y, t, cond), y, t), y
            )
            return drift, divergence(jvp_fn, y, probes)

        y0, t0, t1 = x, t_eps, t_end

    cls, per_step, at_init = ODE_SOLVERS[solver]
    state0 = (y0, jnp.zeros((x.shape[0],), x.dtype))
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf), cls(), t0=t0, t1=t1, dt0=None, y0=state0,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol, norm=_ERROR_NORMS[error_control]),
        saveat=diffrax.SaveAt(t1=True), max_steps=max_steps,
    )
    z, delta = sol.ys[0][0], sol.ys[1][0]
    if coords == "scaled":
        dim = math.prod(x.shape[1:])
        z = a_end * z
        delta = delta + dim * (log_a_end - log_a_eps)
    logp_z = schedule.prior_logp(z, t_end) if prior_logp is None else prior_logp(z)
    nfe = at_init + per_step * sol.stats["num_steps"]
    return LikelihoodResult(logp_z + delta, jnp.asarray(nfe), z)


_log_likelihood_jit = eqx.filter_jit(_log_likelihood_impl)


# ---- discrete data ------------------------------------------------------------------------


def _check_discrete(u, num_bits):
    u = jnp.asarray(u)
    if u.ndim < 2:
        raise ValueError(f"data must have shape (batch, ...data dims); got shape {u.shape}")
    k = 2**num_bits
    if _is_concrete(u) and u.is_fully_addressable:  # a multi-host array is checked per host before sharding
        arr = np.asarray(u)
        if arr.size and (arr.min() < 0 or arr.max() > k - 1 or np.any(arr != np.round(arr))):
            raise ValueError(
                f"data must be integers in [0, {k - 1}] for num_bits={num_bits}; "
                f"got values in [{arr.min()}, {arr.max()}]"
            )
    return u


def dequantize(key, u, num_bits: int = 8, data_range=(-1.0, 1.0)):
    """Uniform dequantization: x = lo + (hi - lo) (u + U) / 2^n, U ~ U[0, 1)^D (Theis et al. 2016)."""
    noise = jax.random.uniform(key, u.shape, jnp.result_type(float))
    return to_data_range(u.astype(noise.dtype), num_bits, noise, data_range)


def bits_per_dim(
    model_fn: Callable,
    schedule: Schedule,
    u,
    *,
    key: jax.Array,
    num_bits: int = 8,
    data_range=(-1.0, 1.0),
    num_samples: int = 1,
    **likelihood_kwargs,
):
    """Bits/dim of n-bit data under the PF-ODE model with uniform dequantization (an upper bound).

    Derivation of the offset. Let u in {0..K-1}^D, K = 2^n, and v = u + U with U ~ U[0,1)^D, so v has
    unit-volume cells; the model's density in x = lo + (hi - lo) v / K is p(x). Then
    p_v(v) = p(x) |dx/dv| = p(x) ((hi - lo) / K)^D, and by Jensen (Theis et al. 2016, eq. 8)

        log P(u) >= E_U[log p_v(u + U)] = E_U[log p(x)] + D log((hi - lo) / K),

    so  bits/dim = -E_U[log p(x)] / (D ln 2) + log2(K / (hi - lo)),
    e.g. + 7 for 8-bit data scaled to [-1, 1] and + 8 for [0, 1]: the whole "offset".
    The expectation is averaged over ``num_samples`` dequantization draws.
    Returns (bpd per example, total nfe).
    """
    u = _check_discrete(u, num_bits)
    lo, hi = data_range
    if not hi > lo:
        raise ValueError(f"data_range must have hi > lo; got {data_range}")
    d = math.prod(u.shape[1:])
    k = 2**num_bits
    offset = math.log2(k / (hi - lo))
    total, nfe = 0.0, 0
    keys = jax.random.split(key, 2 * num_samples)
    for i in range(num_samples):
        x = dequantize(keys[2 * i], u, num_bits, data_range)
        res = log_likelihood(model_fn, schedule, x, key=keys[2 * i + 1], **likelihood_kwargs)
        total = total + res.logp
        nfe += int(res.nfe)
    logp = total / num_samples
    return -logp / (d * _LN2) + offset, nfe


# ---- the discrete DDPM bound ----------------------------------------------------------------


def _gaussian_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) summed over the data dims."""
    kl = 0.5 * (log_var2 - log_var1 + jnp.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * jnp.exp(-log_var2) - 1.0)
    return jnp.sum(kl.reshape(kl.shape[0], -1), axis=-1)


def discretized_gaussian_log_likelihood(x, mean, log_scale, num_bits: int = 8, data_range=(-1.0, 1.0)):
    """log P(x) of a Gaussian discretized to 2^n bins on ``data_range``, edges open (Ho et al. sec. 3.3).

    x lies on the bin centres lo + (hi - lo) i / (K - 1); summed over the data dims.
    """
    lo, hi = data_range
    half_bin = 0.5 * (hi - lo) / (2**num_bits - 1)
    inv_std = jnp.exp(-log_scale)
    upper = inv_std * (x - mean + half_bin)
    lower = inv_std * (x - mean - half_bin)
    log_cdf_upper = log_ndtr(upper)
    log_sf_lower = log_ndtr(-lower)
    # log(Phi(upper) - Phi(lower)) = log Phi(upper) + log1p(-exp(log Phi(lower) - log Phi(upper)))
    log_delta = log_cdf_upper + jnp.log1p(-jnp.exp(jnp.minimum(log_ndtr(lower) - log_cdf_upper, -1e-12)))
    logp = jnp.where(
        x <= lo + half_bin, log_cdf_upper, jnp.where(x >= hi - half_bin, log_sf_lower, log_delta)
    )
    return jnp.sum(logp.reshape(logp.shape[0], -1), axis=-1)


def ddpm_vlb(
    model_fn: Callable | Denoiser,
    schedule: Optional[DiscreteDDPM],
    x0,
    *,
    key: jax.Array,
    prediction: Optional[str] = None,
    cond=None,
    decoder: str = "discretized",
    num_bits: int = 8,
    data_range=(-1.0, 1.0),
    variance: str = "posterior",
):
    """The DDPM variational bound L_T + sum_{t>1} L_{t-1} + L_0 in bits/dim (Ho et al. 2020 eq. 5).

    L_T = KL(q(x_T|x_0) || N(0, I)); L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) with the
    model mean from the schedule's posterior at x0_hat and variance beta_tilde ("posterior") or
    beta ("large"), one x_t ~ q(x_t|x_0) per step; L_0 = -log p(x_0|x_1) with a discretized Gaussian
    decoder (bin-centred n-bit data in ``data_range``) or, with ``decoder="gaussian"``, a continuous
    Gaussian density (a bound on a density, for continuous data). The decoder variance is step 1's
    beta ("large") or beta_tilde of step 2 (Ho et al.'s clipped log-variance).
    Returns (bits/dim per example, dict of per-example terms in nats).
    """
    if prediction is not None:
        check_prediction(prediction)
    denoiser = as_denoiser(model_fn, schedule, prediction)
    schedule = denoiser.schedule
    if not isinstance(schedule, DiscreteDDPM):
        raise ValueError(f"ddpm_vlb needs a DiscreteDDPM schedule; got {type(schedule).__name__}")
    x0 = _check_x(x0)
    if decoder not in ("discretized", "gaussian"):
        raise ValueError(f"decoder must be 'discretized' or 'gaussian'; got {decoder!r}")
    if schedule.num_timesteps < 2:
        raise ValueError(f"ddpm_vlb needs a chain of at least 2 steps; got num_timesteps={schedule.num_timesteps}")
    if variance not in ("posterior", "large"):
        raise ValueError(f"variance must be 'posterior' or 'large'; got {variance!r}")
    if decoder == "discretized" and _is_concrete(x0):
        lo, hi = data_range
        arr = np.asarray(x0)
        if arr.min() < lo - 1e-6 or arr.max() > hi + 1e-6:
            raise ValueError(f"x0 must lie in data_range {data_range}; got [{arr.min()}, {arr.max()}]")
    return _ddpm_vlb_jit(denoiser, x0, key, cond, (decoder, num_bits, tuple(data_range), variance))


VLB_VARIANCES = ("posterior", "large", "learned")


def ddpm_log_variance(schedule: DiscreteDDPM, t, variance: str = "posterior", frac=None):
    """log variance of p(x_{n-1} | x_n) at step n = tN (Ho et al. 2020 sec. 3.2; Nichol & Dhariwal eq. 15).

    "posterior": beta_tilde_n, "large": beta_n, "learned": frac log beta_n + (1 - frac) log beta_tilde_n
    with frac in [0, 1] from the network. beta_tilde_1 = 0, so step 1 uses beta_tilde_2 (the clipped
    log-variance of Ho's and Nichol's code).
    """
    dt = 1.0 / schedule.num_timesteps
    log_beta = jnp.log(schedule.transition(t - dt, t)[1])
    t_c = jnp.maximum(t, 2.0 * dt)
    log_beta_tilde = jnp.log(schedule.posterior(t_c - dt, t_c)[2])
    if variance == "posterior":
        return log_beta_tilde
    if variance == "large":
        return log_beta
    return frac * log_beta + (1.0 - frac) * log_beta_tilde


def ddpm_vlb_term(schedule: DiscreteDDPM, x0, x_t, t, x0_hat, log_var, *, decoder: str = "discretized",
                  num_bits: int = 8, data_range=(-1.0, 1.0)):
    """One term of the DDPM bound in nats per example at step n = tN (Ho et al. 2020 eq. 5).

    n > 1: L_{n-1} = KL(q(x_{n-1} | x_n, x_0) || N(mu(x_n, x0_hat), e^log_var)), mu the posterior mean
    at x0_hat (eq. 7); n = 1: L_0 = -log p(x_0 | x_1) with mean x0_hat, a Gaussian discretized to
    2^num_bits bins on ``data_range`` or, with ``decoder="gaussian"``, a continuous density.
    ``t`` is a scalar or per-example (batch,) time; ``log_var`` broadcasts against x0.
    """
    dt = 1.0 / schedule.num_timesteps
    t = broadcast_time(jnp.asarray(t, x0.dtype), x0)
    first = t < 1.5 * dt
    t_kl = jnp.where(first, 2.0 * dt, t)  # keeps the unused KL branch finite (q(x_0|x_1,x_0) is a point mass)
    c_xt, c_x0, var_q = schedule.posterior(t_kl - dt, t_kl)
    kl = _gaussian_kl(c_xt * x_t + c_x0 * x0, jnp.log(var_q), c_xt * x_t + c_x0 * x0_hat,
                      jnp.broadcast_to(log_var, x0.shape))
    if decoder == "discretized":
        l_0 = -discretized_gaussian_log_likelihood(x0, x0_hat, 0.5 * log_var, num_bits, data_range)
    else:
        l_0 = 0.5 * jnp.sum(((x0 - x0_hat) ** 2 * jnp.exp(-log_var) + log_var + jnp.log(2 * jnp.pi))
                            .reshape(x0.shape[0], -1), -1)
    return jnp.where(first.reshape(-1), l_0, kl)


def ddpm_prior_kl(schedule: DiscreteDDPM, x0):
    """L_T = KL(q(x_T | x_0) || N(0, I)) in nats per example (Ho et al. 2020 eq. 5)."""
    t_T = schedule.time(schedule.num_timesteps)
    mean = schedule.alpha(t_T) * x0
    return _gaussian_kl(mean, jnp.log(schedule.sigma2(t_T)) * jnp.ones_like(x0), jnp.zeros_like(x0),
                        jnp.zeros_like(x0))


def _ddpm_vlb_impl(denoise, x0, key, cond, config):
    decoder, num_bits, data_range, variance = config
    schedule = denoise.schedule
    n = schedule.num_timesteps
    d = math.prod(x0.shape[1:])
    term_kw = dict(decoder=decoder, num_bits=num_bits, data_range=data_range)

    def term(t, k):
        x_t = schedule.marginal(x0, t, jax.random.normal(k, x0.shape, x0.dtype))
        x0_hat = denoise(x_t, t, cond).x0
        return ddpm_vlb_term(schedule, x0, x_t, t, x0_hat, ddpm_log_variance(schedule, t, variance), **term_kw)

    def body(carry, inp):
        return carry + term(*inp), None

    # L_{n-1}, n = 2..N: one x_n ~ q(x_n | x_0) per step
    k_terms, k_0 = jax.random.split(key)
    times = schedule.time(jnp.arange(2, n + 1))
    l_mid, _ = jax.lax.scan(body, jnp.zeros((x0.shape[0],), x0.dtype), (times, jax.random.split(k_terms, n - 1)))
    l_T = ddpm_prior_kl(schedule, x0)
    l_0 = term(schedule.time(1), k_0)
    total = l_T + l_mid + l_0
    return total / (d * _LN2), {"prior": l_T, "diffusion": l_mid, "decoder": l_0, "total": total}


_ddpm_vlb_jit = eqx.filter_jit(_ddpm_vlb_impl)


# ---- evaluation entry point -------------------------------------------------------------------


def evaluate_nll(
    model_fn: Callable,
    schedule: Schedule,
    batches,
    *,
    key: jax.Array,
    discrete: bool = True,
    num_bits: int = 8,
    data_range=(-1.0, 1.0),
    num_samples: int = 1,
    mesh=None,
    **likelihood_kwargs,
):
    """Test NLL over an iterable of batches: bits/dim for n-bit integer data, nats/dim otherwise.

    With a ``mesh`` (``diffjax.sharding``) each batch, held in full by every process, is split over
    its batch axes (zero-padded to a multiple of the shards; the padding's values are dropped).
    Returns a dict with the mean, its standard error over examples, the number of examples and the
    model evaluations made.
    """
    values, nfe = [], 0
    for i, batch in enumerate(batches):
        k = jax.random.fold_in(key, i)
        n = len(batch)
        if mesh is not None:
            if discrete:
                _check_discrete(batch, num_bits)
            batch, n = shard_batch(batch, mesh)
        if discrete:
            bpd, used = bits_per_dim(model_fn, schedule, batch, key=k, num_bits=num_bits,
                                     data_range=data_range, num_samples=num_samples, **likelihood_kwargs)
            values.append(to_host(bpd)[:n])
            nfe += used
        else:
            batch = _check_x(batch)
            res = log_likelihood(model_fn, schedule, batch, key=k, **likelihood_kwargs)
            values.append(-to_host(res.logp)[:n] / math.prod(batch.shape[1:]))
            nfe += int(res.nfe)
    if not values:
        raise ValueError("batches is empty")
    v = np.concatenate(values)
    unit = "bits/dim" if discrete else "nats/dim"
    return {"mean": float(v.mean()), "stderr": float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0,
            "num_examples": int(v.size), "nfe": int(nfe), "unit": unit}
