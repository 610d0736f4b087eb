"""Latent diffusion on the digits with a DiT: ``digits_dit.py``'s transformer on the 4x4x2 latents of ``digits_ae.py``.

    python -m diffjax.main --config experiments/configs/digits_latent_dit.py --workdir runs/digits_latent_dit \\
        [--config.latent.autoencoder_workdir=runs/digits_ae]

As ``digits_latent_unet.py`` with ``config.model`` from ``digits_dit.py`` and patch size 1: the 4x4 latents give
16 tokens, as the 8x8 images do in patches of 2.
"""

import os

from diffjax.config import load

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
    c = load(os.path.join(_HERE, "digits_latent_unet.py"))
    c.model = load(os.path.join(_HERE, "digits_dit.py")).model
    c.model.patch_size = 1
    return c
