"""Training objectives: ``make_loss(...) -> loss_fn(params, batch, key) -> (loss, aux)``.

All objectives draw t, eps and x_t = alpha x_0 + sigma eps from the schedule and read the
network through ``diffjax.parameterization`` (the network may predict any type):

* ``"eps"``: L_simple = E ||eps_hat - eps||^2 (Ho et al. 2020 eq. 14)
* ``"x0"``, ``"v"``: the same regression on x_0 or v = alpha eps - sigma x_0 (Salimans & Ho 2022)
  All three are ||x0_hat - x0||^2 times a weight of t: SNR (eps), 1 (x0), (alpha^2 + sigma^2)^2 /
  sigma^2 (v; SNR + 1 for VP). ``min_snr_gamma=gamma`` replaces that weight by min(SNR, gamma)
  (Min-SNR-gamma, Hang et al. 2023 sec. 3.4), whichever of the three is regressed.
* ``"dsm"``: weighted denoising score matching E[w(t) ||s_hat - grad log q(x_t|x_0)||^2]
  (Song et al. 2021 eq. 7) with ``weighting="likelihood"``: w = g(t)^2, which makes
  1/2 (T - t_eps) E[...] (summed over dims) the score-matching bound on -log p of Song et al.
  2021b ("Maximum Likelihood Training of Score-Based Diffusion Models", Thm. 1) up to constants;
  or ``weighting="sigma2"``: w = sigma^2 (equal to L_simple).

* ``"flow"``: flow matching / rectified flow (Lipman et al. 2023 eq. 23; Liu et al. 2022 eq. 1): regress the
  velocity u = alpha' x_0 + sigma' eps of the interpolant, x_1 - x_0 on ``RectifiedFlow`` (x_1 = eps).

* ``"vlb"`` (discrete chains): the DDPM bound L_T + N E_n[L_{n-1}] per example, one uniformly drawn
  term per example (Ho et al. 2020 eq. 5; the terms live in ``diffjax.likelihood.ddpm_vlb_term``);
* ``"hybrid"`` (discrete chains, learned variance): L_simple + vlb_weight L_vlb with the mean
  stopped in L_vlb, so the bound trains only the variance (Nichol & Dhariwal 2021 sec. 3.1,
  lambda = 0.001, L_vlb in bits/dim as their code).

``learned_variance=True``: the network returns 2C channels on the last axis, the prediction and
v in [-1, 1] with log variance = frac log beta + (1 - frac) log beta_tilde, frac = (v + 1) / 2
(Nichol & Dhariwal eq. 15). ``prediction_only(model_fn)`` strips v for the samplers.

Options: ``time_sampling``: t uniform on [t_eps, T] (the default) or ``"logit_normal"``, t = t_eps + (T - t_eps)
sigmoid(m + s n), n ~ N(0, 1) (Esser et al. 2024 eq. 19, "Scaling Rectified Flow Transformers"; m, s =
``logit_normal=(m, s)``, default (0, 1)), which puts the examples at mid t where the velocity is hardest
to predict; antithetic time sampling (t and its mirror t_eps + T - t, n and -n, in each pair of examples) and
condition dropout for classifier-free guidance (each label replaced by ``null_label`` with
probability ``cond_drop_prob``; Ho & Salimans 2022).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from diffjax.likelihood import VLB_VARIANCES, ddpm_log_variance, ddpm_prior_kl, ddpm_vlb_term
from diffjax.parameterization import Denoised, check_prediction, from_x0_eps, to_x0_eps
from diffjax.schedules import DiscreteDDPM, Schedule, broadcast_time

__all__ = ["OBJECTIVES", "TIME_SAMPLINGS", "make_loss", "make_classifier_loss", "label_log_prob", "sample_times", "drop_condition", "split_variance", "prediction_only"]

OBJECTIVES = ("eps", "x0", "v", "flow", "dsm", "vlb", "hybrid")
TIME_SAMPLINGS = ("uniform", "logit_normal")
# sigma^2 times each regression objective's weight on ||x0_hat - x0||^2 (module docstring)
_X0_WEIGHT_DENOM = {"eps": lambda a2, s2: a2, "x0": lambda a2, s2: s2, "v": lambda a2, s2: (a2 + s2) ** 2}
_LN2 = math.log(2.0)


def sample_times(key, n: int, t_eps: float, t_max: float, antithetic: bool = False,
                 discrete: Optional[int] = None, logit_normal: Optional[tuple[float, float]] = None):
    """Uniform times on [t_eps, t_max] (or uniform steps n/N of a discrete chain, Ho Alg. 1).

    ``logit_normal=(m, s)``: t = t_eps + (t_max - t_eps) sigmoid(m + s n), n ~ N(0, 1) (Esser et al. 2024
    eq. 19) instead of uniform. ``antithetic``: the second half of the batch mirrors the first (t ->
    t_eps + t_max - t; n -> -n), lowering the variance of the Monte-Carlo estimate of the time integral.
    """
    m = (n + 1) // 2 if antithetic else n
    if discrete is not None:
        steps = jax.random.randint(key, (m,), 1, discrete + 1)
        if antithetic:
            steps = jnp.concatenate([steps, discrete + 1 - steps])[:n]
        return steps.astype(jnp.result_type(float)) / discrete
    if logit_normal is not None:
        z = jax.random.normal(key, (m,))
        if antithetic:
            z = jnp.concatenate([z, -z])[:n]
        return t_eps + (t_max - t_eps) * jax.nn.sigmoid(logit_normal[0] + logit_normal[1] * z)
    u = jax.random.uniform(key, (m,))
    t = t_eps + (t_max - t_eps) * u
    if antithetic:
        t = jnp.concatenate([t, t_eps + t_max - t])[:n]
    return t


def drop_condition(key, labels, p: float, null_label: int):
    """Replace each label by ``null_label`` with probability p (classifier-free guidance training)."""
    drop = jax.random.bernoulli(key, p, labels.shape)
    return jnp.where(drop, null_label, labels)


def split_variance(output):
    """Split a learned-variance output (..., 2C) into the prediction and frac = (v + 1) / 2 in [0, 1]."""
    pred, v = jnp.split(output, 2, axis=-1)
    return pred, (jnp.clip(v, -1.0, 1.0) + 1.0) / 2.0


def prediction_only(model_fn: Callable) -> Callable:
    """``model_fn`` with the learned-variance channels dropped, for samplers that use a fixed variance."""

    def fn(*args, **kwargs):
        return split_variance(model_fn(*args, **kwargs))[0]

    return fn


def _time_range(schedule: Schedule, t_eps: Optional[float]) -> tuple[float, float]:
    t_lo = float(schedule.t_min if t_eps is None else t_eps)
    t_hi = float(schedule.t_max)
    if not 0.0 <= t_lo < t_hi:
        raise ValueError(f"t_eps must lie in [0, t_max={t_hi}); got {t_lo}")
    return t_lo, t_hi


def _unpack(batch, need_label: bool = False):
    """(x, label) of a batch dict, shapes checked; label is None when absent (and not needed)."""
    if not isinstance(batch, dict) or "x" not in batch:
        raise ValueError(f"batch must be a dict with key 'x'; got {type(batch).__name__}")
    x0, label = batch["x"], batch.get("label")
    if x0.ndim < 2:
        raise ValueError(f"batch['x'] must have shape (batch, ...data dims); got {x0.shape}")
    if "noise" in batch and batch["noise"].shape != x0.shape:
        raise ValueError(f"batch['noise'] must have the shape of batch['x'] {x0.shape}; got {batch['noise'].shape}")
    if label is None and need_label:
        raise ValueError("batch has no 'label': a classifier trains on labelled data")
    if label is not None and label.shape != x0.shape[:1]:
        raise ValueError(f"batch['label'] must have shape ({x0.shape[0]},); got {label.shape}")
    return x0, label


def make_loss(
    model_fn: Callable,
    schedule: Schedule,
    *,
    prediction: str = "eps",
    objective: str = "eps",
    weighting: str = "likelihood",
    reduce: str = "mean",
    t_eps: Optional[float] = None,
    antithetic: bool = False,
    time_sampling: str = "uniform",
    logit_normal: tuple[float, float] = (0.0, 1.0),
    cond_drop_prob: float = 0.0,
    null_label: Optional[int] = None,
    learned_variance: bool = False,
    min_snr_gamma: Optional[float] = None,
    vlb_variance: str = "posterior",
    vlb_weight: float = 0.001,
    decoder: str = "discretized",
    num_bits: int = 8,
    data_range=(-1.0, 1.0),
):
    """Build ``loss_fn(params, batch, key) -> (loss, aux)`` for ``model_fn(params, x, t, cond)``.

    ``batch`` is a dict with ``"x"`` (batch, ...), optionally ``"label"`` (batch,) int and ``"noise"`` (the
    shape of x): the eps paired with each x_0 (reflow's couplings) instead of fresh Gaussian noise.
    ``reduce``: per-example mean (``"mean"``) or sum (``"sum"``) over data dims.
    ``aux`` holds the per-example losses and the times drawn.
    ``vlb_variance`` (objective "vlb" without a learned variance): "posterior" (beta_tilde) or
    "large" (beta); ``decoder``, ``num_bits``, ``data_range``: the L_0 term's decoder.
    ``time_sampling`` ("uniform" / "logit_normal" with ``logit_normal=(m, s)``): how t is drawn (module
    docstring; continuous schedules only).
    """
    check_prediction(prediction)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}; got {objective!r}")
    if weighting not in ("likelihood", "sigma2"):
        raise ValueError(f"weighting must be 'likelihood' or 'sigma2'; got {weighting!r}")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum'; got {reduce!r}")
    if not 0.0 <= cond_drop_prob <= 1.0:
        raise ValueError(f"cond_drop_prob must lie in [0, 1]; got {cond_drop_prob}")
    if cond_drop_prob > 0 and null_label is None:
        raise ValueError("cond_drop_prob > 0 needs null_label (the class index meaning 'no condition')")
    discrete = schedule.num_timesteps if isinstance(schedule, DiscreteDDPM) else None
    if time_sampling not in TIME_SAMPLINGS:
        raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}; got {time_sampling!r}")
    if time_sampling == "logit_normal" and discrete is not None:
        raise ValueError("time_sampling='logit_normal' draws continuous times; a DiscreteDDPM chain draws its steps "
                         "uniformly")
    if time_sampling == "logit_normal" and not (len(logit_normal) == 2 and logit_normal[1] > 0):
        raise ValueError(f"logit_normal must be (mean, std) with std > 0; got {logit_normal!r}")
    ln = tuple(map(float, logit_normal)) if time_sampling == "logit_normal" else None
    if objective in ("vlb", "hybrid") and (discrete is None or discrete < 2):
        raise ValueError(f"objective={objective!r} needs a DiscreteDDPM schedule with >= 2 steps; "
                         f"got {type(schedule).__name__}")
    if objective == "hybrid" and not learned_variance:
        raise ValueError("objective='hybrid' trains the variance: set learned_variance=True")
    if vlb_variance not in VLB_VARIANCES[:2]:
        raise ValueError(f"vlb_variance must be one of {VLB_VARIANCES[:2]}; got {vlb_variance!r}")
    if decoder not in ("discretized", "gaussian"):
        raise ValueError(f"decoder must be 'discretized' or 'gaussian'; got {decoder!r}")
    if vlb_weight < 0:
        raise ValueError(f"vlb_weight must be >= 0; got {vlb_weight}")
    if min_snr_gamma is not None and objective not in _X0_WEIGHT_DENOM:
        raise ValueError(f"min_snr_gamma weights the regression objectives {tuple(_X0_WEIGHT_DENOM)}; "
                         f"got objective={objective!r}")
    if min_snr_gamma is not None and not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0; got {min_snr_gamma}")
    t_lo, t_hi = _time_range(schedule, t_eps)

    def loss_fn(params, batch, key):
        x0, label = _unpack(batch)
        k_t, k_eps, k_drop = jax.random.split(key, 3)
        n = x0.shape[0]
        t = sample_times(k_t, n, t_lo, t_hi, antithetic, discrete, ln)
        eps = batch["noise"] if "noise" in batch else jax.random.normal(k_eps, x0.shape, x0.dtype)
        x_t = schedule.marginal(x0, t, eps)
        cond = label
        if label is not None and cond_drop_prob > 0:
            cond = drop_condition(k_drop, label, cond_drop_prob, null_label)
        out = model_fn(params, x_t, t.astype(x0.dtype), cond)
        want = x0.shape[:-1] + (2 * x0.shape[-1],) if learned_variance else x0.shape
        if out.shape != want:
            raise ValueError(f"model output shape {out.shape} does not match {want} "
                             f"(x shape {x0.shape}, learned_variance={learned_variance})")
        pred, frac = split_variance(out) if learned_variance else (out, None)
        d = to_x0_eps(pred, prediction, x_t, t, schedule)
        if objective in ("vlb", "hybrid"):
            per_example = _vlb_loss(d, frac, x0, x_t, t, eps)
        else:
            err = _regression_error(d, x0, eps, x_t, t)
            per_example = jnp.mean(err, -1) if reduce == "mean" else jnp.sum(err, -1)
        return jnp.mean(per_example), {"loss_per_example": per_example, "t": t}

    def _regression_error(d, x0, eps, x_t, t):
        if objective == "dsm":
            # ||s_hat - grad log q||^2 = ||eps_hat - eps||^2 / sigma^2 ; weight w(t)
            tb = broadcast_time(t, x0)
            sigma2 = schedule.sigma2(tb)
            w = schedule.g2(tb) if weighting == "likelihood" else sigma2
            err = w / sigma2 * (d.eps - eps) ** 2
            if weighting == "likelihood":
                err = 0.5 * (t_hi - t_lo) * err  # the time integral's Monte-Carlo estimate
        else:
            target = from_x0_eps(Denoised(x0, eps), objective, x_t, t, schedule)
            err = (from_x0_eps(d, objective, x_t, t, schedule) - target) ** 2
            if min_snr_gamma is not None:
                tb = broadcast_time(t, x0)
                a2, s2 = schedule.alpha(tb) ** 2, schedule.sigma2(tb)
                # min(SNR, gamma) / weight = min(alpha^2, gamma sigma^2) / (sigma^2 weight): finite at sigma -> 0
                err = err * jnp.minimum(a2, min_snr_gamma * s2) / _X0_WEIGHT_DENOM[objective](a2, s2)
        return err.reshape(x0.shape[0], -1)

    def _vlb_loss(d, frac, x0, x_t, t, eps):
        dims = math.prod(x0.shape[1:])
        x0_hat = d.x0
        if objective == "hybrid":
            x0_hat = jax.lax.stop_gradient(x0_hat)  # the bound trains only the variance
        if learned_variance:
            log_var = ddpm_log_variance(schedule, broadcast_time(t, x0), "learned", frac)
        else:
            log_var = ddpm_log_variance(schedule, broadcast_time(t, x0), vlb_variance)
        term = ddpm_vlb_term(schedule, x0, x_t, t, x0_hat, log_var,
                             decoder=decoder, num_bits=num_bits, data_range=data_range)
        bound = discrete * term  # N E_n[L_{n-1}]: unbiased for the sum over the chain
        if objective == "vlb":
            bound = bound + ddpm_prior_kl(schedule, x0)  # constant in the parameters; makes it the bound
            return bound / dims if reduce == "mean" else bound
        simple = jnp.sum(((d.eps - eps) ** 2).reshape(x0.shape[0], -1), -1)
        bpd = bound / (dims * _LN2)
        return (simple / dims + vlb_weight * bpd) if reduce == "mean" else (simple + vlb_weight * bpd * dims)

    return loss_fn


def label_log_prob(logits, labels):
    """log softmax(logits)[y] per example: log p(y | x) of a classifier's (batch, K) logits."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
    return jnp.take_along_axis(log_p, jnp.asarray(labels)[:, None].astype(jnp.int32), axis=1)[:, 0]


def make_classifier_loss(classifier_fn: Callable, schedule: Schedule, *, num_classes: int,
                         t_eps: Optional[float] = None, antithetic: bool = False):
    """``loss_fn(params, batch, key) -> (loss, aux)`` of a noise-conditional classifier p_phi(y | x_t, t).

    Cross-entropy -log p_phi(y | x_t, t) with t ~ U[t_eps, t_max] (uniform steps for a discrete
    chain) and x_t ~ q(x_t | x_0): the classifier sees the noise levels guidance will ask it about
    (Dhariwal & Nichol 2021 sec. 4). ``classifier_fn(params, x, t, cond)`` returns logits of
    shape (batch, num_classes). aux: per-example losses, times, and correctness of the argmax.
    """
    t_lo, t_hi = _time_range(schedule, t_eps)
    discrete = schedule.num_timesteps if isinstance(schedule, DiscreteDDPM) else None

    def loss_fn(params, batch, key):
        x0, label = _unpack(batch, need_label=True)
        k_t, k_eps = jax.random.split(key)
        t = sample_times(k_t, x0.shape[0], t_lo, t_hi, antithetic, discrete)
        x_t = schedule.marginal(x0, t, jax.random.normal(k_eps, x0.shape, x0.dtype))
        logits = classifier_fn(params, x_t, t.astype(x0.dtype), None)
        if logits.shape != (x0.shape[0], num_classes):
            raise ValueError(f"classifier output shape {logits.shape} does not match (batch, num_classes) = "
                             f"{(x0.shape[0], num_classes)}")
        per_example = -label_log_prob(logits, label)
        correct = jnp.argmax(logits, -1) == label
        return jnp.mean(per_example), {"loss_per_example": per_example, "t": t, "correct": correct}

    return loss_fn
