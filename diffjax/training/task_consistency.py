"""Tasks ``consistency_distillation`` (CD, CM paper Alg. 2) and ``consistency_training`` (CT, Alg. 3 and the
improved-CT choices of Song & Dhariwal 2023): the math is ``diffjax.consistency``; this module reads
``config.consistency``, builds the loss and the initial state.

``TrainState.extra``: CD {"teacher": the teacher's EMA weights, "target": theta-}; CT {"target": theta-}, or
None with ``consistency.target_ema = False`` (iCT: theta- = stop_gradient(theta)). A CD student starts from
the teacher's weights (as the CM reference code does: it copies the teacher into the model and the target),
so ``config.diffusion.prediction`` must be the teacher's (the network keeps its prediction type; the
consistency parameterization reads its x0 estimate). A CT student starts from a fresh init.

The run's network is the raw network F; ``consistency_model_fn`` (or ``eval_apply`` on the run's eval-mode
apply) turns it into the consistency function, which ``diffjax.sample(..., method="consistency")`` samples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffjax import consistency as cm
from diffjax import models as models_lib
from diffjax.parameterization import make_denoiser
from diffjax.training.builders import SCHEDULES, ConfigError, _fail, build_schedule
from diffjax.training.tasks import TaskSpec, load_teacher

__all__ = ["DISTILLATION_TASK", "TRAINING_TASK", "consistency_config", "settings_from_config", "eval_apply", "consistency_model_fn"]


def consistency_config(config, task: str, **fields):
    """``config`` made a run of ``task`` ("consistency_distillation" / "consistency_training"): the section
    ``config.consistency`` with the CM paper's CD defaults updated by ``fields`` (the fields of
    ``ConsistencySettings``), one-step consistency sampling on the trailing grid, no PF-ODE NLL."""
    import ml_collections
    from ml_collections import config_dict

    c = ml_collections.ConfigDict()
    c.num_scales = 18  # N of curriculum "fixed"
    c.curriculum = "fixed"  # "fixed", "ct" (CM paper N(k), mu(k)), "ict" (iCT's doubling N(k))
    c.s0, c.s1 = 2, 150  # curriculum start / end (CM paper CT: 2, 150; iCT: 10, 1280)
    c.mu0 = 0.95  # target EMA rate (curriculum "ct": mu0 of mu(k))
    c.target_ema = True  # False: theta- = stop_gradient(theta) (iCT)
    c.loss = "l2"  # "l2", "l1", "pseudo_huber" (LPIPS needs a downloaded VGG)
    c.huber_c = config_dict.placeholder(float)  # None: 0.00054 sqrt(d) (iCT)
    c.solver = "ddim"  # the teacher's ODE step (CD): "ddim", "euler", "heun"
    c.sigma_data = 0.5
    c.sigma_min = 0.002  # s_min of the boundary condition, s = sigma / alpha
    c.sigma_max = config_dict.placeholder(float)  # None: s at the schedule's t_max (where sampling starts)
    c.rho = 7.0
    c.noise_sampling = "uniform"  # "uniform" over the N - 1 intervals, or "lognormal" (iCT; p_mean, p_std)
    c.p_mean, c.p_std = -1.1, 2.0
    c.weighting = "uniform"  # "uniform", or "ict": 1 / (s_{i+1} - s_i)
    c.update(fields)
    config.task = task
    config.consistency = c
    config.sample.method = "consistency"
    config.sample.num_steps = 1
    config.sample.grid = "trailing"  # 1 step: [t_max, 0]; 2 steps: [t_max, t_max / 2, 0]
    config.eval.num_examples = 0  # no PF-ODE NLL: the network is not the ODE's denoiser
    return config


def _sigma_max(config, schedule) -> float:
    """s_max: ``consistency.sigma_max``, or None: s(schedule.t_max), so the model covers where sampling starts."""
    s_max = config.consistency.get("sigma_max")
    return float(cm.scaled_sigma(schedule, schedule.t_max)) if s_max is None else float(s_max)


def settings_from_config(config, schedule=None) -> cm.ConsistencySettings:
    """``ConsistencySettings`` of ``config.consistency`` (CT curricula run over ``config.training.num_steps``)."""
    schedule = build_schedule(config.diffusion) if schedule is None else schedule
    c = config.consistency
    return cm.ConsistencySettings(
        sigma_min=float(c.sigma_min), sigma_max=_sigma_max(config, schedule), num_scales=int(c.num_scales),
        curriculum=c.curriculum, s0=int(c.s0), s1=int(c.s1), total_steps=int(config.training.num_steps),
        mu0=float(c.mu0), target_ema=bool(c.target_ema), loss=c.loss,
        huber_c=None if c.get("huber_c") is None else float(c.huber_c), solver=c.get("solver", "ddim"),
        sigma_data=float(c.sigma_data), rho=float(c.rho), noise_sampling=c.noise_sampling,
        p_mean=float(c.p_mean), p_std=float(c.p_std), weighting=c.weighting)


def _validate(config, distillation: bool) -> None:
    if "consistency" not in config:
        _fail("consistency", f"task {config.task!r} needs the section config.consistency "
                             "(experiments/configs/digits_cd.py / digits_ct.py)")
    c = config.consistency
    choices = {"curriculum": cm.CURRICULA, "loss": cm.LOSSES, "noise_sampling": cm.NOISE_SAMPLINGS,
               "weighting": cm.WEIGHTINGS}
    if distillation:
        choices["solver"] = cm.SOLVERS
    for field, allowed in choices.items():
        if c.get(field) not in allowed:
            _fail(f"consistency.{field}", f"must be one of {allowed}; got {c.get(field)!r}")
    for field in ("num_scales", "s0", "s1"):
        v = c.get(field)
        if not isinstance(v, int) or isinstance(v, bool) or v < 2:
            _fail(f"consistency.{field}", f"must be an integer >= 2; got {v!r}")
    if c.curriculum != "fixed" and not c.s1 >= c.s0:
        _fail("consistency.s1", f"must be >= consistency.s0 = {c.s0}; got {c.s1!r}")
    if distillation and c.curriculum == "ct":
        _fail("consistency.curriculum", "'ct' couples N(k) with the CT target EMA mu(k); CD uses 'fixed' "
                                        "(or 'ict') with consistency.mu0")
    if not isinstance(c.target_ema, bool):
        _fail("consistency.target_ema", f"must be True or False; got {c.target_ema!r}")
    if c.target_ema and not 0.0 <= c.mu0 < 1.0:
        _fail("consistency.mu0", f"must lie in [0, 1); got {c.mu0!r}")
    if c.target_ema and c.curriculum == "ct" and not c.mu0 > 0.0:
        _fail("consistency.mu0", f"mu(k) = exp(s0 log mu0 / N(k)) needs mu0 > 0; got {c.mu0!r}")
    for field in ("sigma_data", "sigma_min", "rho", "p_std"):
        v = c.get(field)
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
            _fail(f"consistency.{field}", f"must be > 0; got {v!r}")
    if c.get("huber_c") is not None and not c.huber_c > 0:
        _fail("consistency.huber_c", f"must be > 0 (or None: 0.00054 sqrt(d)); got {c.huber_c!r}")
    if config.diffusion.schedule not in SCHEDULES:
        return  # validate_config names config.diffusion.schedule
    if config.diffusion.schedule.startswith("ddpm_"):
        _fail("diffusion.schedule", f"a consistency model needs a continuous schedule; got {config.diffusion.schedule!r}")
    schedule = build_schedule(config.diffusion)
    s_lo = float(cm.scaled_sigma(schedule, 0.0))
    s_hi = float(cm.scaled_sigma(schedule, schedule.t_max))
    if not c.sigma_min > s_lo:
        _fail("consistency.sigma_min", f"{c.sigma_min} must exceed the schedule's sigma/alpha at t = 0 ({s_lo:.4g})")
    s_max = c.get("sigma_max")
    if s_max is not None and not c.sigma_min < s_max <= s_hi * (1 + 1e-6):
        _fail("consistency.sigma_max", f"must lie in (consistency.sigma_min, {s_hi:.4g}] (sigma/alpha at the "
                                       f"schedule's t_max), or None for that; got {s_max!r}")
    if config.sample.method != "consistency":
        _fail("sample.method", f"a consistency model samples with 'consistency' (its network is not a "
                               f"PF-ODE denoiser); got {config.sample.method!r}")
    if distillation and not config.distill.get("teacher_workdir"):
        _fail("distill.teacher_workdir", "consistency distillation needs a teacher run")


def _net_fn(config, module):
    """The student network in training mode, ``(params, x, t, cond, rng)``; labels only for a conditional model."""
    apply = models_lib.make_model_fn(module, train=True)
    conditional = bool(config.model.get("num_classes"))

    def net_fn(params, x, t, cond, rng):
        return apply(params, x, t, cond if conditional else None, rng=rng)

    return net_fn


def _loss(config, schedule, module, distillation: bool):
    from diffjax.training.step import ContextLoss

    settings = settings_from_config(config, schedule)
    teacher = None
    if distillation:
        apply_eval = models_lib.make_model_fn(module, train=False)
        prediction = config.diffusion.prediction
        conditional = bool(config.model.get("num_classes"))

        def teacher(extra, x, t, cond):
            net = jax.tree_util.Partial(apply_eval, extra["teacher"])
            return make_denoiser(net, schedule, prediction)(x, t, cond if conditional else None)

    loss_fn, update_extra = cm.make_consistency_loss(_net_fn(config, module), schedule, config.diffusion.prediction,
                                                     settings, teacher)
    return ContextLoss(loss_fn, update_extra if settings.target_ema else None)


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def _init_cd(config, schedule, module, params, restore_only):
    if restore_only:
        return params, {"teacher": _copy(params), "target": _copy(params)}
    teacher = load_teacher(config)
    if teacher.prediction != config.diffusion.prediction:
        raise ConfigError(f"config.diffusion.prediction: {config.diffusion.prediction!r} differs from the teacher's "
                          f"{teacher.prediction!r} (the student starts from the teacher's network)")
    return _copy(teacher.params), {"teacher": _copy(teacher.params), "target": _copy(teacher.params)}


def _init_ct(config, schedule, module, params, restore_only):
    return params, ({"target": _copy(params)} if config.consistency.target_ema else None)


def consistency_model_fn(config, schedule, apply, params):
    """``cm(x, t, cond) -> x0``: the consistency function of a run's eval-mode ``apply(params, x, t, cond)``."""
    settings = settings_from_config(config, schedule)
    return cm.make_consistency_fn(jax.tree_util.Partial(apply, params), schedule, config.diffusion.prediction,
                                  t_min=settings.t_min(schedule), sigma_data=settings.sigma_data)


def eval_apply(config, schedule, apply):
    """The run's eval-mode ``apply(params, x, t, cond)`` made the consistency function, returned as a prediction
    of type ``config.diffusion.prediction`` (so machinery reading the run by that type samples the CM)."""
    settings = settings_from_config(config, schedule)
    t_min = settings.t_min(schedule)
    prediction = config.diffusion.prediction

    def wrapped(params, x, t, cond=None):
        f = cm.make_consistency_fn(lambda x_, t_, c_: apply(params, x_, t_, c_), schedule, prediction,
                                   t_min=t_min, sigma_data=settings.sigma_data)
        return cm.as_prediction(f, schedule, prediction)(x, t, cond)

    return wrapped


DISTILLATION_TASK = TaskSpec(build_loss=lambda c, s, m: _loss(c, s, m, True), validate=lambda c: _validate(c, True),
                             init=_init_cd, samples=True, nll=False, eval_apply=eval_apply)
TRAINING_TASK = TaskSpec(build_loss=lambda c, s, m: _loss(c, s, m, False), validate=lambda c: _validate(c, False),
                         init=_init_ct, samples=True, nll=False, eval_apply=eval_apply)
