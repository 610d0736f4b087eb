"""Progressive distillation of the digits main job (``digits.py``'s U-Net, v-prediction on the cosine schedule)
down to one DDIM step: 32 -> 16 -> 8 -> 4 -> 2 -> 1 (Salimans & Ho 2022, Algorithm 2; ``diffjax.progressive``).

    python -m diffjax.main --config experiments/configs/digits_pd.py --workdir runs/fewstep/pd \\
        --config.distill.teacher_workdir=runs/digits

The teacher is the README's main-job run (``runs/digits``); the student config must describe its network,
schedule and data. As in the paper's distillation configs: dropout 0, EMA decay 0 (the next teacher and the
sampled weights are the student's own), gradient clipping at 1, no warm-up, x-MSE with truncated-SNR weight.
Five stages of 240 updates at batch 128 (five per jitted call): checkpoint ``240 k`` is the student of
32 / 2^k DDIM steps on the trailing grid, ``diffjax.load_run(workdir, step=240 * k).sample(n)`` samples it
with them by default. The learning rate is higher than the paper's 5e-5 to 1e-4 (its 50k updates per stage
are ~200x ours).
"""

import os

import ml_collections

from diffjax.config import load


def get_config():
    c = load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.py"))
    c.task = "progressive_distillation"
    c.distill.teacher_workdir = "runs/digits"
    c.progressive = p = ml_collections.ConfigDict()
    p.teacher_steps = 32
    p.num_stages = 5
    p.steps_per_stage = 240
    p.weighting = "truncated_snr"
    p.next_teacher = "ema"
    c.model.dropout = 0.0
    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 0
    c.optim.grad_clip = 1.0
    c.optim.ema_decay = 0.0
    c.training.num_steps = p.num_stages * p.steps_per_stage
    c.training.checkpoint_every = p.steps_per_stage
    c.training.max_to_keep = p.num_stages + 1
    c.training.log_every = 40
    c.sample.method = "ddim"
    c.sample.grid = "trailing"
    c.sample.num_steps = p.teacher_steps >> p.num_stages
    c.eval.num_examples = 0
    return c
