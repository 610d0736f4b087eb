"""Consistency training (Song et al. 2023, Alg. 3) with the improved-CT choices (Song & Dhariwal 2023) on
digits, from scratch (no teacher), minutes on 2 CPU cores.

    python -m diffjax.main --config experiments/configs/digits_ct.py --workdir runs/digits_ct

The ``digits.py`` U-Net and cosine schedule; iCT: no target EMA (theta- = stop_gradient(theta)),
pseudo-Huber loss, lognormal noise sampling over the discretisation (P_mean = -1.1, P_std = 2.0), weight
1 / (s_{i+1} - s_i) and the doubling curriculum N(k) = min(s0 2^floor(k / K'), s1) + 1, here from 10 to
80 intervals over the short run (iCT: 10 to 1280 over 400k steps).
"""

import os

from diffjax.config import load
from diffjax.training.task_consistency import consistency_config


def get_config():
    c = load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.py"))
    consistency_config(c, "consistency_training", curriculum="ict", s0=10, s1=80, target_ema=False, mu0=0.0,
                       loss="pseudo_huber", noise_sampling="lognormal", weighting="ict")
    c.optim.learning_rate = 1e-3
    c.training.num_steps = 1500
    c.training.max_train_seconds = 720.0  # the digits task's 15-minute budget, sampling included
    c.training.checkpoint_every = 500
    c.optim.ema_warmup = False  # digits.py's warm-up came later: BENCHMARKS.md's figures for this config are without it
    c.model.num_res_blocks, c.model.attn_resolutions = 2, (4,)  # digits.py's U-Net before 2026-12-07, as measured
    return c
