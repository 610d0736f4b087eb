"""Progressive distillation on CIFAR-10 with the paper's settings (Salimans & Ho 2022, sec. 5 / app. E, and their
``diffusion_distillation/config/cifar_distill.py``): a teacher sampled with 8192 DDIM steps distilled in 13
halvings down to 1 step, 50k updates per halving at batch 128, Adam at 5e-5, gradient clipping at 1, EMA decay 0,
dropout 0, x-MSE with truncated-SNR weight; for pods, not for this machine.

    python -m diffjax.main --config experiments/configs/cifar10_ddpmpp_vp.py --workdir runs/c10_v \\
        --config.diffusion.schedule=vp_cosine --config.diffusion.prediction=v --config.diffusion.objective=v
    python -m diffjax.main --config experiments/configs/cifar10_pd.py --workdir runs/c10_pd \\
        --config.distill.teacher_workdir=runs/c10_v

The teacher is ``cifar10_ddpmpp_vp.py``'s DDPM++ network trained on the cosine schedule with v-prediction: the
paper distils v / x / (x, eps) predicting models (an eps-predicting network is unstable at the few-step
stages' low SNR, sec. 4), on the cosine schedule. Differences from the paper: their per-stage linear
learning-rate decay to 0 is not applied (the learning rate is constant) and Adam's moments carry over the
stage ends; their network is their own U-Net (ch 256, 3 blocks per resolution), ours the teacher's DDPM++.
Checkpoint ``50_000 k`` is the student of 8192 / 2^k steps.
"""

import os

from diffjax.config import load
from diffjax.training.task_progressive import progressive_config


def get_config():
    c = load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10_ddpmpp_vp.py"))
    c.diffusion.schedule = "vp_cosine"
    c.diffusion.prediction = c.diffusion.objective = "v"
    progressive_config(c, teacher_workdir="runs/c10_v", teacher_steps=8192, num_stages=13, steps_per_stage=50_000,
                       learning_rate=5e-5)
    c.training.batch_size = 128
    return c
