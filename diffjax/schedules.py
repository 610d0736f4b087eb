"""Noise schedules: the one place where alpha(t), sigma(t), the log-SNR and the SDE live.

Convention (shared by the whole library)::

    x_t = alpha(t) * x_0 + sigma(t) * eps,    eps ~ N(0, I),    t in [0, 1]

t = 0 is data, t = 1 is the prior end. ``log_snr(t) = lambda(t) = log(alpha / sigma)`` (the
DPM-Solver convention: half of VDM's ``gamma``). Every schedule implements three primitives,
each in a numerically stable closed form:

* ``_log_alpha(t)``         log alpha(t)
* ``_sigma2(t)``            sigma(t)^2, written so that its t-derivative is finite at both ends
* ``_t_from_log_snr(lam)``  the exact inverse of lambda(t)

Everything else is derived here, once: alpha, sigma, lambda, the drift ``f = dlog(alpha)/dt``
and ``g^2 = d(sigma^2)/dt - 2 f sigma^2`` (by ``jax.jvp``; "A Survey on Diffusion Models Through
SDE", forward SDE dx = f x dt + g dw), forward marginals, transition kernels q(x_t | x_s),
Gaussian posteriors q(x_s | x_t, x_0) and the prior.

Endpoints: values are exact. Where sigma(0) = 0 (VP, sub-VP, cosine, RF, discrete) lambda(0) is
+inf, and where alpha(1) = 0 (cosine, RF) lambda(1) is -inf and f(1), g^2(1) are infinite,
as in the mathematics; nothing is ever NaN, and ``t_from_log_snr`` maps +-inf back to the ends.

Schedules are ``equinox.Module`` pytrees: pass them through ``jit``/``vmap``/diffrax freely.
"""

from __future__ import annotations

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Schedule",
    "VPLinear",
    "VPCosine",
    "SubVP",
    "VE",
    "RectifiedFlow",
    "DiscreteDDPM",
    "broadcast_time",
    "check_time",
]


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_time(t, name: str = "t"):
    """Raise a ValueError naming ``name`` if a concrete ``t`` leaves [0, 1] (skipped under tracing).

    The validation entry points run on their time arguments; ``Schedule`` methods do not check.
    """
    if _is_concrete(t):
        arr = np.asarray(t, dtype=np.float64)
        if arr.size and not np.all((arr >= 0.0) & (arr <= 1.0)):
            raise ValueError(
                f"{name} must lie in [0, 1]; got values in [{arr.min()}, {arr.max()}]"
            )
    return t


def _as_float(t):
    return jnp.asarray(t, dtype=jnp.result_type(float))


def _as_time(t):
    """``t`` as an array; a floating dtype is kept (no host round-trip, no upcast), ints become float."""
    t = jnp.asarray(t)
    return t if jnp.issubdtype(t.dtype, jnp.floating) else t.astype(jnp.result_type(float))


def broadcast_time(t, x):
    """Reshape a scalar or per-example ``t`` of shape (batch,) to broadcast against ``x``."""
    t = jnp.asarray(t)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(
            f"t must be a scalar or have shape (batch,) = ({x.shape[0]},); got shape {t.shape}"
        )
    return t.reshape(t.shape + (1,) * (x.ndim - 1))


class Schedule(eqx.Module):
    """A Gaussian diffusion process x_t = alpha(t) x_0 + sigma(t) eps on t in [0, 1]."""

    # ---- primitives (implemented by each schedule, no argument checks) -------------------
    @abc.abstractmethod
    def _log_alpha(self, t): ...

    @abc.abstractmethod
    def _sigma2(self, t): ...

    @abc.abstractmethod
    def _t_from_log_snr(self, lam): ...

    # alpha and sigma themselves; overridden where a direct form stays differentiable at the ends.
    def _alpha(self, t):
        return jnp.exp(self._log_alpha(t))

    def _sigma(self, t):
        return jnp.sqrt(self._sigma2(t))

    # Default sampling interval [t_min, t_max]: where samplers start (t_max) and stop (t_min) by
    # default. t_min > 0 where sigma(0) = 0 (score_sde samples down to eps = 1e-3).
    t_min = 1e-3
    t_max = 1.0

    # ---- derived quantities (the only definitions in the library) ------------------------
    def _log_snr(self, t):
        # lambda = log(alpha / sigma); log(0) = -inf at sigma = 0 gives lambda = +inf, not NaN.
        return self._log_alpha(t) - 0.5 * jnp.log(self._sigma2(t))

    def _f(self, t):
        # f(t) = d log(alpha)/dt  (drift of the forward SDE, SDE survey eq. for f)
        return jax.jvp(self._log_alpha, (t,), (jnp.ones_like(t),))[1]

    def _g2(self, t):
        # g(t)^2 = d sigma^2/dt - 2 f(t) sigma^2  (diffusion of the forward SDE)
        sigma2, dsigma2 = jax.jvp(self._sigma2, (t,), (jnp.ones_like(t),))
        return dsigma2 - 2.0 * self._f(t) * sigma2

    # Public methods: no host-side checks, so they are as cheap inside jit as the primitives;
    # entry points (samplers, losses, likelihoods) validate concrete times with ``check_time``.
    def log_alpha(self, t):
        """log alpha(t)."""
        return self._log_alpha(_as_time(t))

    def alpha(self, t):
        """Signal scale alpha(t) of q(x_t | x_0) = N(alpha x_0, sigma^2 I)."""
        return self._alpha(_as_time(t))

    def sigma2(self, t):
        """Noise variance sigma(t)^2."""
        return self._sigma2(_as_time(t))

    def sigma(self, t):
        """Noise scale sigma(t)."""
        return self._sigma(_as_time(t))

    def log_snr(self, t):
        """lambda(t) = log(alpha(t) / sigma(t)), strictly decreasing in t."""
        return self._log_snr(_as_time(t))

    def t_from_log_snr(self, lam):
        """Exact inverse of ``log_snr``; lambda outside [lambda(1), lambda(0)] maps to the ends."""
        lam = _as_time(lam)
        one = jnp.ones((), lam.dtype)
        lam = jnp.clip(lam, self._log_snr(one), self._log_snr(0.0 * one))
        return self._t_from_log_snr(lam)

    def d_alpha_sigma(self, t):
        """(d alpha/dt, d sigma/dt), by forward-mode differentiation of the primitives."""
        t = _as_time(t)
        ones = jnp.ones_like(t)
        d_alpha = jax.jvp(self._alpha, (t,), (ones,))[1]
        d_sigma = jax.jvp(self._sigma, (t,), (ones,))[1]
        return d_alpha, d_sigma

    def f(self, t):
        """Drift coefficient f(t) = d log(alpha)/dt of dx = f x dt + g dw."""
        return self._f(_as_time(t))

    def g2(self, t):
        """Squared diffusion g(t)^2 = d sigma^2/dt - 2 f sigma^2 of dx = f x dt + g dw."""
        return self._g2(_as_time(t))

    def g(self, t):
        """Diffusion coefficient g(t)."""
        return jnp.sqrt(self.g2(t))

    # ---- Gaussian kernels -------------------------------------------------------------------
    def marginal(self, x0, t, noise):
        """Sample q(x_t | x_0): x_t = alpha(t) x_0 + sigma(t) noise (Ho et al. 2020 eq. 4)."""
        t = broadcast_time(_as_time(t), x0)
        return self._alpha(t) * x0 + self._sigma(t) * noise

    def transition(self, s, t):
        """q(x_t | x_s) = N(alpha_ts x_s, sigma2_ts I) for s <= t; returns (alpha_ts, sigma2_ts).

        sigma2_ts = sigma_t^2 (1 - SNR_t / SNR_s) = -sigma_t^2 expm1(2 (lambda_t - lambda_s)),
        the cancellation-free form of sigma_t^2 - alpha_ts^2 sigma_s^2 (VDM eq. 29-30).
        """
        s, t = _as_time(s), _as_time(t)
        alpha_ts = jnp.exp(self._log_alpha(t) - self._log_alpha(s))
        sigma2_ts = -self._sigma2(t) * jnp.expm1(2.0 * (self._log_snr(t) - self._log_snr(s)))
        return alpha_ts, sigma2_ts

    def posterior(self, s, t):
        """q(x_s | x_t, x_0) = N(c_xt x_t + c_x0 x_0, var I) for s < t; returns (c_xt, c_x0, var).

        Ho et al. 2020 eq. 6-7 for any pair of times (VDM eq. 31-33):
        c_xt = alpha_ts sigma_s^2 / sigma_t^2, c_x0 = alpha_s sigma2_ts / sigma_t^2,
        var = sigma2_ts sigma_s^2 / sigma_t^2, with 1 - SNR_t/SNR_s = -expm1(2 (lambda_t - lambda_s)).
        """
        s, t = _as_time(s), _as_time(t)
        one_minus_snr_ratio = -jnp.expm1(2.0 * (self._log_snr(t) - self._log_snr(s)))
        sigma2_s = self._sigma2(s)
        c_xt = jnp.exp(
            self._log_alpha(t) - self._log_alpha(s) + jnp.log(sigma2_s) - jnp.log(self._sigma2(t))
        )
        c_x0 = jnp.exp(self._log_alpha(s)) * one_minus_snr_ratio
        var = sigma2_s * one_minus_snr_ratio
        return c_xt, c_x0, var

    # ---- prior ---------------------------------------------------------------------------------
    @property
    def prior_std(self):
        """Standard deviation of the prior N(0, sigma(1)^2 I) at t = 1."""
        return jnp.sqrt(self._sigma2(_as_float(1.0)))

    def prior_sample(self, key, shape, dtype=None):
        """Draw x_T ~ N(0, sigma(1)^2 I)."""
        dtype = dtype or jnp.result_type(float)
        return self.prior_std * jax.random.normal(key, shape, dtype)

    def prior_logp(self, x, t=1.0):
        """log N(x; 0, sigma(t)^2 I) (the prior at t = 1 by default), summed per example."""
        var = self._sigma2(_as_float(t))
        d = math.prod(x.shape[1:])
        sq = jnp.sum(jnp.reshape(x, (x.shape[0], -1)) ** 2, axis=-1)
        return -0.5 * (sq / var + d * jnp.log(2.0 * jnp.pi * var))


# ---- continuous schedules ------------------------------------------------------------------


def _linear_beta_log_alpha(t, beta_min, beta_max):
    # log alpha(t) = -1/2 int_0^t beta(s) ds, beta(s) = beta_min + s (beta_max - beta_min)
    # (Song et al. 2021, VP SDE; marginal mean coefficient of eq. 29)
    return -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min


def _linear_beta_t_from_log_alpha(log_alpha, beta_min, beta_max):
    # Root of (b_max - b_min)/4 t^2 + b_min/2 t + log_alpha = 0, in the cancellation-free form
    # t = -2c / (b + sqrt(b^2 - 4ac)) which is also exact when beta_max == beta_min.
    a = 0.25 * (beta_max - beta_min)
    b = 0.5 * beta_min
    return -2.0 * log_alpha / (b + jnp.sqrt(b**2 - 4.0 * a * log_alpha))


def _vp_log_alpha_from_log_snr(lam):
    # alpha^2 = sigmoid(2 lambda) when alpha^2 + sigma^2 = 1
    return 0.5 * jax.nn.log_sigmoid(2.0 * lam)


def _check_betas(beta_min, beta_max, cls):
    if _is_concrete(beta_min) and _is_concrete(beta_max):
        if not float(beta_min) > 0:
            raise ValueError(f"{cls}: beta_min must be > 0; got {beta_min}")
        if float(beta_min) > float(beta_max):
            raise ValueError(
                f"{cls}: beta_min must be <= beta_max; got beta_min={beta_min}, "
                f"beta_max={beta_max}"
            )


class _LinearBeta(Schedule):
    """alpha(t) of the linear beta(t) = beta_min + t (beta_max - beta_min) shared by VP and sub-VP (Song et al. 2021)."""

    beta_min: eqx.AbstractVar[float]
    beta_max: eqx.AbstractVar[float]

    def __check_init__(self):
        _check_betas(self.beta_min, self.beta_max, type(self).__name__)

    def beta(self, t):
        """beta(t) = beta_min + t (beta_max - beta_min)."""
        return self.beta_min + _as_float(t) * (self.beta_max - self.beta_min)

    def _log_alpha(self, t):
        return _linear_beta_log_alpha(t, self.beta_min, self.beta_max)


class VPLinear(_LinearBeta):
    """Variance-preserving SDE with linear beta(t) (Song et al. 2021 eq. 11; DDPM limit); beta(t) = g^2(t) = -2 f(t)."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def _sigma2(self, t):
        return -jnp.expm1(2.0 * self._log_alpha(t))

    def _t_from_log_snr(self, lam):
        return _linear_beta_t_from_log_alpha(
            _vp_log_alpha_from_log_snr(lam), self.beta_min, self.beta_max
        )


class SubVP(_LinearBeta):
    """Sub-VP SDE (Song et al. 2021 eq. 12): alpha as VP, sigma(t) = 1 - alpha(t)^2."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def _sigma2(self, t):
        return jnp.expm1(2.0 * self._log_alpha(t)) ** 2

    def _t_from_log_snr(self, lam):
        # e^lam = alpha / (1 - alpha^2)  =>  alpha = 2 / (e^-lam + sqrt(e^-2lam + 4))
        e = jnp.exp(-lam)
        log_alpha = jnp.log(2.0) - jnp.log(e + jnp.sqrt(e**2 + 4.0))
        return _linear_beta_t_from_log_alpha(log_alpha, self.beta_min, self.beta_max)


class VPCosine(Schedule):
    """Cosine schedule (Nichol & Dhariwal 2021 eq. 17): alpha(t) = cos(((t+s)/(1+s)) pi/2)/cos(s/(1+s) pi/2).

    Written with a = (pi/2)/(1+s) as alpha = sin(a (1-t)) / sin(a), and
    sigma^2 = 1 - alpha^2 = sin(a t) sin(a (2-t)) / sin(a)^2 (exact at both ends, no cancellation).
    """

    s: float = 0.008
    # alpha(1) = 0: lambda(1) = -inf. Samplers start at T = 0.9946 by default (Lu et al. 2022,
    # DPM-Solver sec. 5 / its reference code for the continuous cosine schedule).
    t_max = 0.9946

    def __check_init__(self):
        if _is_concrete(self.s) and not float(self.s) >= 0:
            raise ValueError(f"VPCosine: s must be >= 0; got {self.s}")

    def _a(self):
        return 0.5 * jnp.pi / (1.0 + self.s)

    def _log_alpha(self, t):
        a = self._a()
        return jnp.log(jnp.sin(a * (1.0 - t))) - jnp.log(jnp.sin(a))

    def _alpha(self, t):
        a = self._a()
        return jnp.sin(a * (1.0 - t)) / jnp.sin(a)

    def _sigma2(self, t):
        a = self._a()
        return jnp.sin(a * t) * jnp.sin(a * (2.0 - t)) / jnp.sin(a) ** 2

    def _t_from_log_snr(self, lam):
        # a t = a - b with sin(b) = alpha sin(a); sin/cos of (a - b) in cancellation-free form.
        a = self._a()
        alpha = jax.nn.sigmoid(2.0 * lam) ** 0.5
        sigma2 = jax.nn.sigmoid(-2.0 * lam)
        sa, ca = jnp.sin(a), jnp.cos(a)
        cos_b = jnp.sqrt(ca**2 + sigma2 * sa**2)
        sin_amb = sa * sigma2 / (cos_b + alpha * ca)
        cos_amb = ca * cos_b + alpha * sa**2
        return jnp.arctan2(sin_amb, cos_amb) / a


class VE(Schedule):
    """Variance-exploding SDE (Song et al. 2021 eq. 9; NCSN): alpha = 1, sigma = s_min (s_max/s_min)^t."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def __check_init__(self):
        if _is_concrete(self.sigma_min) and _is_concrete(self.sigma_max):
            if not float(self.sigma_min) > 0:
                raise ValueError(f"VE: sigma_min must be > 0; got {self.sigma_min}")
            if not float(self.sigma_min) < float(self.sigma_max):
                raise ValueError(
                    f"VE: sigma_min must be < sigma_max; got sigma_min={self.sigma_min}, "
                    f"sigma_max={self.sigma_max}"
                )

    def _log_sigma(self, t):
        return jnp.log(self.sigma_min) + t * (jnp.log(self.sigma_max) - jnp.log(self.sigma_min))

    t_min = 0.0  # sigma(0) = sigma_min > 0

    def _log_alpha(self, t):
        return jnp.zeros_like(t)

    def _sigma2(self, t):
        return jnp.exp(2.0 * self._log_sigma(t))

    def _sigma(self, t):
        return jnp.exp(self._log_sigma(t))

    def _t_from_log_snr(self, lam):
        return (-lam - jnp.log(self.sigma_min)) / (
            jnp.log(self.sigma_max) - jnp.log(self.sigma_min)
        )


class RectifiedFlow(Schedule):
    """Linear interpolant / rectified flow (Liu et al. 2022): alpha = 1 - t, sigma = t."""

    def _log_alpha(self, t):
        return jnp.log1p(-t)

    # alpha(1) = 0 makes f, g^2 and the eps-parameterization singular at t = 1; samplers start
    # at 1 - 1e-3 by default (pass t_start=1.0 for x0/v/flow models with ODE samplers).
    t_max = 1.0 - 1e-3

    def _alpha(self, t):
        return 1.0 - t

    def _sigma2(self, t):
        return t**2

    def _sigma(self, t):
        return t

    def _t_from_log_snr(self, lam):
        # (1 - t) / t = e^lam
        return jax.nn.sigmoid(-lam)


# ---- discrete DDPM ----------------------------------------------------------------------------


class DiscreteDDPM(Schedule):
    """Discrete-time DDPM chain (Ho et al. 2020) with a continuous-time view.

    Step n = 1..N of the chain (Ho's index t, 1-based) sits at continuous time t_n = n / N, and
    t = 0 is the data (alpha = 1). log alpha is interpolated piecewise-linearly in t between the
    knots (t_n, 1/2 log alphas_cumprod[n-1]), as DPM-Solver does for discrete models, so every
    continuous-time sampler runs on it and agrees with the chain at the knots. A network trained
    on integer steps receives ``schedule.index(t)``.
    """

    betas: jax.Array
    log_alpha_knots: jax.Array  # (N + 1,), knots[0] = 0 at t = 0

    def __init__(self, betas):
        if _is_concrete(betas):
            b = np.asarray(betas, dtype=np.float64)
            if b.ndim != 1 or b.size == 0:
                raise ValueError(f"DiscreteDDPM: betas must be a non-empty 1-D array; got shape {b.shape}")
            if not np.all((b > 0) & (b < 1)):
                bad = b[~((b > 0) & (b < 1))]
                raise ValueError(f"DiscreteDDPM: betas must lie in (0, 1); got e.g. {bad[:3].tolist()}")
            knots = np.concatenate([[0.0], 0.5 * np.cumsum(np.log1p(-b))])
            dtype = jnp.result_type(float)
            self.betas = jnp.asarray(b, dtype)
            self.log_alpha_knots = jnp.asarray(knots, dtype)
        else:
            self.betas = betas
            self.log_alpha_knots = jnp.concatenate(
                [jnp.zeros((1,), betas.dtype), 0.5 * jnp.cumsum(jnp.log1p(-betas))]
            )

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        """Ho et al. 2020 sec. 4: betas linear from 1e-4 to 0.02 over T = 1000 steps."""
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1; got {num_timesteps}")
        return cls(np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64))

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        """Nichol & Dhariwal 2021 eq. 17: beta_t = min(1 - abar(t)/abar(t-1), max_beta)."""
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1; got {num_timesteps}")
        steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        abar = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
        return cls(np.minimum(1 - abar[1:] / abar[:-1], max_beta))

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def t_min(self) -> float:
        """Ho's step 1, t = 1/N: the last noisy step of the chain (DPM-Solver's discrete t_0)."""
        return 1.0 / self.num_timesteps

    def _t_knots(self):
        return jnp.arange(self.num_timesteps + 1, dtype=self.log_alpha_knots.dtype) / self.num_timesteps

    def time(self, n):
        """Continuous time t_n = n / N of Ho's step n (1-based); n = 0 is the data."""
        return jnp.asarray(n, self.log_alpha_knots.dtype) / self.num_timesteps

    def index(self, t):
        """Ho's (1-based) step index n = t N as a float; round it for an embedding table."""
        return _as_float(t) * self.num_timesteps

    @property
    def alphas_cumprod(self):
        """alpha_bar_n = prod_{i<=n} (1 - beta_i), n = 1..N (Ho et al. 2020 eq. 4)."""
        return jnp.exp(2.0 * self.log_alpha_knots[1:])

    @property
    def posterior_mean_coef1(self):
        """Coefficient of x_0 in the mean of q(x_{n-1} | x_n, x_0), n = 1..N (Ho eq. 7)."""
        t = self._t_knots()
        return self.posterior(t[:-1], t[1:])[1]

    @property
    def posterior_mean_coef2(self):
        """Coefficient of x_n in the mean of q(x_{n-1} | x_n, x_0), n = 1..N (Ho eq. 7)."""
        t = self._t_knots()
        return self.posterior(t[:-1], t[1:])[0]

    @property
    def posterior_variance(self):
        """beta_tilde_n = (1 - abar_{n-1}) / (1 - abar_n) beta_n, n = 1..N (Ho eq. 7)."""
        t = self._t_knots()
        return self.posterior(t[:-1], t[1:])[2]

    def _log_alpha(self, t):
        return jnp.interp(t, self._t_knots(), self.log_alpha_knots)

    def _sigma2(self, t):
        return -jnp.expm1(2.0 * self._log_alpha(t))

    def _t_from_log_snr(self, lam):
        # log alpha is strictly decreasing in t: invert the piecewise-linear map by interpolation.
        log_alpha = _vp_log_alpha_from_log_snr(lam)
        return jnp.interp(-log_alpha, -self.log_alpha_knots, self._t_knots())
