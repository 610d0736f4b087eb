"""Consistency distillation (Song et al. 2023, Alg. 2) of the digits teacher (``digits.py``: U-Net, cosine
schedule, v-prediction) into a one-step generator, minutes on 2 CPU cores.

    python -m diffjax.main --config experiments/configs/digits_cd.py --workdir runs/digits_cd \
        --config.distill.teacher_workdir=runs/digits

The student is the teacher's network, started from its EMA weights, read through the consistency
parameterization (``diffjax.consistency``); the CM paper's CIFAR-10 CD settings where they fit a short run:
N = 18 Karras boundaries (rho = 7, s in [0.002, s(t_max)] with s = sigma / alpha), target EMA mu = 0.95,
squared L2 (LPIPS needs a downloaded VGG), one DDIM teacher step (Heun costs a second teacher pass per step).
Samples with one consistency step; ``--config.sample.num_steps=2`` gives the two-step sampler.
"""

import os

import ml_collections

from diffjax.config import load


def consistency_section(**overrides):
    """``config.consistency`` with the CM paper's CD defaults (the fields of ``ConsistencySettings``)."""
    c = ml_collections.ConfigDict()
    c.num_scales = 18  # N of curriculum "fixed"
    c.curriculum = "fixed"  # "fixed", "ct" (CM paper N(k), mu(k)), "ict" (iCT's doubling N(k))
    c.s0, c.s1 = 2, 150  # curriculum start / end (CM paper CT: 2, 150; iCT: 10, 1280)
    c.mu0 = 0.95  # target EMA rate (curriculum "ct": mu0 of mu(k))
    c.target_ema = True  # False: theta- = stop_gradient(theta) (iCT)
    c.loss = "l2"  # "l2", "l1", "pseudo_huber"
    c.huber_c = ml_collections.config_dict.placeholder(float)  # None: 0.00054 sqrt(d) (iCT)
    c.solver = "ddim"  # the teacher's ODE step (CD): "ddim", "euler", "heun"
    c.sigma_data = 0.5
    c.sigma_min = 0.002  # s_min of the boundary condition, s = sigma / alpha
    c.sigma_max = ml_collections.config_dict.placeholder(float)  # None: s at the schedule's t_max
    c.rho = 7.0
    c.noise_sampling = "uniform"  # "uniform" over the N - 1 intervals, or "lognormal" (iCT; p_mean, p_std)
    c.p_mean, c.p_std = -1.1, 2.0
    c.weighting = "uniform"  # "uniform", or "ict": 1 / (s_{i+1} - s_i)
    c.update(overrides)
    return c


def get_config():
    c = load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.py"))
    c.task = "consistency_distillation"
    c.distill.teacher_workdir = "runs/digits"
    c.consistency = consistency_section()
    c.optim.learning_rate = 4e-4  # CM paper CD
    c.training.num_steps = 1000
    c.training.max_train_seconds = 720.0  # the digits task's 15-minute budget, sampling included
    c.training.checkpoint_every = 500
    c.sample.method = "consistency"
    c.sample.num_steps = 1
    c.sample.grid = "trailing"  # 1 step: [t_max, 0]; 2 steps: [t_max, t_max / 2, 0]
    c.eval.num_examples = 0  # no PF-ODE NLL: the network is not the ODE's denoiser
    return c
