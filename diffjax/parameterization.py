"""Exact conversions between prediction types, and the one denoiser every sampler consumes.

With x_t = alpha x_0 + sigma eps (see ``diffjax.schedules``), a network may predict

* ``"eps"``:   the noise eps                                   (Ho et al. 2020)
* ``"x0"``:    the clean sample x_0
* ``"v"``:     v = alpha eps - sigma x_0                         (Salimans & Ho 2022 eq. 8, any schedule)
* ``"score"``: grad_x log p_t(x) = -eps / sigma                  (Song et al. 2021)
* ``"flow"``:  the velocity u = dx_t/dt = alpha' x_0 + sigma' eps (rectified flow / flow matching)

Every type is a linear, invertible function of the pair (x_0, eps) given x_t, so each conversion
goes through that pair: ``to_x0_eps`` and ``from_x0_eps`` are the only formulas here.

``make_denoiser(model_fn, schedule, prediction)`` reads a network as a ``Denoiser``: a pytree
``(x, t, cond) -> Denoised`` that carries its schedule and prediction type, the one boundary the
samplers, likelihoods and guidance wrappers (``DenoiserWrapper``) work on.
"""

from __future__ import annotations

import abc
import inspect
from typing import Callable, NamedTuple, Optional

import chex
import equinox as eqx
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
    "Denoiser",
    "ModelDenoiser",
    "DenoiserWrapper",
    "make_denoiser",
    "as_denoiser",
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
    alpha = schedule.alpha(t)
    sigma = schedule.sigma(t)
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
        d_alpha, d_sigma = schedule.d_alpha_sigma(t)
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
    d_alpha, d_sigma = schedule.d_alpha_sigma(t)
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


class Denoiser(eqx.Module):
    """``denoiser(x, t, cond=None) -> Denoised``: a model of (E[x_0 | x_t], E[eps | x_t]).

    The boundary every sampler, likelihood and guidance wrapper works on. A pytree that carries
    its ``schedule`` and the ``prediction`` type of the network underneath, so a wrapper or a
    sampler never takes them a second time; its arrays (parameters, guidance scales) are traced
    by ``eqx.filter_jit``, so new values reuse a compiled loop.
    """

    # every concrete denoiser has ``schedule`` (a Schedule) and ``prediction`` (a str)

    @abc.abstractmethod
    def denoise(self, x, t, cond) -> Denoised:
        """(x0, eps) at (x, t) with ``t`` of shape (batch,)."""

    def __call__(self, x, t, cond=None) -> Denoised:
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
        out = self.denoise(x, t, cond)
        chex.assert_equal_shape([out.x0, out.eps, x])
        return out

    def predict(self, x, t, cond=None):
        """The denoiser's output as a prediction of its own type (what a network would return)."""
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
        return from_x0_eps(self(x, t, cond), self.prediction, x, t, self.schedule)


class ModelDenoiser(Denoiser):
    """A ``model_fn(x, t[, cond])`` predicting ``prediction``, read as a ``Denoiser``."""

    model_fn: Callable
    schedule: Schedule
    prediction: str = eqx.field(static=True)

    def __init__(self, model_fn: Callable, schedule: Schedule, prediction: str = "eps"):
        self.model_fn = model_fn
        self.schedule = schedule
        self.prediction = check_prediction(prediction)

    def denoise(self, x, t, cond) -> Denoised:
        return to_x0_eps(call_model(self.model_fn, x, t, cond), self.prediction, x, t, self.schedule)


class DenoiserWrapper(Denoiser):
    """A denoiser built on another (guidance, thresholding): schedule and prediction are the inner one's."""

    inner: Denoiser

    @property
    def schedule(self) -> Schedule:
        return self.inner.schedule

    @property
    def prediction(self) -> str:
        return self.inner.prediction


def make_denoiser(model_fn: Callable, schedule: Schedule, prediction: str = "eps") -> Denoiser:
    """Wrap a ``model_fn(x, t[, cond])`` of any prediction type as a ``Denoiser`` (x, t, cond) -> Denoised.

    This is the one place a network's output is interpreted (the DPM-Solver ``model_wrapper``
    idea); samplers, likelihoods, losses and guidance consume only the returned denoiser. A pytree
    ``model_fn`` (e.g. ``jax.tree_util.Partial(apply, params)``) has its arrays traced under jit.
    """
    return ModelDenoiser(model_fn, schedule, check_prediction(prediction))


def _same_schedule(a: Schedule, b: Schedule) -> bool:
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    try:
        return bool(eqx.tree_equal(a, b))
    except (jax.errors.ConcretizationTypeError, TypeError):
        return True  # traced schedules: cannot be compared on the host


def as_denoiser(model, schedule: Optional[Schedule], prediction: Optional[str]) -> Denoiser:
    """The ``Denoiser`` of an entry point's model argument: a ``Denoiser`` as it is, a model_fn
    through ``make_denoiser(model, schedule, prediction or "eps")``.

    A ``Denoiser`` brings its own schedule and prediction type: a different ``prediction`` or
    ``schedule`` passed beside it raises a ValueError (``schedule=None`` takes the denoiser's).
    """
    if isinstance(model, Denoiser):
        if prediction is not None and prediction != model.prediction:
            raise ValueError(f"prediction={prediction!r} was given with a Denoiser of prediction "
                             f"{model.prediction!r}; omit prediction= or pass the model_fn")
        if schedule is not None and not _same_schedule(schedule, model.schedule):
            raise ValueError(f"schedule {type(schedule).__name__} differs from the Denoiser's schedule "
                             f"{type(model.schedule).__name__}; omit it (schedule=None) or build the "
                             "denoiser with this schedule")
        return model
    if schedule is None:
        raise ValueError("schedule is required when the model is a model_fn, not a Denoiser")
    if not callable(model):
        raise ValueError(f"model must be a Denoiser or a callable model_fn; got {type(model).__name__}")
    return make_denoiser(model, schedule, "eps" if prediction is None else prediction)
