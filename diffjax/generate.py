"""Draw samples from a trained run's latest checkpoint (EMA weights) for any external evaluator.

    python -m diffjax.generate --workdir runs/digits --num_samples 1000 --out samples.npy
    python -m diffjax.generate --workdir runs/digits-cond --num_samples 1000 --labels all \\
        --guidance_scale 2 --method ddim --num_steps 50 --out guided.npy

A thin command line over ``diffjax.load_run`` (``diffjax/runs.py``): the model is rebuilt from the
config stored with the latest checkpoint (older runs: ``WORKDIR/config.json``). Samples are saved in
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

import os
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS


def _define_flags():
    """The CLI's flags, defined only when this module runs as a program (importing it defines none)."""
    flags.DEFINE_string("workdir", None, "A main-job workdir (config.json + checkpoints/).", required=True)
    flags.DEFINE_integer("num_samples", None, "How many samples to draw.", required=True)
    flags.DEFINE_string("out", None, "Output .npy file for the samples.", required=True)
    flags.DEFINE_string("method", None, "Sampler (default: the run's config.sample.method).")
    flags.DEFINE_integer("num_steps", None, "Sampler steps (default: the run's own, config.sample.num_steps or a "
                                            "distilled student's step count).")
    flags.DEFINE_float("guidance_scale", 0.0, "Classifier-free guidance weight w (0: none).")
    flags.DEFINE_string("labels", None,
                        "Classes for a conditional model or classifier guidance: 'all', '3,1,4' or '7'.")
    flags.DEFINE_string("classifier_workdir", None,
                        "A classifier run (config.task=classifier) for classifier guidance.")
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


def generate_samples(workdir: str, num_samples: int, *, method=None, num_steps=None, guidance_scale=0.0,
                     labels=None, batch_size=500, seed=0, classifier_workdir=None, classifier_scale=0.0):
    """(samples in the data's range and shape, labels or None) from the latest checkpoint's EMA weights.

    The flags' checks run on the stored configs before any model is built, with errors naming the flags.
    """
    import jax

    from diffjax import runs

    if num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1; got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1; got {batch_size}")
    config = runs.load_config(workdir)
    method = config.sample.method if method is None else method
    # num_steps None: the run's own (TrainedRun.default_num_steps, e.g. a distilled student's stage)
    runs.check_sampler_args(method, 1 if num_steps is None else num_steps, prefix="--")
    from diffjax.training.tasks import get_task

    if not get_task(config.get("task", "diffusion")).samples:
        raise ValueError(f"--workdir {workdir} holds a {config.task} run, which draws no samples")
    num_classes = config.model.get("num_classes")
    runs.check_guidance(num_classes, guidance_scale, classifier_workdir is not None, classifier_scale, prefix="--")
    classifier = None
    if classifier_workdir is not None:
        runs.check_same_schedule(config, runs.load_config(classifier_workdir))
        classifier = runs.load_run(classifier_workdir, task="classifier")
    y = parse_labels(labels, num_classes or (classifier.spec.num_classes if classifier else None), num_samples)
    run = runs.load_run(workdir)
    x = run.sample(num_samples, method=method, num_steps=num_steps, key=jax.random.PRNGKey(seed), labels=y,
                   guidance_scale=guidance_scale, classifier=classifier, classifier_scale=classifier_scale,
                   batch_size=batch_size)
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


def run():
    """The program: XLA:CPU tuning before any JAX backend starts, the flags, then ``main``."""
    from diffjax import xla_cpu

    xla_cpu.tune()
    _define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
