"""What ``config.task`` trains: each task is a ``TaskSpec`` (its loss, what it keeps in ``TrainState.extra``,
its data), and the main job, ``diffjax.load_run`` and ``diffjax.generate`` run every task the same way.

* ``diffusion``: a denoiser by the config's objective (``diffjax.losses.make_loss``; flow matching is the
  objective ``flow`` on the ``rectified_flow`` schedule);
* ``classifier``: a noise-conditional classifier for classifier guidance;
* ``progressive_distillation`` (``diffjax.progressive``), ``consistency_distillation`` and
  ``consistency_training`` (``diffjax.consistency``), ``reflow`` (``diffjax.reflow``): few-step
  generators. A teacher run, where there is one, is ``config.distill.teacher_workdir``;
* ``autoencoder``: LDM's KL-regularised autoencoder (``diffjax.autoencoder``, ``config.autoencoder``);
* ``latent_diffusion``: a denoiser on the latents of an autoencoder run (``config.latent.autoencoder_workdir``),
  sampled and returned as images.

The few-step tasks live in their own modules (``diffjax/training/task_*.py``) and are imported when named.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, NamedTuple, Optional

__all__ = ["TaskSpec", "TASK_NAMES", "get_task", "Teacher", "load_teacher", "check_teacher"]


def _nothing(config) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How one ``config.task`` trains and evaluates.

    ``build_loss(config, schedule, module)``: ``loss_fn(params, batch, key)`` or a
    ``diffjax.training.step.ContextLoss`` (reads the teacher / target network in ``TrainState.extra``).
    ``validate(config)``: raises ``ConfigError`` naming a bad field of the task's own section.
    ``init(config, schedule, module, params, restore_only)`` -> (params, extra): the student's initial
    parameters and ``TrainState.extra`` (e.g. the teacher's EMA weights); with ``restore_only`` only their
    structure matters (a checkpoint is restored over them), so no teacher is read.
    ``batches(config, start_step, process_index, process_count)``: the training data as host batches
    (default: ``config.data.dataset`` through ``diffjax.data.train_batches``).
    ``samples``: the run draws samples (a classifier does not); ``nll``: the end-of-run evaluation
    reports the test NLL through the probability-flow ODE (meaningless for a consistency model or a
    distilled student, whose network is not the ODE's denoiser).
    ``sample_steps(config, step)``: the sampler steps the run's checkpoint at ``step`` is sampled with by
    default (a progressive-distillation student halves them stage by stage; None: ``config.sample.num_steps``).
    ``eval_apply(config, schedule, apply) -> apply``: what the run samples and evaluates, made from its network's
    eval-mode ``apply(params, x, t, cond)`` (a consistency model's f, as a prediction of
    ``config.diffusion.prediction``'s type); None: the network itself.
    ``build_model(config) -> module``: the network (None: ``config.model`` through ``builders.build_model``).
    ``init_params(module, key, x_shape) -> variables``: its initial variables on one batch of shape ``x_shape``
    (None: ``diffjax.models.init_params``, the ``model_fn(params, x, t, cond)`` signature).
    ``model_shape(config)``: the shape of one example the network sees and the sampler draws (latents); None:
    the data's.
    ``decode(config) -> decode(extra, y) -> x``: maps the sampler's output to the data range, given
    ``TrainState.extra`` (latents to images); None: the samples are data.
    ``evaluate(run, key) -> dict``: the metrics of the end-of-run and ``training.eval_every`` evaluations in place
    of the pixel test NLL (an autoencoder's reconstruction error, a latent model's latent NLL).
    """

    build_loss: Callable
    validate: Callable[[Any], None] = _nothing
    init: Optional[Callable] = None
    batches: Optional[Callable] = None
    samples: bool = True
    nll: bool = True
    sample_steps: Optional[Callable] = None
    eval_apply: Optional[Callable] = None
    build_model: Optional[Callable] = None
    init_params: Optional[Callable] = None
    model_shape: Optional[Callable] = None
    decode: Optional[Callable] = None
    evaluate: Optional[Callable] = None


# task name -> (module, attribute) of its TaskSpec; imported when the task is used
_REGISTRY = {
    "diffusion": ("diffjax.training.builders", "DIFFUSION_TASK"),
    "classifier": ("diffjax.training.builders", "CLASSIFIER_TASK"),
    "progressive_distillation": ("diffjax.training.task_progressive", "TASK"),
    "consistency_distillation": ("diffjax.training.task_consistency", "DISTILLATION_TASK"),
    "consistency_training": ("diffjax.training.task_consistency", "TRAINING_TASK"),
    "reflow": ("diffjax.training.task_reflow", "TASK"),
    "autoencoder": ("diffjax.training.task_autoencoder", "TASK"),
    "latent_diffusion": ("diffjax.training.task_latent", "TASK"),
}
TASK_NAMES = tuple(_REGISTRY)


def get_task(name: str) -> TaskSpec:
    """The ``TaskSpec`` of ``config.task`` = ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; known: {TASK_NAMES}")
    module, attr = _REGISTRY[name]
    return getattr(importlib.import_module(module), attr)


class Teacher(NamedTuple):
    """A trained run used as a teacher: ``apply(params, x, t, cond)`` in eval mode, its EMA ``params``, its
    schedule and prediction type, and its stored config."""

    apply: Callable
    params: Any
    schedule: Any
    prediction: str
    config: Any


_SAME_FIELDS = ("model", "diffusion.schedule", "diffusion.beta_min", "diffusion.beta_max", "diffusion.sigma_min",
                "diffusion.sigma_max", "diffusion.num_timesteps", "data.dataset")


def _get(config, path: str):
    node = config
    for part in path.split("."):
        node = node.get(part) if hasattr(node, "get") else None
        if node is None:
            return None
    return node.to_dict() if hasattr(node, "to_dict") else node


def check_teacher(config, teacher_config, fields=_SAME_FIELDS) -> None:
    """The student's config must describe the teacher's network, schedule and data (the student starts from
    the teacher's weights and is restored without reading the teacher); raises ``ConfigError`` naming the field."""
    from diffjax.training.builders import ConfigError

    for path in fields:
        mine, theirs = _get(config, path), _get(teacher_config, path)
        if path == "model":  # fields the teacher's run predates take their defaults
            mine = {k: v for k, v in (mine or {}).items() if k not in ("dtype", "kernels")}
            theirs = {k: v for k, v in (theirs or {}).items() if k not in ("dtype", "kernels")}
            mine = {k: list(v) if isinstance(v, tuple) else v for k, v in mine.items()}
            theirs = {k: list(v) if isinstance(v, tuple) else v for k, v in theirs.items()}
        if mine != theirs:
            raise ConfigError(f"config.{path}: {mine!r} differs from the teacher's {theirs!r} "
                              f"(config.distill.teacher_workdir = {config.distill.teacher_workdir!r})")


def load_teacher(config, check_fields=_SAME_FIELDS) -> Teacher:
    """The run in ``config.distill.teacher_workdir`` (latest checkpoint, EMA weights), checked by ``check_teacher``."""
    from diffjax import runs
    from diffjax.training.builders import ConfigError

    workdir = config.get("distill", {}).get("teacher_workdir")
    if not workdir:
        raise ConfigError(f"config.distill.teacher_workdir: task {config.task!r} needs a teacher run; got {workdir!r}")
    try:
        run = runs.load_run(workdir)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config.distill.teacher_workdir: {e}") from None
    if not get_task(run.task).nll:
        raise ConfigError(f"config.distill.teacher_workdir: {workdir} holds a {run.task} run; a teacher must be a "
                          f"denoiser of the probability-flow ODE (a diffusion, flow or reflow run)")
    check_teacher(config, run.config, check_fields)
    return Teacher(run.run.apply_eval, run.params, run.schedule, run.prediction, run.config)
