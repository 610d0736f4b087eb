"""Exact conversions between prediction types, and the one denoiser every sampler consumes.

With x_t = alpha x_0 + sigma eps (see ``diffjax.schedules``), a network may predict

* ``"eps"``:   the noise eps                                   (Ho et al. 2020)
* ``"x0"``:    the clean sample x_0
* ``"v"``:     v = alpha eps - sigma x_0                         (Salimans & Ho 2022 eq. 8, any schedule)
* ``"score"``: grad_x log p_t(x) = -eps / sigma                  (Song et al. 2021)
* ``"flow"``:  the velocity u = dx_t/dt = alpha' x_0 + sigma' eps (rectified flow / flow matching)

Every type is a linear, invertible function of the pair (x_0, eps) given x_t, so each conversion
goes through that pair: ``to_x0_eps`` and ``from_x0_eps`` are the only formulas here.
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from diffjax.schedules import Schedule, broadcast_time

__all__ = [
    "PREDICTION_TYPES",
    "Denoised",
    "check_prediction",
    "to_x0_eps",
    "from_x0_eps",
    "convert",
    "make_denoiser",
    "call_model",
]

PREDICTION_TYPES = ("eps", "x0", "v", "score", "flow")


class Denoised(NamedTuple):
    """The model's estimate of (x_0, eps) at (x_t, t); x_t = alpha x0 + sigma eps holds exactly."""

    x0: jax.Array
    eps: jax.Array


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction must be one of {PREDICTION_TYPES}; got {prediction!r}"
        )
    return prediction


def _coeffs(schedule: Schedule, t, x):
    t = broadcast_time(jnp.asarray(t, x.dtype), x)
    alpha = schedule._alpha(t)
    sigma = schedule._sigma(t)
    return t, alpha, sigma


def to_x0_eps(pred, prediction: str, x, t, schedule: Schedule) -> Denoised:
    """Turn a prediction of any type at (x_t, t) into the pair (x_0, eps)."""
    check_prediction(prediction)
    t, alpha, sigma = _coeffs(schedule, t, x)
    if prediction == "eps":
        eps = pred
        x0 = (x - sigma * eps) / alpha
    elif prediction == "x0":
        x0 = pred
        eps = (x - alpha * x0) / sigma
    elif prediction == "score":
        eps = -sigma * pred
        x0 = (x - sigma * eps) / alpha
    elif prediction == "v":
        # [x; v] = [[alpha, sigma], [-sigma, alpha]] [x0; eps]
        norm = alpha**2 + sigma**2
        x0 = (alpha * x - sigma * pred) / norm
        eps = (sigma * x + alpha * pred) / norm
    else:  # flow
        # [x; u] = [[alpha, sigma], [alpha', sigma']] [x0; eps]
        d_alpha, d_sigma = schedule._d_alpha_sigma(t)
        det = alpha * d_sigma - sigma * d_alpha
        x0 = (d_sigma * x - sigma * pred) / det
        eps = (alpha * pred - d_alpha * x) / det
    return Denoised(x0, eps)


def from_x0_eps(denoised: Denoised, prediction: str, x, t, schedule: Schedule):
    """Express the pair (x_0, eps) at (x_t, t) as a prediction of the given type."""
    check_prediction(prediction)
    x0, eps = denoised
    t, alpha, sigma = _coeffs(schedule, t, x)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "score":
        return -eps / sigma
    if prediction == "v":
        return alpha * eps - sigma * x0
    d_alpha, d_sigma = schedule._d_alpha_sigma(t)
    return d_alpha * x0 + d_sigma * eps


def convert(pred, from_type: str, to_type: str, x, t, schedule: Schedule):
    """Convert a prediction between any two of eps / x0 / v / score / flow."""
    if from_type == to_type:
        check_prediction(from_type)
        return pred
    return from_x0_eps(to_x0_eps(pred, from_type, x, t, schedule), to_type, x, t, schedule)


def _accepts_cond(model_fn) -> bool:
    try:
        params = inspect.signature(model_fn).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = [
        p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


def call_model(model_fn: Callable, x, t, cond=None, *, check_shape: bool = True):
    """Call ``model_fn(x, t)`` or ``model_fn(x, t, cond)`` with ``t`` of shape (batch,).

    Checks that the output has the shape of ``x`` (``check_shape=False``: left to the caller, e.g.
    classifier logits).
    """
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
    if _accepts_cond(model_fn):
        out = model_fn(x, t, cond)
    elif cond is not None:
        raise ValueError("cond was given but model_fn takes only (x, t)")
    else:
        out = model_fn(x, t)
    if check_shape and out.shape != x.shape:
        raise ValueError(
            f"model_fn output shape {out.shape} does not match x shape {x.shape}"
        )
    return out


def make_denoiser(
    model_fn: Callable, schedule: Schedule, prediction: str = "eps"
) -> Callable[..., Denoised]:
    """Wrap a ``model_fn(x, t[, cond])`` of any prediction type as ``denoise(x, t, cond) -> Denoised``.

    This is the one place a network's output is interpreted (the DPM-Solver ``model_wrapper``
    idea); samplers, likelihoods and losses consume only the returned function.
    """
    check_prediction(prediction)

    def denoise(x, t, cond: Optional[jax.Array] = None) -> Denoised:
        pred = call_model(model_fn, x, t, cond)
        t_b = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
        return to_x0_eps(pred, prediction, x, t_b, schedule)

    return denoise
