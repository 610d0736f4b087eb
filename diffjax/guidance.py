"""Guidance as denoiser wrappers: each takes a ``Denoiser`` and returns one, so the schedule and the
prediction type travel with the model (nothing to pass twice, no mismatch to miss), every wrapper
works with every sampler and schedule, and wrappers compose
(``dynamic_thresholding(classifier_free_guidance(den, ...))``). Wrappers are pytrees: a jitted
sampler traces their arrays (parameters, an array ``scale``), so new values reuse the compiled loop.

* ``classifier_free_guidance``: D_bar = (1 + w) D(x, t, y) - w D(x, t, null) (Ho & Salimans 2022
  eq. 6) on (x0, eps). Every prediction type is an affine function of (x0, eps) with coefficients
  fixed by (x_t, t), and the weights (1 + w, -w) sum to 1, so guiding eps, v, x0, score or flow
  predictions gives the same guided model. The conditional and unconditional halves run as one
  batch of 2B.
* ``classifier_guidance``: eps_bar = eps - s sigma_t grad_x log p_phi(y | x_t, t) (Dhariwal & Nichol
  2021 Alg. 2 / eq. 14), i.e. score_bar = score + s grad_x log p_phi(y | x_t); with the exact
  classifier and s = 1 this is the conditional score (Bayes' rule).
* ``dynamic_thresholding`` (Saharia et al. 2022 sec. 2.3) and ``clip_x0``: act on the x0 estimate,
  for large guidance weights that push x0 outside the data range.
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp

from diffjax.losses import label_log_prob
from diffjax.parameterization import Denoised, Denoiser, DenoiserWrapper, call_model
from diffjax.schedules import broadcast_time

__all__ = ["classifier_free_guidance", "classifier_guidance", "classifier_log_prob", "dynamic_thresholding", "clip_x0",
           "check_labels"]


def _is_zero(scale) -> bool:
    return isinstance(scale, numbers.Number) and scale == 0


def _check_denoiser(denoiser, wrapper: str) -> Denoiser:
    if not isinstance(denoiser, Denoiser):
        raise ValueError(f"{wrapper} wraps a Denoiser, which carries its schedule and prediction type: "
                         f"pass diffjax.make_denoiser(model_fn, schedule, prediction); got "
                         f"{type(denoiser).__name__}")
    return denoiser


def check_labels(labels, num_classes: int, name: str = "labels"):
    """Raise a ValueError naming ``name`` if concrete integer labels fall outside [0, num_classes)."""
    try:
        arr = jnp.asarray(labels)
        lo, hi = int(arr.min()), int(arr.max())
    except (jax.errors.ConcretizationTypeError, TypeError):
        return labels  # traced: checked by the caller that made them
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer class indices; got dtype {arr.dtype}")
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name} must lie in [0, {num_classes}); got values in [{lo}, {hi}]")
    return labels


def _combine(a: Denoised, b: Denoised, wa, wb) -> Denoised:
    """wa a + wb b on (x0, eps): with wa + wb = 1 the pair stays consistent with x_t."""
    return Denoised(wa * a.x0 + wb * b.x0, wa * a.eps + wb * b.eps)


class _ClassifierFree(DenoiserWrapper):
    scale: jax.Array
    null_cond: object
    num_classes: Optional[int] = eqx.field(static=True)

    def denoise(self, x, t, cond):
        if cond is None:
            raise ValueError("classifier-free guidance needs cond (the class labels)")
        if self.num_classes is not None:
            check_labels(cond, self.num_classes, "cond")
        b = x.shape[0]
        cond = jnp.asarray(cond)
        null = jnp.broadcast_to(jnp.asarray(self.null_cond, cond.dtype), cond.shape)
        d = self.inner(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([cond, null]))
        conditional = Denoised(d.x0[:b], d.eps[:b])
        unconditional = Denoised(d.x0[b:], d.eps[b:])
        return _combine(conditional, unconditional, 1.0 + self.scale, -self.scale)


def classifier_free_guidance(denoiser: Denoiser, scale, null_cond, *, num_classes: Optional[int] = None):
    """Classifier-free guidance with weight ``scale`` = w (w = 0: the conditional model itself).

    ``null_cond`` is the label the model was trained with under condition dropout (diffjax's U-Net:
    ``num_classes``). ``num_classes``, if given, checks concrete labels. A Python 0 returns
    ``denoiser`` itself; an array ``scale`` is traced (new scales reuse the compiled loop).
    """
    _check_denoiser(denoiser, "classifier_free_guidance")
    if null_cond is None and not _is_zero(scale):
        raise ValueError("classifier-free guidance with scale != 0 needs null_cond, the label the model "
                         "was trained with for 'no class' (diffjax models: num_classes)")
    if _is_zero(scale):
        return denoiser
    return _ClassifierFree(denoiser, scale, null_cond, num_classes)


class _Unconditional(DenoiserWrapper):
    def denoise(self, x, t, cond):
        return self.inner(x, t, None)


class _ClassifierGuided(DenoiserWrapper):
    classifier_log_prob: Callable
    scale: jax.Array
    unconditional: bool = eqx.field(static=True)

    def denoise(self, x, t, cond):
        if cond is None:
            raise ValueError("classifier guidance needs cond (the class labels y)")
        d = self.inner(x, t, None if self.unconditional else cond)

        def total_log_prob(x_):
            lp = self.classifier_log_prob(x_, t, cond)
            if lp.shape != (x.shape[0],):
                raise ValueError(f"classifier_log_prob must return log p(y | x_t) of shape ({x.shape[0]},); "
                                 f"got shape {lp.shape}")
            return jnp.sum(lp)

        grad = jax.grad(total_log_prob)(x)
        tb = broadcast_time(t, x)
        alpha, sigma = self.schedule.alpha(tb), self.schedule.sigma(tb)
        # score + s grad: eps moves by -s sigma grad, x0 with it (Tweedie: x0 = (x + sigma^2 score) / alpha)
        return Denoised(x0=d.x0 + self.scale * sigma**2 / alpha * grad, eps=d.eps - self.scale * sigma * grad)


def classifier_guidance(denoiser: Denoiser, classifier_log_prob: Callable, scale, *, unconditional: bool = True):
    """Classifier guidance with scale s: score + s grad_x log p_phi(y | x_t, t) (Dhariwal & Nichol 2021 eq. 14).

    ``classifier_log_prob(x, t, y)`` returns log p_phi(y | x_t) of shape (batch,); ``denoiser`` is
    called without the labels when ``unconditional`` (ADM-G guides an unconditional model), else
    with them.
    """
    _check_denoiser(denoiser, "classifier_guidance")
    if _is_zero(scale):
        return _Unconditional(denoiser) if unconditional else denoiser
    return _ClassifierGuided(denoiser, classifier_log_prob, scale, unconditional)


def _label_log_prob(logits_fn, x, t, y):
    logits = call_model(logits_fn, x, t, None, check_shape=False)
    if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"the classifier must return logits of shape (batch, num_classes) = ({x.shape[0]}, K); "
                         f"got shape {logits.shape}")
    y = check_labels(y, logits.shape[1], "cond")
    y = jnp.asarray(y)
    if y.shape != (x.shape[0],):
        raise ValueError(f"cond (the labels y) must have shape ({x.shape[0]},); got {y.shape}")
    return label_log_prob(logits, y).astype(x.dtype)


def classifier_log_prob(logits_fn: Callable):
    """``classifier_log_prob(x, t, y)`` = log softmax(logits_fn(x, t))[y] for ``classifier_guidance``.

    ``logits_fn(x, t)`` (or ``(x, t, cond)``, called with None) is a noise-conditional classifier
    returning (batch, num_classes) logits, e.g. ``jax.tree_util.Partial(apply, params)`` of a run
    trained with ``config.task = "classifier"``; labels outside [0, num_classes) are rejected.
    """
    return jax.tree_util.Partial(_label_log_prob, logits_fn)


class _ReplacedX0(DenoiserWrapper):
    """The inner estimate with x0 replaced by ``transform(x0)`` and eps re-derived from
    x_t = alpha x0 + sigma eps."""

    transform: Callable

    def denoise(self, x, t, cond):
        d = self.inner(x, t, cond)
        tb = broadcast_time(t, x)
        alpha, sigma = self.schedule.alpha(tb), self.schedule.sigma(tb)
        x0 = self.transform(d.x0)
        eps = jnp.where(sigma > 0, (x - alpha * x0) / jnp.where(sigma > 0, sigma, 1.0), d.eps)
        return Denoised(x0, eps)


def _clip(lo, hi, x0):
    return jnp.clip(x0, lo, hi)


def clip_x0(denoiser: Denoiser, *, data_range=(-1.0, 1.0)):
    """Static thresholding: clip the x0 estimate to the data range (DDPM's ``clip_denoised``)."""
    _check_denoiser(denoiser, "clip_x0")
    lo, hi = data_range
    return _ReplacedX0(denoiser, jax.tree_util.Partial(_clip, lo, hi))


def _dynamic_threshold(percentile, max_value, x0):
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), max_value)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) * (max_value / s)


def dynamic_thresholding(denoiser: Denoiser, *, percentile: float = 0.995, max_value: float = 1.0):
    """Imagen's dynamic thresholding (Saharia et al. 2022 sec. 2.3): per example s = max(max_value,
    the ``percentile`` of |x0|); x0 <- clip(x0, -s, s) * max_value / s."""
    _check_denoiser(denoiser, "dynamic_thresholding")
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"percentile must lie in (0, 1]; got {percentile}")
    return _ReplacedX0(denoiser, jax.tree_util.Partial(_dynamic_threshold, percentile, max_value))
