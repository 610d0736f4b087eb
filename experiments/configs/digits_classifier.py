"""Noise-conditional digits classifier p(y | x_t, t) for classifier guidance of the default digits model.

    python -m diffjax.main --config experiments/configs/digits_classifier.py --workdir runs/digits_classifier

Same schedule as ``digits.py``, cosine (guidance asks it about that schedule's x_t, and
``diffjax.generate`` refuses a classifier trained on another schedule than the model); ADM's encoder half
(``EncoderClassifier``) at the digits U-Net's width; reports test accuracy across t.
"""

from diffjax.config import base


def get_config():
    c = base()
    c.diffusion.schedule = "vp_cosine"  # as digits.py, the unconditional model it guides
    c.task = "classifier"
    c.model.name = "classifier"
    c.model.attn_resolutions = ()
    c.model.num_res_blocks = 1
    c.model.dropout = 0.1
    c.model.scale_shift = True
    c.model.skip_rescale = True  # as in the guidance sweep's runs (BENCHMARKS.md); base() dropped it later
    c.optim.learning_rate = 1e-3
    c.training.num_steps = 1000
    c.training.checkpoint_every = 500
    return c
