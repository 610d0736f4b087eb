"""Consistency distillation on CIFAR-10 with the CM paper's settings (Song et al. 2023, appendix C, Table 3):
the teacher is a ``cifar10_ddpmpp_vp.py`` run (the CM paper distils EDM; here the VP DDPM++ network and
schedule, which the student must share), N = 18, Heun teacher steps, target EMA mu = 0.95, Adam 4e-4,
batch 512, 800k steps, EMA 0.9999. The paper's LPIPS metric needs a downloaded VGG: squared L2 here
(the paper's l2 row).

    python -m diffjax.main --config experiments/configs/cifar10_cd.py --workdir runs/c10_cd \
        --config.distill.teacher_workdir=runs/c10_vp
"""

import os

from diffjax.config import load
from diffjax.training.task_consistency import consistency_config


def get_config():
    here = os.path.dirname(os.path.abspath(__file__))
    c = load(os.path.join(here, "cifar10_ddpmpp_vp.py"))
    consistency_config(c, "consistency_distillation", num_scales=18, solver="heun", mu0=0.95, loss="l2")
    c.distill.teacher_workdir = "runs/c10_vp"
    c.optim.learning_rate = 4e-4
    c.optim.warmup_steps = 0
    c.optim.ema_decay = 0.9999
    c.training.batch_size = 512
    c.training.num_steps = 800_000
    return c
