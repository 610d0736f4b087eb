"""UniPC (Zhao et al. 2023): the UniP-p predictor with the UniC corrector, multistep, as a diffrax solver in lambda.

Each step s -> t of ``UniPCMultistep`` (the structure of diffusers' ``UniPCMultistepScheduler.step``):
evaluate the model at the current state x_s (the predictor's output), correct x_s with UniC from the
previous corrected state using that evaluation (no extra evaluation), then predict x_t with UniP
at order p = min(order, steps so far + 1) (and, with ``lower_order_final``, at most the intervals left).
The state passed between steps is the predictor's output; the last corrected state, the last three model
outputs and their log-SNRs live in diffrax's ``solver_state``. The model output is the x0 prediction
(``predict_x0``, UniPC's data-prediction form, diffusers' default) or the eps prediction. B(h) is ``bh1``
(B(h) = h) or ``bh2`` (B(h) = e^h - 1), with hh = -h for x0 and h for eps (UniPC sec. 3).

``UniPCAdaptive`` orders each step the other way round for step-size control: predict x_t with UniP-p,
evaluate the model there, correct x_t with UniC-p. The corrector has order p + 1, so UniC - UniP estimates
the predictor's local error from the evaluation at the step's end (a predictor-corrector pair, Milne's
device), where the (k-1)M estimate of an adaptive DPM-Solver++ sees only the history before the step.
The step's result is the corrected x_t (local extrapolation), and its evaluation is the next step's history:
one evaluation per attempted step, plus one at the start.
"""

from __future__ import annotations

from typing import Callable

import diffrax
import equinox as eqx
import jax.numpy as jnp

from diffjax.samplers.ancestral import nfe_stats
from diffjax.samplers.dpm_solver import _RESULTS, _LambdaSolver, check_tolerances, denoiser_term, solve_adaptive
from diffjax.schedules import Schedule

__all__ = ["UniPCMultistep", "UniPCAdaptive", "unipc", "unipc_adaptive", "VARIANTS", "check_unipc",
           "check_unipc_adaptive"]

VARIANTS = ("bh1", "bh2")
_HIST = 3  # model outputs kept: the UniC-3 corrector reads three before the new one


def check_unipc(options) -> None:
    """ValueError naming a bad ``order`` / ``variant``."""
    if options.get("order", 2) not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3; got {options['order']!r}")
    if options.get("variant", "bh2") not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {options['variant']!r}")


def _coefficients(rks, hh, b_h, order: int):
    """The rows R_i = rks^(i-1) and b_i = i! hh phi_{i+1}(hh) / B(h), i = 1..order, of R rho = b (UniPC sec. 3).

    h phi_k is built by the recursion h_phi_{k+1} = h_phi_k / hh - 1/k! from h_phi_1 = e^hh - 1.
    """
    h_phi_k = jnp.expm1(hh) / hh - 1.0
    rows, b, fact = [], [], 1.0
    for i in range(1, order + 1):
        rows.append(jnp.stack([rk ** (i - 1) for rk in rks]))
        b.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    return jnp.stack(rows), jnp.stack(b)


class UniPCMultistep(_LambdaSolver):
    """UniPC-``solver_order`` (UniP-p + UniC-p, Zhao et al. 2023 sec. 3): one model evaluation per step."""

    solver_order: int = eqx.field(static=True, default=2)
    variant: str = eqx.field(static=True, default="bh2")
    predict_x0: bool = eqx.field(static=True, default=True)
    corrector: bool = eqx.field(static=True, default=True)
    lower_order_final: bool = eqx.field(static=True, default=True)
    num_intervals: int = eqx.field(static=True, default=1)  # of the whole grid, the step to sigma = 0 included

    def __check_init__(self):
        check_unipc(dict(order=self.solver_order, variant=self.variant))

    def order(self, terms):
        return self.solver_order + (1 if self.corrector else 0)

    def init(self, terms, t0, t1, y0, args):
        # (last corrected state, model outputs m_-1..m_-3, their lambdas, order of the last predictor, count);
        # placeholder lambdas differ so that unused coefficient solves stay finite
        lams = t0 - jnp.arange(1.0, _HIST + 1.0, dtype=jnp.result_type(t0))
        return (jnp.zeros_like(y0), jnp.zeros((_HIST,) + y0.shape, y0.dtype), lams, jnp.array(1), jnp.array(0))

    def _model(self, terms, lam, x, args):
        d = terms.vf(lam, x, args)
        return d.x0 if self.predict_x0 else d.eps

    def _update(self, x, lam_s, lam_t, m0, d1s, rhos, extra=None):
        """x_t = (sigma_t/sigma_s) x - alpha_t h_phi_1 m0 - alpha_t B(h) sum rho_k D1_k (x0 form; UniPC sec. 3),
        x_t = (alpha_t/alpha_s) x - sigma_t h_phi_1 m0 - sigma_t B(h) sum rho_k D1_k (eps form)."""
        sched = self.schedule
        t_s, t_t = sched.t_from_log_snr(lam_s), sched.t_from_log_snr(lam_t)
        h = lam_t - lam_s
        hh = -h if self.predict_x0 else h
        res = sum((r * d for r, d in zip(rhos, d1s)), jnp.zeros_like(x))
        if extra is not None:
            res = res + extra
        b_h = self._b_h(hh)
        if self.predict_x0:
            return (jnp.exp(jnp.log(sched.sigma(t_t)) - jnp.log(sched.sigma(t_s))) * x
                    - sched.alpha(t_t) * (jnp.expm1(hh) * m0 + b_h * res))
        return (jnp.exp(sched.log_alpha(t_t) - sched.log_alpha(t_s)) * x
                - sched.sigma(t_t) * (jnp.expm1(hh) * m0 + b_h * res))

    def _b_h(self, hh):
        return hh if self.variant == "bh1" else jnp.expm1(hh)

    def _predict(self, x, lam_s, lam_t, m0, ms, lams, p: int):
        """UniP-p from (lambda_s, x_s, m0) with the previous outputs ``ms`` at ``lams`` (diffusers' uni_p_bh)."""
        h = lam_t - lam_s
        rks = [(lams[i] - lam_s) / h for i in range(p - 1)]
        d1s = [(ms[i] - m0) / rks[i] for i in range(p - 1)]
        if p == 1:
            rhos = []
        elif p == 2:
            rhos = [0.5]  # UniP-2: rho = 1/2 for both B(h), as the reference codes
        else:
            hh = -h if self.predict_x0 else h
            r, b = _coefficients(rks + [jnp.ones_like(h)], hh, self._b_h(hh), p)
            rhos = list(jnp.linalg.solve(r[:-1, :-1], b[:-1]))
        return self._update(x, lam_s, lam_t, m0, d1s, rhos)

    def _correct(self, x_prev, lam_prev, lam_t, m_t, ms, lams, p: int):
        """UniC-p: x_prev at lambda_prev with outputs ``ms`` (ms[0] at lam_prev) and m_t at lambda_t (uni_c_bh)."""
        h = lam_t - lam_prev
        m0 = ms[0]
        rks = [(lams[i + 1] - lam_prev) / h for i in range(p - 1)]
        d1s = [(ms[i + 1] - m0) / rks[i] for i in range(p - 1)]
        if p == 1:
            rhos = [jnp.asarray(0.5, x_prev.dtype)]  # UniC-1: rho = 1/2
        else:
            hh = -h if self.predict_x0 else h
            r, b = _coefficients(rks + [jnp.ones_like(h)], hh, self._b_h(hh), p)
            rhos = list(jnp.linalg.solve(r, b))
        return self._update(x_prev, lam_prev, lam_t, m0, d1s, rhos[:-1], extra=rhos[-1] * (m_t - m0))

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        x_prev, ms, lams, p_prev, count = solver_state
        m_s = self._model(terms, t0, y0, args)
        x_s = y0
        if self.corrector:
            corrected = y0
            for p in range(1, self.solver_order + 1):
                c = self._correct(x_prev, lams[0], t0, m_s, ms, lams, p)
                corrected = jnp.where(p_prev == p, c, corrected)
            x_s = jnp.where(count >= 1, corrected, y0)
        new_ms = jnp.concatenate([m_s[None], ms[:-1]])
        new_lams = jnp.concatenate([t0[None], lams[:-1]])
        p_now = jnp.minimum(self.solver_order, count + 1)  # warm-up (the reference codes' lower_order_nums)
        if self.lower_order_final:
            p_now = jnp.minimum(p_now, self.num_intervals - count)
        x_t = self._predict(x_s, t0, t1, m_s, ms, lams, 1)
        for p in range(2, self.solver_order + 1):
            x_t = jnp.where(p_now == p, self._predict(x_s, t0, t1, m_s, ms, lams, p), x_t)
        return self._done(y0, x_t, (x_s, new_ms, new_lams, p_now, count + 1))


def unipc(denoiser: Callable, schedule: Schedule, x_T, ts, key=None, cond=None, *, order: int = 2,
          variant: str = "bh2", predict_x0: bool = True, corrector: bool = True, lower_order_final: bool = True,
          to_zero: bool = False, save_steps: bool = False):
    """UniPC-``order`` on the grid ``ts`` (all times with finite log-SNR but a final sigma = 0 if ``to_zero``).

    The state at each grid time is the predictor's output (as diffusers returns it); the corrector refines it
    with the evaluation made there at the start of the next step. ``to_zero``: the last interval ends at
    sigma = 0 and is the order-1 step there, x_0 = the x0 prediction at the last state (UniP-1 to sigma = 0,
    one evaluation), as diffusers with ``final_sigmas_type="zero"``. ``key`` is unused. Returns (x, stats);
    ``save_steps`` adds stats["states"], the state at every grid time ts[1:].
    """
    check_unipc(dict(order=order, variant=variant))
    solve_ts = ts[:-1] if to_zero else ts
    lams = schedule.log_snr(solve_ts)
    solver = UniPCMultistep(schedule, order, variant, predict_x0, corrector, lower_order_final, ts.shape[0] - 1)
    x, states, steps = x_T, [], 0
    if solve_ts.shape[0] >= 2:
        saveat = diffrax.SaveAt(steps=True) if save_steps else diffrax.SaveAt(t1=True)
        sol = diffrax.diffeqsolve(denoiser_term(denoiser, schedule), solver, t0=lams[0], t1=lams[-1], dt0=None,
                                  y0=x_T, args=cond, stepsize_controller=diffrax.StepTo(lams), saveat=saveat,
                                  max_steps=solve_ts.shape[0] - 1)
        x, steps = sol.ys[-1], solve_ts.shape[0] - 1
        states = [sol.ys] if save_steps else []
    stats = nfe_stats(steps, 1)
    if to_zero:
        x = schedule.alpha(ts[-1]) * denoiser(x, solve_ts[-1], cond).x0
        stats["nfe"] = stats["nfe"] + 1
        states.append(x[None])
    if save_steps:
        stats["states"] = jnp.concatenate(states) if states else jnp.zeros((0,) + x.shape, x.dtype)
    return x, stats


class UniPCAdaptive(UniPCMultistep):
    """UniP-p predictor, then UniC-p corrector with the evaluation at the predicted x_t; the error estimate is
    their difference (module docstring). Variable steps: the coefficients are solved for the actual lambdas."""

    def error_order(self, terms):
        # UniC - UniP is the predictor's local error, O(h^(p+1))
        return self.solver_order + 1

    def init(self, terms, t0, t1, y0, args):
        # (model outputs m_0, m_-1, m_-2 with m_0 at the current state, their lambdas, steps taken); the
        # placeholder lambdas differ so that unused coefficient solves stay finite
        lams = t0 - jnp.arange(_HIST, dtype=jnp.result_type(t0))
        ms = jnp.zeros((_HIST,) + y0.shape, y0.dtype).at[0].set(self._model(terms, t0, y0, args))
        return ms, lams, jnp.array(0)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        ms, lams, count = solver_state
        p_now = jnp.minimum(self.solver_order, count + 1)  # warm-up on the outputs there are
        x_pred = self._predict(y0, t0, t1, ms[0], ms[1:], lams[1:], 1)
        for p in range(2, self.solver_order + 1):
            x_pred = jnp.where(p_now == p, self._predict(y0, t0, t1, ms[0], ms[1:], lams[1:], p), x_pred)
        m_t = self._model(terms, t1, x_pred, args)
        x_corr = self._correct(y0, t0, t1, m_t, ms, lams, 1)
        for p in range(2, self.solver_order + 1):
            x_corr = jnp.where(p_now == p, self._correct(y0, t0, t1, m_t, ms, lams, p), x_corr)
        state = (jnp.concatenate([m_t[None], ms[:-1]]), jnp.concatenate([t1[None], lams[:-1]]), count + 1)
        return x_corr, x_corr - x_pred, dict(y0=y0, y1=x_corr), state, _RESULTS.successful


def check_unipc_adaptive(options) -> None:
    """ValueError naming a bad ``unipc_adaptive`` option (order, variant, rtol, atol, h_init, max_steps)."""
    check_unipc(dict(options, order=options.get("order", 3)))
    check_tolerances(options)


def unipc_adaptive(denoiser: Callable, schedule: Schedule, x_T, ts, key=None, cond=None, *, order: int = 3,
                   variant: str = "bh2", rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                   max_steps: int = 1000):
    """Adaptive UniPC-``order`` (x0 form) from ts[0] to ts[-1], steps in lambda from h = ``h_init`` under
    ``diffrax.PIDController(rtol, atol)``: a step is accepted when the RMS over the whole batch of
    (UniC - UniP) / (atol + rtol max(|x_s|, |x_t|)) is < 1. Only the grid's ends are used; ``key`` is unused.
    Returns (x, stats), stats["nfe"] = 1 + attempted steps (rejected ones included); more than ``max_steps``
    steps raise an error.
    """
    check_unipc_adaptive(dict(order=order, variant=variant, rtol=rtol, atol=atol, h_init=h_init, max_steps=max_steps))
    solver = UniPCAdaptive(schedule, order, variant)
    x, steps = solve_adaptive(solver, denoiser, schedule, x_T, ts, cond, rtol=rtol, atol=atol, h_init=h_init,
                              max_steps=max_steps)
    return x, nfe_stats(steps, 1, at_init=1)
