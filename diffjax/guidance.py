"""Guidance as model wrappers: each takes a ``model_fn(x, t, cond)`` and returns one with the same
signature and prediction type, so ``diffjax.sample(guided_fn, ...)`` works with every sampler and
schedule, and wrappers compose (``dynamic_thresholding(classifier_free_guidance(...), ...)``).

* ``classifier_free_guidance``: f_bar = (1 + w) f(x, t, y) - w f(x, t, null) (Ho & Salimans 2022
  eq. 6). Every prediction type is an affine function of eps with coefficients fixed by (x_t, t),
  and the weights (1 + w, -w) sum to 1, so combining eps, v, x0, score or flow predictions gives
  the same guided model. The conditional and unconditional halves run as one batch of 2B.
* ``classifier_guidance``: eps_bar = eps - s sigma_t grad_x log p_phi(y | x_t, t) (Dhariwal & Nichol
  2021 Alg. 2 / eq. 14), i.e. score_bar = score + s grad_x log p_phi(y | x_t); with the exact
  classifier and s = 1 this is the conditional score (Bayes' rule).
* ``dynamic_thresholding`` (Saharia et al. 2022 sec. 2.3) and ``clip_x0``: act on the x0 estimate,
  for large guidance weights that push x0 outside the data range.
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from diffjax.losses import label_log_prob
from diffjax.parameterization import Denoised, _coeffs, call_model, check_prediction, from_x0_eps, to_x0_eps
from diffjax.schedules import Schedule

__all__ = ["classifier_free_guidance", "classifier_guidance", "classifier_log_prob", "dynamic_thresholding", "clip_x0",
           "check_labels"]


def _is_zero(scale) -> bool:
    return isinstance(scale, numbers.Number) and scale == 0


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


def _cfg(model_fn, scale, null_cond, num_classes, x, t, cond=None):
    if cond is None:
        raise ValueError("classifier-free guidance needs cond (the class labels)")
    if num_classes is not None:
        check_labels(cond, num_classes, "cond")
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (b,))
    cond = jnp.asarray(cond)
    null = jnp.broadcast_to(jnp.asarray(null_cond, cond.dtype), cond.shape)
    out = call_model(model_fn, jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([cond, null]))
    conditional, unconditional = out[:b], out[b:]
    return conditional + scale * (conditional - unconditional)


def classifier_free_guidance(model_fn: Callable, scale, null_cond, *, num_classes: Optional[int] = None):
    """Classifier-free guidance with weight ``scale`` = w (w = 0: the conditional model itself).

    ``null_cond`` is the label the model was trained with under condition dropout (diffjax's U-Net:
    ``num_classes``). ``num_classes``, if given, checks concrete labels. The result is a pytree
    (``jax.tree_util.Partial``), so a jitted sampler traces the weights inside ``model_fn`` and
    an array ``scale`` instead of baking them in: new weights or scales reuse the compiled loop.
    """
    if null_cond is None and not _is_zero(scale):
        raise ValueError("classifier-free guidance with scale != 0 needs null_cond, the label the model "
                         "was trained with for 'no class' (diffjax models: num_classes)")
    if _is_zero(scale):
        return model_fn
    return jax.tree_util.Partial(_cfg, model_fn, scale, null_cond, num_classes)


def _classifier_guided(model_fn, schedule, classifier_log_prob, scale, prediction, unconditional, x, t, cond=None):
    if cond is None:
        raise ValueError("classifier guidance needs cond (the class labels y)")
    pred = call_model(model_fn, x, t, None if unconditional else cond)

    def total_log_prob(x_):
        lp = classifier_log_prob(x_, t, cond)
        if lp.shape != (x.shape[0],):
            raise ValueError(f"classifier_log_prob must return log p(y | x_t) of shape ({x.shape[0]},); "
                             f"got shape {lp.shape}")
        return jnp.sum(lp)

    grad = jax.grad(total_log_prob)(x)
    _, alpha, sigma = _coeffs(schedule, t, x)
    d = to_x0_eps(pred, prediction, x, t, schedule)
    guided = Denoised(x0=d.x0 + scale * sigma**2 / alpha * grad, eps=d.eps - scale * sigma * grad)
    return from_x0_eps(guided, prediction, x, t, schedule)


def _unconditional(model_fn, x, t, cond=None):
    return call_model(model_fn, x, t, None)


def classifier_guidance(model_fn: Callable, schedule: Schedule, classifier_log_prob: Callable, scale,
                        *, prediction: str = "eps", unconditional: bool = True):
    """Classifier guidance with scale s: score + s grad_x log p_phi(y | x_t, t), in the model's prediction type.

    ``classifier_log_prob(x, t, y)`` returns log p_phi(y | x_t) of shape (batch,); ``model_fn`` is
    called without the labels when ``unconditional`` (ADM-G guides an unconditional model), else
    with them. x0 moves with the score (Tweedie: x0 = (x + sigma^2 score) / alpha).
    """
    check_prediction(prediction)
    if _is_zero(scale):
        return jax.tree_util.Partial(_unconditional, model_fn) if unconditional else model_fn
    return jax.tree_util.Partial(_classifier_guided, model_fn, schedule, classifier_log_prob, scale, prediction,
                                 unconditional)


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


def _replaced_x0(model_fn, schedule, prediction, transform, x, t, cond=None):
    """The model's output with its x0 estimate replaced by ``transform(x0)`` and eps re-derived from
    x_t = alpha x0 + sigma eps."""
    pred = call_model(model_fn, x, t, cond)
    d = to_x0_eps(pred, prediction, x, t, schedule)
    _, alpha, sigma = _coeffs(schedule, t, x)
    x0 = transform(d.x0)
    eps = jnp.where(sigma > 0, (x - alpha * x0) / jnp.where(sigma > 0, sigma, 1.0), d.eps)
    return from_x0_eps(Denoised(x0, eps), prediction, x, t, schedule)


def _clip(lo, hi, x0):
    return jnp.clip(x0, lo, hi)


def clip_x0(model_fn: Callable, schedule: Schedule, *, prediction: str = "eps", data_range=(-1.0, 1.0)):
    """Static thresholding: clip the x0 estimate to the data range (DDPM's ``clip_denoised``)."""
    check_prediction(prediction)
    lo, hi = data_range
    return jax.tree_util.Partial(_replaced_x0, model_fn, schedule, prediction, jax.tree_util.Partial(_clip, lo, hi))


def _dynamic_threshold(percentile, max_value, x0):
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), max_value)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) * (max_value / s)


def dynamic_thresholding(model_fn: Callable, schedule: Schedule, *, prediction: str = "eps",
                         percentile: float = 0.995, max_value: float = 1.0):
    """Imagen's dynamic thresholding: per example s = max(max_value, the ``percentile`` of |x0|);
    x0 <- clip(x0, -s, s) * max_value / s."""
    check_prediction(prediction)
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"percentile must lie in (0, 1]; got {percentile}")
    return jax.tree_util.Partial(_replaced_x0, model_fn, schedule, prediction,
                                 jax.tree_util.Partial(_dynamic_threshold, percentile, max_value))
