"""Task ``progressive_distillation``: ``diffjax.progressive`` (Salimans & Ho 2022, Algorithm 2) as a main-job task.

Config section ``config.progressive``:

* ``teacher_steps`` N_0: the DDIM steps of the teacher run (``config.distill.teacher_workdir``), a power of 2;
* ``num_stages`` K: halvings; stage k (k = 0..K-1) trains a student of N_0 / 2^(k+1) steps, the last one of
  N_0 / 2^K (``sample.num_steps`` must be that count);
* ``steps_per_stage``: updates per stage (``training.num_steps`` = K x steps_per_stage);
* ``weighting``: "truncated_snr" (x-MSE x max(SNR, 1), the paper's default) or "snr_plus_one" (x-MSE x (SNR + 1),
  the v-MSE on a VP schedule);
* ``next_teacher``: the weights the next stage's teacher takes at a stage end, "ema" (the paper: its code loads
  the student checkpoint's EMA weights, trained with EMA decay 0, so they are the raw weights) or "params".

The student starts from the teacher's EMA weights and keeps training its own weights across stage ends (the
paper re-initialises the student from the new teacher: the same weights when ``optim.ema_decay`` = 0, as the
paper's distillation configs and ours set; with a decay > 0 and ``next_teacher="ema"`` the student continues
from its raw weights). Adam's moments carry over the stage ends. ``TrainState.extra`` = {"teacher": weights},
replaced inside the jitted step at each stage end, so one compiled step serves every stage and a resumed run
continues the stages exactly. Checkpoint ``k * steps_per_stage`` is the student of stage k - 1
(``diffjax.load_run(workdir, step=...)``), sampled by default with its N_0 / 2^k steps (``sample_steps``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffjax import models as models_lib
from diffjax.progressive import WEIGHTINGS, check_stages, make_progressive_loss, next_teacher, trained_steps
from diffjax.training.builders import ConfigError, _fail
from diffjax.training.step import ContextLoss
from diffjax.training.tasks import _SAME_FIELDS, TaskSpec, check_teacher, load_teacher

__all__ = ["TASK", "NEXT_TEACHER", "progressive_config"]

NEXT_TEACHER = ("ema", "params")
_FIELDS = ("teacher_steps", "num_stages", "steps_per_stage", "weighting", "next_teacher")


def progressive_config(config, *, teacher_workdir: str, teacher_steps: int, num_stages: int, steps_per_stage: int,
                       learning_rate: float, weighting: str = "truncated_snr", next_teacher: str = "ema"):
    """``config`` (the teacher's) made a progressive-distillation run with the paper's distillation settings
    (its ``config/*_distill.py``): dropout 0, EMA decay 0, no warm-up, gradient clipping at 1; ``training.num_steps``
    = ``num_stages`` x ``steps_per_stage``, a kept checkpoint at every stage end; DDIM on the trailing grid with the
    last student's steps; no PF-ODE NLL (the student is not the ODE's denoiser)."""
    import ml_collections

    config.task = "progressive_distillation"
    config.distill.teacher_workdir = teacher_workdir
    config.progressive = ml_collections.ConfigDict(dict(
        teacher_steps=teacher_steps, num_stages=num_stages, steps_per_stage=steps_per_stage, weighting=weighting,
        next_teacher=next_teacher))
    config.model.dropout = 0.0
    config.optim.update(learning_rate=learning_rate, warmup_steps=0, grad_clip=1.0, ema_decay=0.0)
    config.training.update(num_steps=num_stages * steps_per_stage, checkpoint_every=steps_per_stage,
                           max_to_keep=num_stages + 1)
    config.sample.update(method="ddim", grid="trailing", num_steps=teacher_steps >> num_stages)
    config.eval.num_examples = 0
    return config


def _section(config):
    p = config.get("progressive")
    if p is None:
        _fail("progressive", f"task 'progressive_distillation' needs the section config.progressive with {_FIELDS}")
    return p


def _schedule_args(config) -> dict:
    p = config.progressive
    return dict(teacher_steps=p.teacher_steps, steps_per_stage=p.steps_per_stage, num_stages=p.num_stages)


def validate(config) -> None:
    """Reject an unusable ``config.progressive`` (and the fields it constrains) with a ``ConfigError`` naming the field."""
    p = _section(config)
    for name in _FIELDS:
        if name not in p:
            _fail(f"progressive.{name}", "missing")
    try:
        check_stages(**_schedule_args(config))
    except ValueError as e:  # "<argument> must ..."
        name, msg = str(e).split(" ", 1)
        _fail(f"progressive.{name}", msg)
    n0, k, per_stage = p.teacher_steps, p.num_stages, p.steps_per_stage
    if p.weighting not in WEIGHTINGS:
        _fail("progressive.weighting", f"must be one of {WEIGHTINGS}; got {p.weighting!r}")
    if p.next_teacher not in NEXT_TEACHER:
        _fail("progressive.next_teacher", f"must be one of {NEXT_TEACHER}; got {p.next_teacher!r}")
    teacher = config.get("distill", {}).get("teacher_workdir")
    if not (isinstance(teacher, str) and teacher):
        _fail("distill.teacher_workdir", f"task 'progressive_distillation' needs the teacher run's workdir; "
                                         f"got {teacher!r}")
    t = config.training
    if t.num_steps != k * per_stage:
        _fail("training.num_steps", f"must be progressive.num_stages x progressive.steps_per_stage = {k} x "
                                    f"{per_stage} = {k * per_stage}; got {t.num_steps}")
    if per_stage % t.checkpoint_every:
        _fail("training.checkpoint_every", f"must divide progressive.steps_per_stage = {per_stage} (every stage's "
                                           f"last student is checkpointed); got {t.checkpoint_every}")
    if t.max_to_keep < t.num_steps // t.checkpoint_every:
        _fail("training.max_to_keep", f"must be >= training.num_steps / training.checkpoint_every = "
                                      f"{t.num_steps // t.checkpoint_every} (every stage's student is kept); "
                                      f"got {t.max_to_keep}")
    if config.sample.method != "ddim":
        _fail("sample.method", f"a progressive-distillation student is a DDIM sampler; got {config.sample.method!r}")
    if config.sample.get("grid") != "trailing":
        _fail("sample.grid", f"must be 'trailing', the grid the student is trained on (diffjax.progressive); "
                             f"got {config.sample.get('grid')!r}")
    if config.sample.num_steps != n0 >> k:
        _fail("sample.num_steps", f"must be the last student's teacher_steps / 2 ** num_stages = {n0 >> k}; "
                                  f"got {config.sample.num_steps}")


def _check_model(config, teacher_config) -> None:
    """The student is the teacher's network; only its dropout may differ (the paper distils with dropout 0)."""
    mine = config.copy_and_resolve_references()
    mine.model.dropout = teacher_config.model.get("dropout", mine.model.get("dropout"))
    check_teacher(mine, teacher_config, ("model",))


def init(config, schedule, module, params, restore_only: bool):
    """(student params, {"teacher": teacher params}): both the teacher run's EMA weights; ``restore_only``:
    copies of ``params`` (a checkpoint is restored over them; the teacher is not read)."""
    if restore_only:
        return params, {"teacher": jax.tree.map(jnp.copy, params)}
    teacher = load_teacher(config, tuple(f for f in _SAME_FIELDS if f != "model"))
    _check_model(config, teacher.config)
    if teacher.prediction != config.diffusion.prediction:
        raise ConfigError(f"config.diffusion.prediction: {config.diffusion.prediction!r} differs from the teacher's "
                          f"{teacher.prediction!r} (the student starts from the teacher's weights)")
    if jax.tree.structure(teacher.params) != jax.tree.structure(params):
        raise ConfigError("config.distill.teacher_workdir: the teacher's parameters do not fit config.model")
    student = jax.tree.map(lambda a: jnp.array(a, copy=True), teacher.params)
    return student, {"teacher": jax.tree.map(lambda a: jnp.array(a, copy=True), teacher.params)}


def build_loss(config, schedule, module) -> ContextLoss:
    """The ``ContextLoss`` of Algorithm 2: the teacher is ``TrainState.extra["teacher"]``, replaced at stage ends."""
    p = config.progressive
    apply_train = models_lib.make_model_fn(module, train=True)
    apply_eval = models_lib.make_model_fn(module, train=False)
    conditional = config.model.get("num_classes") is not None
    args = _schedule_args(config)
    take_ema = p.next_teacher == "ema"

    def loss_fn(params, batch, key, ctx):
        k_loss, k_drop = jax.random.split(key)
        batch = {"x": batch["x"], **({"label": batch["label"]} if conditional else {})}

        def student_fn(q, x, t, cond):
            return apply_train(q, x, t, cond, rng=k_drop)

        loss = make_progressive_loss(student_fn, apply_eval, schedule, prediction=config.diffusion.prediction,
                                     weighting=p.weighting, **args)
        return loss(params, ctx.extra["teacher"], batch, k_loss, ctx.step)

    def update_extra(ctx, params):
        new = ctx.ema_params if take_ema else params
        return {"teacher": next_teacher(ctx.step, ctx.extra["teacher"], new, p.steps_per_stage, p.num_stages)}

    return ContextLoss(loss_fn, update_extra)


def sample_steps(config, step: int) -> int:
    """The DDIM steps of the student checkpointed at ``step`` (``diffjax.progressive.trained_steps``)."""
    return trained_steps(step, **_schedule_args(config))


TASK = TaskSpec(build_loss=build_loss, validate=validate, init=init, samples=True, nll=False,
                sample_steps=sample_steps)
