"""CIFAR-10 1-rectified flow with Liu et al. 2022's settings (their code's ``cifar10_rf_gaussian_ddpmpp.py``).

DDPM++ (nf 128, ch_mult (1, 2, 2, 2), 4 BigGAN residual blocks, attention at 16x16, skip rescaling,
positional time embedding) with dropout 0.15; the linear interpolant (``rectified_flow``) and the flow objective,
t uniform; Adam 2e-4, 5000 warm-up steps, gradient clipping 1, EMA 0.999999, batch 128, random flips, 1.3M steps.
Sampled by the adaptive PF-ODE (their RK45 at tolerance 1e-5: Tsit5 at rtol = atol = 1e-5, ``pf_ode``'s default).

    python -m diffjax.main --config experiments/configs/cifar10_flow.py --workdir runs/c10_rf1
"""

import os

from diffjax.config import load


def get_config():
    c = load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10_ddpmpp_vp.py"))
    c.model.dropout = 0.15
    c.diffusion.schedule = "rectified_flow"
    c.diffusion.prediction = c.diffusion.objective = "flow"
    c.diffusion.min_snr_gamma = None
    c.diffusion.time_sampling = "uniform"
    c.optim.ema_decay = 0.999999
    c.sample.method = "pf_ode"
    c.sample.grid = None
    return c
