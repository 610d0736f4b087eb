"""Draw samples from a trained run's latest checkpoint (EMA weights) for any external evaluator.

    python -m diffjax.generate --workdir runs/digits --num_samples 1000 --out samples.npy
    python -m diffjax.generate --workdir runs/digits-cond --num_samples 1000 --labels all \\
        --guidance_scale 2 --method ddim --num_steps 50 --out guided.npy

The model is rebuilt from ``WORKDIR/config.json`` (written by the main job). Samples are saved in
the data's own range and shape: n-bit images as unsigned integers (N, H, W, C), toy data as float32
(N, D). With a class-conditional model, ``--labels`` picks the classes (``all``: 0, 1, ..., K-1
repeated; a list ``3,1,4``, repeated to N; one class ``7``), the labels are saved beside the
samples as ``OUT_labels.npy``, and ``--guidance_scale w > 0`` applies classifier-free guidance
with the model's learned null class. ``--classifier_workdir C --classifier_scale s`` adds
classifier guidance (ADM-G) with the noise-conditional classifier trained in C (same schedule);
the model is given the labels only if it is class-conditional.

    python -m diffjax.generate --workdir runs/digits --classifier_workdir runs/digits_classifier \
        --classifier_scale 2 --labels all --num_samples 100 --out guided.npy
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A main-job workdir (config.json + checkpoints/).", required=True)
flags.DEFINE_integer("num_samples", None, "How many samples to draw.", required=True)
flags.DEFINE_string("out", None, "Output .npy file for the samples.", required=True)
flags.DEFINE_string("method", None, "Sampler (default: the run's config.sample.method).")
flags.DEFINE_integer("num_steps", None, "Sampler steps (default: the run's config.sample.num_steps).")
flags.DEFINE_float("guidance_scale", 0.0, "Classifier-free guidance weight w (0: none).")
flags.DEFINE_string("labels", None, "Classes for a conditional model or classifier guidance: 'all', '3,1,4' or '7'.")
flags.DEFINE_string("classifier_workdir", None, "A classifier run (config.task=classifier) for classifier guidance.")
flags.DEFINE_float("classifier_scale", 0.0, "Classifier guidance scale s (0: none; needs --classifier_workdir).")
flags.DEFINE_integer("batch_size", 500, "Samples per sampler call.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")


def parse_labels(spec, num_classes, num_samples):
    """The label array for ``--labels`` (None when nothing takes labels), checked against the classes."""
    import numpy as np

    if num_classes is None:
        if spec is not None:
            raise ValueError("--labels was given but the run's model is unconditional (config.model.num_classes "
                             "is unset) and no --classifier_workdir guides it")
        return None
    if spec is None or spec == "all":
        base = np.arange(num_classes)
    else:
        try:
            base = np.array([int(v) for v in spec.split(",")])
        except ValueError:
            raise ValueError(f"--labels must be 'all' or comma-separated integers; got {spec!r}") from None
    if base.min() < 0 or base.max() >= num_classes:
        raise ValueError(f"--labels must lie in [0, {num_classes}); got {spec!r}")
    return np.resize(base, num_samples).astype(np.int32)


def load_config(workdir: str):
    import ml_collections

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: --workdir must be a directory written by python -m diffjax.main")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _same_schedule(model_config, classifier_config) -> None:
    fields = ("schedule", "beta_min", "beta_max", "sigma_min", "sigma_max", "num_timesteps")
    a = {k: model_config.diffusion.get(k) for k in fields}
    b = {k: classifier_config.diffusion.get(k) for k in fields}
    if a != b:
        raise ValueError(f"--classifier_workdir was trained on another schedule: {b} vs the model's {a}")


def _load_run(workdir: str, task: str):
    from diffjax.training.loop import setup

    config = load_config(workdir)
    if config.get("task", "diffusion") != task:
        raise ValueError(f"{workdir} holds a {config.get('task', 'diffusion')} run, not a {task} run")
    run = setup(config, workdir)
    if run.checkpointer.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
    return run


def _check_guidance(num_classes, guidance_scale, has_classifier: bool, classifier_scale) -> None:
    if guidance_scale != 0 and num_classes is None:
        raise ValueError("--guidance_scale needs a class-conditional run (config.model.num_classes)")
    if classifier_scale != 0 and not has_classifier:
        raise ValueError("--classifier_scale needs --classifier_workdir (a run with config.task=classifier)")


def guided_model_fn(run, *, guidance_scale=0.0, classifier=None, classifier_scale=0.0):
    """The run's EMA ``model_fn`` with classifier-free guidance (weight w) and, given a classifier run,
    classifier guidance (scale s); the model sees labels only if it is class-conditional."""
    from diffjax import guidance
    from diffjax.training.loop import ema_model_fn

    num_classes = run.config.model.get("num_classes")
    _check_guidance(num_classes, guidance_scale, classifier is not None, classifier_scale)
    model_fn = ema_model_fn(run)
    if guidance_scale != 0:
        model_fn = guidance.classifier_free_guidance(model_fn, float(guidance_scale), null_cond=num_classes)
    if classifier is not None:  # scale 0 still drops the labels an unconditional model must not see
        log_prob = guidance.classifier_log_prob(ema_model_fn(classifier))
        model_fn = guidance.classifier_guidance(model_fn, run.schedule, log_prob, float(classifier_scale),
                                                prediction=run.config.diffusion.prediction,
                                                unconditional=num_classes is None)
    return model_fn


def draw(run, model_fn, num_samples: int, *, labels=None, method=None, num_steps=None, batch_size=500, seed=0,
         **options):
    """``num_samples`` samples of ``model_fn`` on ``run``'s schedule in the data's range and shape (n-bit
    images as unsigned integers), drawn in batches of ``batch_size``; returns (samples, NFE per sample).
    ``options`` (e.g. ``grid``) go to the sampler."""
    import jax
    import numpy as np

    from diffjax.data import from_data_range
    from diffjax.training.loop import generate as generate_batch

    key = jax.random.PRNGKey(seed)
    chunks, nfe = [], 0
    for i, start in enumerate(range(0, num_samples, batch_size)):
        n = min(batch_size, num_samples - start)
        cond = None if labels is None else labels[start:start + n]
        x, nfe = generate_batch(run, method=method, num_steps=num_steps, num_samples=n,
                                key=jax.random.fold_in(key, i), cond=cond, model_fn=model_fn, **options)
        chunks.append(x)
    x = np.concatenate(chunks)
    if run.spec.num_bits is not None:
        x = from_data_range(x, run.spec.num_bits)
    return x, nfe


def generate_samples(workdir: str, num_samples: int, *, method=None, num_steps=None, guidance_scale=0.0,
                     labels=None, batch_size=500, seed=0, classifier_workdir=None, classifier_scale=0.0):
    """(samples in the data's range and shape, labels or None) from the latest checkpoint's EMA weights."""
    from diffjax.samplers import METHODS

    if num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1; got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1; got {batch_size}")
    config = load_config(workdir)
    method = config.sample.method if method is None else method
    num_steps = config.sample.num_steps if num_steps is None else num_steps
    if not (isinstance(num_steps, int) and num_steps >= 1):
        raise ValueError(f"--num_steps must be >= 1; got {num_steps}")
    if method not in METHODS:
        raise ValueError(f"--method must be one of {sorted(METHODS)}; got {method!r}")
    if config.get("task", "diffusion") != "diffusion":
        raise ValueError(f"--workdir {workdir} holds a {config.task} run; sampling needs a diffusion run")
    num_classes = config.model.get("num_classes")
    _check_guidance(num_classes, guidance_scale, classifier_workdir is not None, classifier_scale)
    classifier = None
    if classifier_workdir is not None:
        _same_schedule(config, load_config(classifier_workdir))
        classifier = _load_run(classifier_workdir, "classifier")
        if num_classes is not None and classifier.spec.num_classes != num_classes:
            raise ValueError(f"the classifier has {classifier.spec.num_classes} classes, the model {num_classes}")
    y = parse_labels(labels, num_classes or (classifier.spec.num_classes if classifier else None), num_samples)
    run = _load_run(workdir, "diffusion")
    model_fn = guided_model_fn(run, guidance_scale=guidance_scale, classifier=classifier,
                               classifier_scale=classifier_scale)
    x, _ = draw(run, model_fn, num_samples, labels=y, method=method, num_steps=num_steps, batch_size=batch_size,
                seed=seed)
    return x, y


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        x, y = generate_samples(FLAGS.workdir, FLAGS.num_samples, method=FLAGS.method, num_steps=FLAGS.num_steps,
                                guidance_scale=FLAGS.guidance_scale, labels=FLAGS.labels,
                                batch_size=FLAGS.batch_size, seed=FLAGS.seed,
                                classifier_workdir=FLAGS.classifier_workdir, classifier_scale=FLAGS.classifier_scale)
    except (ValueError, FileNotFoundError) as e:
        print(f"diffjax.generate: {e}", file=sys.stderr)
        sys.exit(2)
    import numpy as np

    np.save(FLAGS.out, x)
    msg = f"wrote {FLAGS.out}: {x.shape} {x.dtype}"
    if y is not None:
        labels_path = os.path.splitext(FLAGS.out)[0] + "_labels.npy"
        np.save(labels_path, y)
        msg += f"; labels {labels_path}"
    print(msg)


if __name__ == "__main__":
    app.run(main)
