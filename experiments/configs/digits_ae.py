"""LDM's KL-regularised autoencoder on the 8x8 digits: the first stage of latent diffusion (minutes on CPU).

    python -m diffjax.main --config experiments/configs/digits_ae.py --workdir runs/digits_ae

Task "autoencoder" (``diffjax.training.task_autoencoder``): f = 2 (4x4 latents) with 2 latent channels (32 numbers
per 64-pixel image), ch 16 x (1, 2), one residual block per level, attention in the middle blocks (163k
parameters); LDM's KL weight 1e-6 and L1 reconstruction. Trained on clean images (no dequantization noise, as
LDM) for 1000 steps: Adam 2e-3, batch 128, EMA 0.999 with warm-up. The run reports test reconstruction MSE / PSNR
and the KL per latent dimension (metrics.json).
"""

import os

from diffjax.config import load
from diffjax.training.task_autoencoder import autoencoder_section


def get_config():
    c = load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.py"))
    c.task = "autoencoder"
    c.autoencoder = autoencoder_section(latent_channels=2, ch=16)
    c.data.dequantize = False
    c.optim.ema_decay = 0.999
    c.optim.ema_warmup = True
    c.training.num_steps = 1000
    c.training.log_every = 100
    c.training.checkpoint_every = 500
    return c
