"""CIFAR-10 with score_sde's NCSN++ (VE SDE) settings (Song et al. 2021, app. H).

As DDPM++ (cifar10_ddpmpp_vp.py) but Gaussian Fourier time features (scale 16), the VE SDE with
sigma in [0.01, 50] and EMA 0.999. The network predicts eps (= -sigma * score, score_sde's
``scale_by_sigma``). Differences from score_sde: our data lie in [-1, 1] (score_sde's VE runs use
[0, 1], so sigma_max = 50 is relatively half as large here), the Fourier features see t rather
than log sigma(t), and NCSN++'s progressive input/output skips are not implemented.

    python -m diffjax.main --config experiments/configs/cifar10_ncsnpp_ve.py --workdir runs/c10_ve
"""

import os

from diffjax.config import load


def get_config():
    c = load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10_ddpmpp_vp.py"))
    c.model.embedding = "fourier"
    c.model.fourier_scale = 16.0
    c.diffusion.schedule = "ve"
    c.diffusion.sigma_min, c.diffusion.sigma_max = 0.01, 50.0
    c.optim.ema_decay = 0.999
    c.sample.method = "pc"
    c.sample.num_steps = 1000
    return c
