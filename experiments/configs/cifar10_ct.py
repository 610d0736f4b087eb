"""Consistency training on CIFAR-10 with the improved-CT settings (Song & Dhariwal 2023, sec. 3-4): no
target EMA, pseudo-Huber loss, lognormal noise sampling (P_mean = -1.1, P_std = 2.0), weight
1 / (s_{i+1} - s_i), N(k) doubling from 10 to 1280 over 400k steps, dropout 0.3, batch 1024, lr 1e-4
(iCT uses RAdam; Adam here), EMA 0.99993; the DDPM++ network on the VP schedule of
``cifar10_ddpmpp_vp.py`` (iCT runs NCSN++ on VE; any diffjax schedule works in the VE view s = sigma/alpha).

    python -m diffjax.main --config experiments/configs/cifar10_ct.py --workdir runs/c10_ct
"""

import os

from diffjax.config import load
from diffjax.training.task_consistency import consistency_config


def get_config():
    here = os.path.dirname(os.path.abspath(__file__))
    c = load(os.path.join(here, "cifar10_ddpmpp_vp.py"))
    consistency_config(c, "consistency_training", curriculum="ict", s0=10, s1=1280, target_ema=False, mu0=0.0,
                       loss="pseudo_huber", noise_sampling="lognormal", weighting="ict")
    c.model.dropout = 0.3
    c.diffusion.prediction = "v"  # the network's type; the consistency parameterization reads its x0
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 0
    c.optim.ema_decay = 0.99993
    c.training.batch_size = 1024
    c.training.num_steps = 400_000
    return c
