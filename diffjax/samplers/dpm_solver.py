"""DPM-Solver-1/2/3 (singlestep) and DPM-Solver++(2M/3M) as diffrax solvers in log-SNR time.

The exponential integrators of Lu et al. 2022 ("DPM-Solver", Alg. 1-2, eq. 3.3) and Lu et al. 2022b
("DPM-Solver++", Alg. 2, app. B) solve the PF-ODE exactly in its linear part, so they step in
lambda = log(alpha / sigma): the diffrax "time" of these solvers is lambda (increasing as t
decreases), and the term's vector field is the model's eps (DPM-Solver) or x0 (DPM-Solver++)
prediction at t(lambda). Step size h = lambda_t - lambda_s. A multistep history lives in diffrax's
``solver_state``. Every first-order (sub)step is ``ddim_step`` (DPM-Solver-1 == DDIM, eta = 0).
"""

from __future__ import annotations

from typing import Callable, ClassVar

import diffrax
import equinox as eqx
import jax.numpy as jnp
import numpy as np

from diffjax.samplers.ancestral import ddim_step, nfe_stats
from diffjax.schedules import Schedule, _is_concrete

__all__ = ["DPMSolver", "DPMSolverAdaptive", "DPMSolverPPMultistep", "DPMSolverPPAdaptive", "dpm_solver", "dpm_adaptive",
           "check_dpm_adaptive", "check_tolerances", "solve_adaptive", "extrapolate_x0", "denoiser_term"]

_RESULTS = diffrax.RESULTS


class _DenoiserTerm(diffrax.AbstractTerm):
    """A term over lambda whose ``vf`` is the ``Denoised`` (x0, eps) at t(lambda), cond in ``args``.

    Only the exponential-integrator solvers below read it: their steps combine x0 / eps with
    schedule coefficients themselves, so the term has no vector-field-times-control product.
    """

    denoiser: Callable
    schedule: Schedule

    def vf(self, t, y, args):
        return self.denoiser(y, self.schedule.t_from_log_snr(t), args)

    def contr(self, t0, t1, **kwargs):
        return t1 - t0

    def prod(self, vf, control):
        raise TypeError("a denoiser term is read by DPMSolver / DPMSolverPPMultistep only")


def denoiser_term(denoiser: Callable, schedule: Schedule) -> diffrax.AbstractTerm:
    """A diffrax term over lambda whose vector field is the ``Denoised`` (x0, eps) at t(lambda)."""
    return _DenoiserTerm(denoiser, schedule)


def _first_order(schedule, denoised, lam_s, lam_t):
    """The DDIM / DPM-Solver-1 step from lambda_s to lambda_t (Lu et al. 2022 eq. 3.7)."""
    return ddim_step(schedule, denoised, schedule.t_from_log_snr(lam_t), schedule.t_from_log_snr(lam_s))


class _LambdaSolver(diffrax.AbstractSolver):
    schedule: Schedule
    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar = diffrax.LocalLinearInterpolation

    def strong_order(self, terms):
        return None

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

    def _done(self, y0, y1, state):
        return y1, None, dict(y0=y0, y1=y1), state, _RESULTS.successful


def _singlestep(sched, terms, args, x, lam_s, lam_t, order):
    """One singlestep DPM-Solver-``order`` step and its embedded lower-order solution: (x_high, x_low).

    order 1: DDIM (x_low is None); order 2: r1 = 1/2, x_low = DDIM; order 3: r1, r2 = 1/3, 2/3 and
    x_low = DPM-Solver-2 with r1 = 1/3 on the same evaluations (Lu et al. 2022 Alg. 1-2 and 4).
    """
    h = lam_t - lam_s
    d_s = terms.vf(lam_s, x, args)
    x_t_1 = _first_order(sched, d_s, lam_s, lam_t)
    if order == 1:
        return x_t_1, None
    sig_t = sched.sigma(sched.t_from_log_snr(lam_t))
    phi_1 = jnp.expm1(h)  # e^h - 1
    r1 = 0.5 if order == 2 else 1.0 / 3.0
    lam_1 = lam_s + r1 * h
    u1 = _first_order(sched, d_s, lam_s, lam_1)
    d1 = terms.vf(lam_1, u1, args).eps - d_s.eps
    # DPM-Solver-2 (Alg. 1): x_t = DDIM - sigma_t / (2 r1) (e^h - 1) D1
    x_t_2 = x_t_1 - sig_t / (2 * r1) * phi_1 * d1
    if order == 2:
        return x_t_2, x_t_1
    r2 = 2.0 / 3.0
    lam_2 = lam_s + r2 * h
    sig_2 = sched.sigma(sched.t_from_log_snr(lam_2))
    phi_12 = jnp.expm1(r2 * h)
    u2 = _first_order(sched, d_s, lam_s, lam_2) - sig_2 * (r2 / r1) * (phi_12 / (r2 * h) - 1.0) * d1
    d2 = terms.vf(lam_2, u2, args).eps - d_s.eps
    # DPM-Solver-3 (Alg. 2): x_t = DDIM - sigma_t / r2 ((e^h - 1)/h - 1) D2
    return x_t_1 - sig_t / r2 * (phi_1 / h - 1.0) * d2, x_t_2


class DPMSolver(_LambdaSolver):
    """Singlestep DPM-Solver-k, k = 1, 2, 3, noise prediction (Lu et al. 2022 Alg. 1-2, r1, r2 = 1/3, 2/3).

    k evaluations of the eps-model per step; DPM-Solver-1 is DDIM with eta = 0.
    """

    solver_order: int = eqx.field(static=True, default=2)

    def __check_init__(self):
        if self.solver_order not in (1, 2, 3):
            raise ValueError(f"DPMSolver order must be 1, 2 or 3; got {self.solver_order}")

    def order(self, terms):
        return self.solver_order

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        y1, _ = _singlestep(self.schedule, terms, args, y0, t0, t1, self.solver_order)
        return self._done(y0, y1, solver_state)


class DPMSolverAdaptive(_LambdaSolver):
    """DPM-Solver-12 (order 2) / DPM-Solver-23 (order 3) with an embedded error estimate (Lu et al. 2022 sec. 4.2, Alg. 4).

    Each step makes ``solver_order`` evaluations and returns the DPM-Solver-k solution with
    ``y_error`` = (DPM-Solver-k) - (DPM-Solver-(k-1) on the same evaluations), for a diffrax
    step-size controller; the step size is h in lambda.
    """

    solver_order: int = eqx.field(static=True, default=3)

    def __check_init__(self):
        if self.solver_order not in (2, 3):
            raise ValueError(f"DPMSolverAdaptive order must be 2 or 3; got {self.solver_order}")

    def order(self, terms):
        return self.solver_order

    def error_order(self, terms):
        # the difference of orders k and k - 1 is O(h^k) locally: the controller's exponent is -1/k (Alg. 4)
        return self.solver_order

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        y1, y_low = _singlestep(self.schedule, terms, args, y0, t0, t1, self.solver_order)
        return y1, y1 - y_low, dict(y0=y0, y1=y1), solver_state, _RESULTS.successful


class DPMSolverPPMultistep(_LambdaSolver):
    """DPM-Solver++(2M) / (3M), data prediction, multistep (Lu et al. 2022b Alg. 2 and app. B).

    One evaluation per step; the first steps warm up at lower order (as the reference code does).
    The first-order first step has O(h^2) local error, so 3M's asymptotic global order is 2 with a
    much smaller constant than 2M (tests/test_samplers.py measures both). ``solver_state`` holds
    the last two x0 predictions, the two previous step sizes and how many exist.
    """

    solver_order: int = eqx.field(static=True, default=2)

    def __check_init__(self):
        if self.solver_order not in (2, 3):
            raise ValueError(f"DPMSolverPPMultistep order must be 2 or 3; got {self.solver_order}")

    def order(self, terms):
        return self.solver_order

    def init(self, terms, t0, t1, y0, args):
        zero_h = jnp.zeros((), jnp.result_type(t0))
        return (jnp.zeros_like(y0), jnp.zeros_like(y0), zero_h, zero_h, jnp.array(0))

    def _step(self, terms, t0, t1, y0, args, solver_state):
        """(x_t, x_t of the next lower order on the same history, new state); the lower is None in warm-up."""
        lam_s, lam_t = t0, t1
        h = lam_t - lam_s
        m1, m2, h1, h2, count = solver_state  # x0 at the previous two steps, their step sizes
        d_s = terms.vf(lam_s, y0, args)
        m0 = d_s.x0
        alpha_t = self.schedule.alpha(self.schedule.t_from_log_snr(lam_t))
        phi_1 = jnp.expm1(-h)  # e^{-h} - 1
        # first order: x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0_s   (DDIM)
        base = _first_order(self.schedule, d_s, lam_s, lam_t)
        r0 = jnp.where(count >= 1, h1 / h, 1.0)
        d1_0 = (m0 - m1) / r0
        # 2M: D = x0_s + 1/(2 r0) (x0_s - x0_prev)   (Alg. 2)
        y_2 = base - 0.5 * alpha_t * phi_1 * d1_0
        y1 = jnp.where(count >= 1, y_2, base)
        y_low = jnp.where(count >= 1, base, y1)  # no lower-order solution on the first step
        if self.solver_order == 3:
            r1 = jnp.where(count >= 2, h2 / h, 1.0)
            d1_1 = (m1 - m2) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            # 3M: + alpha_t ((e^{-h}-1)/h + 1) D1 - alpha_t ((e^{-h}-1+h)/h^2 - 1/2) D2
            y_3 = base + alpha_t * (phi_1 / h + 1.0) * d1 - alpha_t * ((phi_1 + h) / h**2 - 0.5) * d2
            y_low = jnp.where(count >= 2, y1, y_low)
            y1 = jnp.where(count >= 2, y_3, y1)
        return y1, y_low, (m0, m1, h, h1, count + 1)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        y1, _, state = self._step(terms, t0, t1, y0, args, solver_state)
        return self._done(y0, y1, state)


class DPMSolverPPAdaptive(DPMSolverPPMultistep):
    """DPM-Solver++(2M) / (3M) with an embedded error estimate: y_error = (kM) - ((k-1)M on the same history).

    One evaluation per attempted step (a rejected step is retried from the same state, its x0 history
    unchanged: DPM-Solver++ multistep takes variable steps, Lu et al. 2022b app. B). The first step
    has no lower-order solution (y_error = 0) and is accepted at ``dt0``; the second step's estimate
    is 2M - DDIM.
    """

    def error_order(self, terms):
        # (k-1)M has local error O(h^k): the controller's exponent is -1/k
        return self.solver_order

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        y1, y_low, state = self._step(terms, t0, t1, y0, args, solver_state)
        return y1, y1 - y_low, dict(y0=y0, y1=y1), state, _RESULTS.successful


def extrapolate_x0(x0_last, x0_prev, h):
    """The step to sigma = 0 from the x0 predictions at the last two grid points, ``h`` apart in lambda.

    Along the PF-ODE the x0 prediction of a smooth density is x0 + c u + O(u^2) in u = sigma^2 /
    alpha^2 = e^{-2 lambda} (Tweedie: x0_hat = x/alpha + u grad log p_u, and x/alpha = x0 + O(u)),
    and with x0_hat affine in u the VE-form ODE dx~/d sqrt(u) = (x~ - x0_hat) / sqrt(u) ends exactly at
    x0_hat(u = 0). Extrapolating the two predictions linearly in u to u = 0 cancels the O(u) term,
    so the last step's error falls from O(u_last) (the plain denoise, every sampler's first-order
    limit) to O(u_last^2), with no extra evaluation:
    x0 = x0_last + (x0_last - x0_prev) / (e^{2h} - 1),  since u_last / u_prev = e^{-2h}.
    """
    if jnp.shape(x0_last) != jnp.shape(x0_prev):
        raise ValueError(f"x0_last and x0_prev must have the same shape; got {jnp.shape(x0_last)} "
                         f"and {jnp.shape(x0_prev)}")
    return x0_last + (x0_last - x0_prev) / jnp.expm1(2.0 * h)


def dpm_solver(denoiser: Callable, schedule: Schedule, x_T, ts, key=None, cond=None, *, order: int = 2,
               multistep: bool = False):
    """Run DPM-Solver-``order`` (or DPM-Solver++(``order``M) if ``multistep``) on the grid ``ts``.

    All times must have finite log-SNR; the caller handles a final step to sigma = 0. ``key`` is
    unused (the solvers are deterministic). Returns (x, stats); multistep stats also hold
    ``"history"`` = (x0 prediction at ts[-2], lambda(ts[-1]) - lambda(ts[-2])), what
    ``extrapolate_x0`` needs besides the prediction at ts[-1].
    """
    lams = schedule.log_snr(ts)
    solver = DPMSolverPPMultistep(schedule, order) if multistep else DPMSolver(schedule, order)
    sol = diffrax.diffeqsolve(denoiser_term(denoiser, schedule), solver, t0=lams[0], t1=lams[-1], dt0=None,
                              y0=x_T, args=cond, stepsize_controller=diffrax.StepTo(lams),
                              saveat=diffrax.SaveAt(t1=True, solver_state=multistep),
                              max_steps=ts.shape[0] - 1)
    stats = nfe_stats(sol.stats["num_steps"], 1 if multistep else order)
    if multistep:
        x0_prev, _, h_last, _, _ = sol.solver_state
        stats["history"] = (x0_prev, h_last)
    return sol.ys[0], stats


def check_tolerances(options) -> None:
    """Raise a ValueError naming a bad step-size control option of an adaptive solver (rtol, atol, h_init,
    max_steps)."""
    for name in ("rtol", "atol", "h_init"):
        if name in options and _is_concrete(options[name]) and not options[name] > 0:
            raise ValueError(f"{name} must be positive; got {options[name]!r}")
    max_steps = options.get("max_steps", 1000)
    if not isinstance(max_steps, (int, np.integer)) or isinstance(max_steps, bool) or max_steps <= 0:
        raise ValueError(f"max_steps must be a positive integer; got {max_steps!r}")


def check_dpm_adaptive(options):
    """Raise a ValueError naming a bad ``dpm_adaptive`` option (order, multistep, rtol, atol, h_init, max_steps)."""
    order = options.get("order", 3)
    if order not in (2, 3):
        raise ValueError(f"order must be 2 (DPM-Solver-12) or 3 (DPM-Solver-23); got {order!r}")
    if not isinstance(options.get("multistep", False), bool):
        raise ValueError(f"multistep must be a bool; got {options['multistep']!r}")
    check_tolerances(options)


def solve_adaptive(solver, denoiser: Callable, schedule: Schedule, x_T, ts, cond, *, rtol, atol, h_init, max_steps):
    """``solver`` in lambda from ts[0] to ts[-1] under ``diffrax.PIDController(rtol, atol)`` from h = ``h_init``:
    (x at ts[-1], attempted steps, rejected ones included)."""
    lams = schedule.log_snr(ts)
    sol = diffrax.diffeqsolve(denoiser_term(denoiser, schedule), solver,
                              t0=lams[0], t1=lams[-1], dt0=h_init, y0=x_T, args=cond,
                              stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
                              saveat=diffrax.SaveAt(t1=True), max_steps=max_steps)
    return sol.ys[0], sol.stats["num_steps"]


def dpm_adaptive(denoiser: Callable, schedule: Schedule, x_T, ts, key=None, cond=None, *, order: int = 3,
                 multistep: bool = False, rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                 max_steps: int = 1000):
    """Adaptive DPM-Solver from ts[0] to ts[-1]: singlestep DPM-Solver-12 / -23 (Lu et al. 2022 sec. 4.2,
    defaults as its code), or with ``multistep`` DPM-Solver++(2M) / (3M) with the (k-1)M error estimate.

    Steps in lambda from h = ``h_init``, driven by ``diffrax.PIDController(rtol, atol)`` as an
    I-controller: a step is accepted when E = RMS over the whole batch of
    y_error / (atol + rtol max(|x_s|, |x_t|)) is < 1, and the next h is 0.9 h E^(-1/order) (the
    paper's theta = 0.9 rule; its E uses max(atol, rtol max(|x_low|, |x_prev|)) per sample). Only the
    grid's ends are used; ``key`` is unused. Returns (x, stats), stats["nfe"] = evaluations per step
    (``order``, or 1 if ``multistep``) x attempted steps, rejected ones included; more than
    ``max_steps`` steps raise an error.
    """
    check_dpm_adaptive(dict(order=order, multistep=multistep, rtol=rtol, atol=atol, h_init=h_init,
                            max_steps=max_steps))
    solver = DPMSolverPPAdaptive(schedule, order) if multistep else DPMSolverAdaptive(schedule, order)
    x, steps = solve_adaptive(solver, denoiser, schedule, x_T, ts, cond, rtol=rtol, atol=atol, h_init=h_init,
                              max_steps=max_steps)
    return x, nfe_stats(steps, 1 if multistep else order)
