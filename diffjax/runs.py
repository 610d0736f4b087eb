"""Trained runs from Python: ``diffjax.load_run(workdir)`` rebuilds a main-job run for sampling and likelihoods.

    run = diffjax.load_run("runs/digits")
    x = run.sample(64, method="ddim", num_steps=50, key=jax.random.PRNGKey(0))   # uint8 (64, 8, 8, 1)
    run.nll_per_dim(x)["mean"]                                                    # bits/dim, as test_bpd
    run.log_likelihood(x_model_space).logp                                        # nats per example
    guided = diffjax.load_run("runs/digits-cond").sample(10, labels=np.arange(10), guidance_scale=2.0)

The model, schedule and data spec are rebuilt from the config stored with the checkpoint (older runs:
``WORKDIR/config.json``); ``params`` are the EMA weights, which sampling and evaluation use. Samples
come back in the data's range and shape (n-bit images as unsigned integers (N, H, W, C), toy data
float32 (N, D)), and ``nll_per_dim`` takes the same form, so ``run.nll_per_dim(run.sample(...))`` works.
A latent-diffusion run (task "latent_diffusion") samples latents and returns them decoded, as images of the same
form; its checkpoints carry the autoencoder's weights and the latent scale factor, so only its own workdir is read.
``python -m diffjax.generate`` is this module behind flags.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

__all__ = ["TrainedRun", "load_run", "load_config", "check_same_schedule", "check_sampler_args", "check_guidance",
           "guided_denoiser"]

_SCHEDULE_FIELDS = ("schedule", "beta_min", "beta_max", "sigma_min", "sigma_max", "num_timesteps")


def load_config(workdir: str, step: Optional[int] = None):
    """The config of ``workdir``'s checkpoint ``step`` (default: the latest), else ``WORKDIR/config.json``."""
    import ml_collections

    from diffjax.training.checkpoint import Checkpointer

    stored = None
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        stored = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).config(step)
    if stored is None:
        path = os.path.join(workdir, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: the workdir must be a directory written by "
                                    f"python -m diffjax.main")
        with open(path) as f:
            stored = json.load(f)
    return ml_collections.ConfigDict(stored)


def check_same_schedule(model_config, classifier_config) -> None:
    """A guiding classifier must be trained on the model's noise schedule (its x_t are the model's)."""
    a = {k: model_config.diffusion.get(k) for k in _SCHEDULE_FIELDS}
    b = {k: classifier_config.diffusion.get(k) for k in _SCHEDULE_FIELDS}
    if a != b:
        raise ValueError(f"the classifier was trained on another schedule: {b} vs the model's {a}")


def check_sampler_args(method, num_steps, prefix: str = "") -> None:
    """``method`` is a ``diffjax.sample`` method and ``num_steps`` >= 1 (errors name them with ``prefix``,
    e.g. "--" for the CLI's flags)."""
    from diffjax.samplers import METHODS

    if not (isinstance(num_steps, (int, np.integer)) and num_steps >= 1):
        raise ValueError(f"{prefix}num_steps must be >= 1; got {num_steps}")
    if method not in METHODS:
        raise ValueError(f"{prefix}method must be one of {sorted(METHODS)}; got {method!r}")


def check_guidance(num_classes, guidance_scale, has_classifier: bool, classifier_scale, prefix: str = "") -> None:
    """Classifier-free guidance needs a class-conditional model; classifier guidance needs a classifier."""
    if guidance_scale != 0 and num_classes is None:
        raise ValueError(f"{prefix}guidance_scale needs a class-conditional run (config.model.num_classes)")
    if classifier_scale != 0 and not has_classifier:
        need = f"{prefix}classifier_workdir" if prefix else "a classifier"
        raise ValueError(f"{prefix}classifier_scale needs {need} (a run with config.task=classifier)")


def guided_denoiser(model_fn, schedule, *, prediction: str, num_classes, guidance_scale=0.0, classifier_fn=None,
                    classifier_scale=0.0):
    """The ``Denoiser`` of ``model_fn`` with classifier-free guidance (weight w = ``guidance_scale``, null class
    ``num_classes``) and, given a classifier's logits function, classifier guidance (ADM-G, scale s); the model
    sees labels only if it is class-conditional. The one place the CLI and ``TrainedRun.sample`` build guidance."""
    from diffjax import guidance
    from diffjax.parameterization import make_denoiser

    denoiser = make_denoiser(model_fn, schedule, prediction)
    if guidance_scale != 0:
        denoiser = guidance.classifier_free_guidance(denoiser, float(guidance_scale), null_cond=num_classes)
    if classifier_fn is not None:  # scale 0 still drops the labels an unconditional model must not see
        denoiser = guidance.classifier_guidance(denoiser, guidance.classifier_log_prob(classifier_fn),
                                                float(classifier_scale), unconditional=num_classes is None)
    return denoiser


class TrainedRun:
    """A main-job run restored from its workdir (see the module docstring); build with ``load_run``."""

    def __init__(self, run, workdir: str):
        self.run = run  # the diffjax.training.loop.Run: module, mesh, full TrainState, checkpointer
        self.workdir = workdir

    @property
    def config(self):
        return self.run.config

    @property
    def schedule(self):
        return self.run.schedule

    @property
    def spec(self):
        """The data spec: shape, kind ("image" / "toy"), num_bits, num_classes."""
        return self.run.spec

    @property
    def step(self) -> int:
        return int(self.run.state.step)

    @property
    def task(self) -> str:
        return self.config.get("task", "diffusion")

    @property
    def default_num_steps(self) -> int:
        """The sampler steps this checkpoint is sampled with by default: ``config.sample.num_steps``, or the task's
        own count at this step (a progressive-distillation student's stage)."""
        steps = self._spec.sample_steps
        return self.config.sample.num_steps if steps is None else int(steps(self.config, self.step))

    @property
    def _spec(self):
        from diffjax.training.tasks import get_task

        return get_task(self.task)

    @property
    def prediction(self) -> str:
        """What ``model_fn`` predicts: "eps", "x0", "v" or "score" (config.diffusion.prediction)."""
        return self.config.diffusion.prediction

    @property
    def num_classes(self) -> Optional[int]:
        """The classes the model is conditioned on (None: unconditional)."""
        return self.config.model.get("num_classes")

    @property
    def params(self):
        """The EMA parameters (variables dict), the weights sampling and evaluation use."""
        return self.run.state.ema_params

    @property
    def denoiser(self):
        """``diffjax.make_denoiser`` of ``model_fn``: the run's schedule and prediction type travel with it."""
        from diffjax.parameterization import make_denoiser

        return make_denoiser(self.model_fn, self.schedule, self.prediction)

    @property
    def model_fn(self):
        """``model_fn(x, t, cond=None)`` of the EMA parameters in eval mode, in the model's range (a pytree)."""
        from diffjax.training.loop import ema_model_fn

        return ema_model_fn(self.run)

    def sample(self, num_samples: int, *, method: Optional[str] = None, num_steps: Optional[int] = None, key=None,
               labels=None, guidance_scale: float = 0.0, classifier: Optional["TrainedRun"] = None,
               classifier_scale: float = 0.0, batch_size: int = 500, return_nfe: bool = False, **options):
        """``num_samples`` samples in the data's range and shape, drawn in batches of ``batch_size``.

        ``method`` / ``num_steps`` default to the run's ``config.sample`` (steps: ``default_num_steps``); ``key`` to PRNGKey(0) (batch i
        uses ``fold_in(key, i)``). ``labels`` (num_samples,) int: the classes of a conditional model or
        of classifier guidance. ``guidance_scale`` w: classifier-free guidance; ``classifier`` (a
        classifier run on the same schedule) and ``classifier_scale`` s: classifier guidance.
        ``options`` (e.g. ``grid``) go to ``diffjax.sample``. Returns the samples, or with ``return_nfe``
        (samples, model evaluations per sample).
        """
        import jax

        from diffjax.data import from_data_range
        from diffjax.training.loop import generate

        if not self._spec.samples:
            raise ValueError(f"{self.workdir} holds a {self.task} run, which draws no samples")
        if not (isinstance(num_samples, (int, np.integer)) and num_samples >= 1):
            raise ValueError(f"num_samples must be >= 1; got {num_samples}")
        if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        method = self.config.sample.method if method is None else method
        num_steps = self.default_num_steps if num_steps is None else num_steps
        check_sampler_args(method, num_steps)
        check_guidance(self.num_classes, guidance_scale, classifier is not None, classifier_scale)
        classifier_fn = None
        if classifier is not None:
            if classifier.task != "classifier":
                raise ValueError(f"{classifier.workdir} holds a {classifier.task} run, not a classifier run")
            check_same_schedule(self.config, classifier.config)
            if self.num_classes is not None and classifier.spec.num_classes != self.num_classes:
                raise ValueError(f"the classifier has {classifier.spec.num_classes} classes, the model "
                                 f"{self.num_classes}")
            classifier_fn = classifier.model_fn
        takes_labels = self.num_classes is not None or classifier is not None
        if takes_labels != (labels is not None):
            raise ValueError("labels are needed exactly when the model is class-conditional or a classifier "
                             f"guides it; got labels={'None' if labels is None else 'an array'}, "
                             f"num_classes={self.num_classes}, classifier={classifier is not None}")
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (num_samples,) or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"labels must be ({num_samples},) integers; got {labels.dtype}{list(labels.shape)}")
            labels = labels.astype(np.int32)
        denoiser = guided_denoiser(self.model_fn, self.schedule, prediction=self.prediction,
                                   num_classes=self.num_classes, guidance_scale=guidance_scale,
                                   classifier_fn=classifier_fn, classifier_scale=classifier_scale)
        key = jax.random.PRNGKey(0) if key is None else key
        chunks, nfe = [], 0
        for i, start in enumerate(range(0, num_samples, batch_size)):
            n = min(batch_size, num_samples - start)
            cond = None if labels is None else labels[start:start + n]
            x, nfe = generate(self.run, method=method, num_steps=num_steps, num_samples=n,
                            key=jax.random.fold_in(key, i), cond=cond, model_fn=denoiser, **options)
            chunks.append(x)
        x = np.concatenate(chunks)
        x = x if self.spec.num_bits is None else from_data_range(x, self.spec.num_bits)
        return (x, nfe) if return_nfe else x

    def _likelihood_input(self, x) -> np.ndarray:
        """``x`` as an array of shape (N, *data shape), N >= 1, of a diffusion run; else a ValueError naming it."""
        if not self._spec.nll:
            raise ValueError(f"{self.workdir} holds a {self.task} run, whose network is not a denoiser of the "
                             f"probability-flow ODE of the data: it has no likelihood of images (a latent run's "
                             f"NLL is in latent space, metrics.json's test_latent_bits_per_dim)")
        x = np.asarray(x)
        if x.ndim != len(self.spec.shape) + 1 or x.shape[1:] != tuple(self.spec.shape) or len(x) == 0:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, self.spec.shape))}) with N >= 1; "
                             f"got {x.shape}")
        return x

    def nll_per_dim(self, x, *, key=None, batch_size: Optional[int] = None) -> dict:
        """Negative log-likelihood per dimension of ``x`` under the EMA model's probability-flow ODE, as the
        main job's evaluation reports it: bits/dim for n-bit images (``x`` (N, H, W, C) integers, uniformly
        dequantized), nats/dim for continuous data (``x`` (N, D)). Returns mean, stderr, num_examples, nfe
        and unit ("bits/dim" or "nats/dim"); ``batch_size`` defaults to ``config.eval.batch_size``."""
        import chex
        import jax

        from diffjax.training.loop import nll_per_dim

        x = self._likelihood_input(x)
        if self.spec.num_bits is not None:  # integer pixels, as the evaluation pipeline feeds them
            if not np.issubdtype(x.dtype, np.integer):
                raise ValueError(f"x must hold {self.spec.num_bits}-bit integers (the data's range, as sample() "
                                 f"returns); got dtype {x.dtype}")
        else:
            x = x.astype(np.float32)
            chex.assert_tree_all_finite(x)
        batch_size = batch_size or self.config.eval.batch_size
        key = jax.random.PRNGKey(0) if key is None else key
        return nll_per_dim(self.run, (x[i:i + batch_size] for i in range(0, len(x), batch_size)), key)

    def log_likelihood(self, x, **options):
        """log p(x) in nats per example under the EMA model's probability-flow ODE (``diffjax.log_likelihood``,
        Song et al. 2021 eq. 39), for ``x`` in the model's own data space (images scaled to [-1, 1], not
        integers; ``nll_per_dim`` takes the data's range and dequantizes). ``options`` (trace, key, rtol,
        atol, ...) go to ``diffjax.log_likelihood``; returns its ``LikelihoodResult`` (logp, nfe, z)."""
        from diffjax.likelihood import log_likelihood

        x = self._likelihood_input(x)
        return log_likelihood(self.denoiser, None, x.astype(np.float32), **options)

    def __repr__(self):
        return (f"TrainedRun({self.workdir!r}, step={self.step}, task={self.task!r}, model={self.config.model.name!r}, "
                f"schedule={self.config.diffusion.schedule!r}, prediction={self.prediction!r})")


def load_run(workdir: str, *, step: Optional[int] = None, task: Optional[str] = None,
             num_devices: Optional[int] = None) -> TrainedRun:
    """The run trained in ``workdir`` at checkpoint ``step`` (default: the latest), built from the config stored
    with that checkpoint and laid out data-parallel over ``num_devices`` (default: every device).
    ``task`` (a ``config.task`` name), if given, must be the run's."""
    import ml_collections

    from diffjax.training.loop import setup

    config = load_config(workdir, step)
    run_task = config.get("task", "diffusion")
    if task is not None and run_task != task:
        raise ValueError(f"{workdir} holds a {run_task} run, not a {task} run")
    # sampling and evaluation need no model or FSDP split: one data-parallel mesh restores any checkpoint
    config.training.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
    config.training.num_devices = num_devices
    config.training.batch_size = _fit(config.training, num_devices)
    # a run still training there is left alone; a student's teacher is not read (the checkpoint holds its copy)
    run = setup(config, workdir, restore=False, read_only=True, structure_only=True)
    if run.checkpointer.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
    if step is not None and step not in run.checkpointer.all_steps():
        raise FileNotFoundError(f"no checkpoint of step {step} under {workdir}/checkpoints; "
                                f"steps: {run.checkpointer.all_steps()}")
    run.state = run.checkpointer.restore(run.state, step)
    return TrainedRun(run, workdir)


def _fit(training, num_devices: Optional[int]) -> int:
    """A training batch size that splits over the loading mesh (validation checks it; loading trains nothing)."""
    import jax

    shards = (num_devices or jax.device_count()) * training.get("grad_accum_steps", 1)
    return training.batch_size if training.batch_size % shards == 0 else shards

