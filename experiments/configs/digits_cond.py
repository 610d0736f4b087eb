"""Class-conditional digits U-Net with condition dropout, for classifier-free guidance.

    python -m diffjax.main --config experiments/configs/digits_cond.py --workdir runs/digits_cond
    python -m diffjax.generate --workdir runs/digits_cond --labels all --guidance_scale 2 \\
        --num_samples 100 --out guided.npy

The default digits run plus a learned class embedding with a null class (label 10), trained with
labels dropped to the null class with probability 0.1 (Ho & Salimans 2022); the same budget and,
like ``digits.py``, five train steps per jitted call.
"""

from diffjax.config import base


def get_config():
    c = base()
    c.model.num_classes = 10
    c.diffusion.cond_drop_prob = 0.1
    c.model.skip_rescale = True  # as in the guidance sweep's runs (BENCHMARKS.md); base() dropped it later
    c.training.steps_per_call = 5
    return c
