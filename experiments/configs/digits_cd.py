"""Consistency distillation (Song et al. 2023, Alg. 2) of the digits teacher (``digits.py``: U-Net, cosine
schedule, v-prediction) into a one-step generator, minutes on 2 CPU cores.

    python -m diffjax.main --config experiments/configs/digits_cd.py --workdir runs/digits_cd \
        --config.distill.teacher_workdir=runs/digits

The student is the teacher's network, started from its EMA weights, read through the consistency
parameterization (``diffjax.consistency``); the CM paper's CIFAR-10 CD settings where they fit a short run:
N = 18 Karras boundaries (rho = 7, s in [0.002, s(t_max)] with s = sigma / alpha), target EMA mu = 0.95,
squared L2 (LPIPS needs a downloaded VGG), one DDIM teacher step (Heun costs a second teacher pass per step).
Samples with one consistency step; ``--config.sample.num_steps=2`` gives the two-step sampler.

The student's network is the teacher's (``digits.py``'s U-Net); BENCHMARKS.md's figures were measured on a teacher
with digits.py's U-Net before 2026-12-07: add ``--config.model.num_res_blocks=2 --config.model.attn_resolutions='(4,)'``
to the teacher's and the student's runs to reproduce them (``experiments/benchmarks/bench_fewstep.py`` does).
"""

import os

from diffjax.config import load
from diffjax.training.task_consistency import consistency_config


def get_config():
    c = load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.py"))
    consistency_config(c, "consistency_distillation", num_scales=18, solver="ddim", mu0=0.95, loss="l2")
    c.distill.teacher_workdir = "runs/digits"
    c.optim.learning_rate = 4e-4  # CM paper CD
    c.training.num_steps = 1000
    c.training.max_train_seconds = 720.0  # the digits task's 15-minute budget, sampling included
    c.training.checkpoint_every = 500
    c.optim.ema_warmup = False  # digits.py's warm-up came later: BENCHMARKS.md's figures for this config are without it
    return c
