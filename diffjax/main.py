"""The main job: train, sample and evaluate a diffusion model from a config.

    python -m diffjax.main --workdir runs/digits                              # default: digits, CPU, minutes
    python -m diffjax.main --config experiments/configs/cifar10_ddpmpp_vp.py --workdir runs/c10 \\
        --config.training.batch_size=256 --config.seed=1

Writes into the workdir: ``checkpoints/`` (orbax, keep-last-N), ``loss_history.csv``,
``tensorboard/`` (scalars and the sample grid), ``samples.png``, ``loss_curve.png`` and
``metrics.json`` (final_loss, steps_per_sec, test_bpd, ...);
JAX's compiled programs are kept on disk in ``~/.cache/diffjax/jax`` (``--compilation_cache_dir DIR`` or
``config.training.compilation_cache_dir``; ``''`` turns it off), so a second run with the same config skips most
of its compilation; with ``--noprogress`` a line (step, loss,
steps/s) every ``training.log_every`` steps on stdout. Running it again with the same ``--workdir``
resumes from the last checkpoint; ``diffjax.load_run(workdir)`` loads the run from Python. This module
defines its flags only when run as a program, so importing it has no side effects. A multi-host run starts every process with this
same command; ``diffjax.distributed`` takes the process layout from ``--coordinator_address`` /
``--num_processes`` / ``--process_id``, the ``DIFFJAX_*`` variables set by ``launch/local.sh``, or
SLURM / TPU-pod detection (see ``launch/README.md``).
"""

from __future__ import annotations

import json
import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")

FLAGS = flags.FLAGS


def _define_flags():
    """The CLI's flags, defined only when this module runs as a program (importing it defines none)."""
    config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Path to a config file defining get_config().",
                                    lock_config=True)
    flags.DEFINE_string("workdir", "runs/digits", "Directory for checkpoints, logs, samples and metrics.")
    flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-host run.")
    flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-host run.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
    flags.DEFINE_string("compilation_cache_dir", None, "JAX's persistent compilation cache directory; overrides "
                        "config.training.compilation_cache_dir ('' turns the cache off).")


_NONE_PATHS: list[str] = []
# programs that compile faster than this are not cached: 0 caches every program (JAX's default, 1 s, leaves
# the many small sampling/setup programs to be compiled again)
CACHE_MIN_COMPILE_SECONDS = 0.0


def set_compilation_cache(path):
    """Point JAX's persistent compilation cache at ``path`` (None or '': leave JAX's setting, off), so a
    later run of the same job loads its compiled programs from disk instead of compiling them. Called by the
    program only: importing diffjax changes no global JAX setting."""
    if not path:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.expanduser(path)))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECONDS)



def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from diffjax.config import apply_none_overrides

    try:
        apply_none_overrides(FLAGS.config, _NONE_PATHS)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax/tfds INFO lines would bury the progress bar
    from diffjax import distributed

    d = FLAGS.config.distributed
    source = distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                    heartbeat_timeout_seconds=d.heartbeat_timeout_seconds,
                                    initialization_timeout=d.initialization_timeout)
    import jax

    cache_dir = FLAGS.compilation_cache_dir
    set_compilation_cache(FLAGS.config.training.get("compilation_cache_dir") if cache_dir is None else cache_dir)
    if source is not None:
        logging.warning("multi-host run (%s): process %d of %d, %d local / %d global devices", source,
                        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    from diffjax.training.loop import train_and_evaluate

    try:
        metrics = train_and_evaluate(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
    except Exception:
        if jax.process_count() == 1:
            raise
        # One process failing (or seeing a peer fail inside a collective) ends the run: say so and leave
        # at once, rather than wait in jax.distributed's shutdown barrier for peers that may be gone.
        logging.exception("process %d of %d failed; the run stops (the other processes exit when their next "
                          "collective fails or within config.distributed.heartbeat_timeout_seconds=%d s). "
                          "Rerun the same command to resume from the last checkpoint.",
                          jax.process_index(), jax.process_count(), d.heartbeat_timeout_seconds)
        logging.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    if jax.process_index() == 0:
        print(json.dumps(metrics, indent=2, sort_keys=True))
    if metrics.get("preempted"):
        logging.warning("pre-empted at step %d; rerun the same command to resume", metrics["step"])
        sys.exit(128 + signal.SIGTERM)  # 143, as if killed by SIGTERM: schedulers requeue, launchers see it


def run():
    """The program: XLA:CPU tuning before any JAX backend starts, the flags, then ``main``."""
    from diffjax import xla_cpu

    xla_cpu.tune()
    from diffjax.config import split_none_overrides

    _define_flags()
    argv, _NONE_PATHS[:] = split_none_overrides(sys.argv)
    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
