"""Latent diffusion on the digits: the digits U-Net recipe on the 4x4x2 latents of ``digits_ae.py``'s autoencoder.

    python -m diffjax.main --config experiments/configs/digits_ae.py --workdir runs/digits_ae
    python -m diffjax.main --config experiments/configs/digits_latent_unet.py --workdir runs/digits_latent_unet \\
        [--config.latent.autoencoder_workdir=runs/digits_ae]

Task "latent_diffusion" (``diffjax.training.task_latent``): ``digits.py`` (cosine schedule, v-prediction, the
same optimizer and budget) with the U-Net on (4, 4, 2) latents: levels 4x4 and 2x2, attention at 4x4.
``config.autoencoder`` is ``digits_ae.py``'s (it must equal the autoencoder run's), the scale factor is estimated
from the first training batch, and the test NLL is ``test_latent_bits_per_dim``. Samples come back as 8x8 images.
"""

import os

from diffjax.config import load
from diffjax.training.task_latent import latent_section

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
    c = load(os.path.join(_HERE, "digits.py"))
    c.task = "latent_diffusion"
    c.autoencoder = load(os.path.join(_HERE, "digits_ae.py")).autoencoder
    c.latent = latent_section("runs/digits_ae")
    c.data.dequantize = False  # the autoencoder's inputs, as it was trained
    c.optim.ema_warmup = False  # digits.py's warm-up came later: BENCHMARKS.md's figures for this config are without it
    c.model.num_res_blocks, c.model.attn_resolutions = 2, (4,)  # digits.py's U-Net before 2026-12-07, as measured
    c.training.num_steps = 600  # digits.py's before 2026-12-07, as measured
    return c
