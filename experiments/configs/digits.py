"""The default main job: a small U-Net on scikit-learn's 8x8 digits (embedded, offline), minutes on CPU.

    python -m diffjax.main --config experiments/configs/digits.py --workdir runs/digits

``base()`` (the schema's defaults are this run) plus five train steps fused per jitted call
(``lax.scan``; 600, 50 and 500 steps are multiples of 5): ~10% more steps/s on 2 CPU cores than one
step per call (experiments/bench_train.py, "4 per call" rows in BENCHMARKS.md). ``base()`` itself
keeps one step per call so that any ``num_steps``/``log_every`` override stays valid.
"""

from diffjax.config import base


def get_config():
    c = base()
    c.training.steps_per_call = 5
    return c
