"""The main job: train, sample and evaluate a diffusion model from a config.

    python -m diffjax.main --workdir runs/digits                              # default: digits, CPU, minutes
    python -m diffjax.main --config experiments/configs/cifar10_ddpmpp_vp.py --workdir runs/c10 \\
        --config.training.batch_size=256 --config.seed=1

Writes into the workdir: ``checkpoints/`` (orbax, keep-last-N), ``loss_history.csv``,
``tensorboard/`` (scalars and the sample grid), ``samples.png``, ``loss_curve.png`` and
``metrics.json`` (final_loss, steps_per_sec, test_bpd, ...). Running it again with the same
``--workdir`` resumes from the last checkpoint. ``--coordinator_address`` etc. start a multi-host
run (``jax.distributed``); every process runs this same command.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Path to a config file defining get_config().",
                                lock_config=True)
flags.DEFINE_string("workdir", "runs/digits", "Directory for checkpoints, logs, samples and metrics.")
flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-host run.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax/tfds INFO lines would bury the progress bar
    if FLAGS.coordinator_address is not None:
        import jax

        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    from diffjax.training.loop import train_and_evaluate

    metrics = train_and_evaluate(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
    print(json.dumps(metrics, indent=2, sort_keys=True))


def run():
    app.run(main)


if __name__ == "__main__":
    run()
