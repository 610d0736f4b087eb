"""Progressive distillation of the digits main job (``digits.py``'s U-Net, v-prediction on the cosine schedule)
down to one DDIM step: 32 -> 16 -> 8 -> 4 -> 2 -> 1 (Salimans & Ho 2022, Algorithm 2; ``diffjax.progressive``).

    python -m diffjax.main --config experiments/configs/digits_pd.py --workdir runs/fewstep/pd \\
        --config.distill.teacher_workdir=runs/digits

The teacher is the README's main-job run (``runs/digits``); the student config must describe its network,
schedule and data. The paper's distillation settings (``progressive_config``): dropout 0, EMA decay 0 (the next
teacher and the sampled weights are the student's own), gradient clipping at 1, no warm-up, x-MSE with
truncated-SNR weight. Five stages of 240 updates at batch 128 (five per jitted call): checkpoint ``240 k`` is
the student of 32 / 2^k DDIM steps on the trailing grid, and ``diffjax.load_run(workdir, step=240 * k).sample(n)``
samples it with them by default. The learning rate is above the paper's 5e-5 to 1e-4, whose 50k updates per
stage are ~200x ours.

The student's network is the teacher's (``digits.py``'s U-Net); BENCHMARKS.md's figures were measured on a teacher
with digits.py's U-Net before 2026-12-07: add ``--config.model.num_res_blocks=2 --config.model.attn_resolutions='(4,)'``
to the teacher's and the student's runs to reproduce them (``experiments/benchmarks/bench_fewstep.py`` does).
"""

import os

from diffjax.config import load
from diffjax.training.task_progressive import progressive_config


def get_config():
    c = load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.py"))
    progressive_config(c, teacher_workdir="runs/digits", teacher_steps=32, num_stages=5, steps_per_stage=240,
                       learning_rate=3e-4)
    c.training.log_every = 40
    # the digits task's 15-minute budget (compilation included; sampling 1-step students takes seconds): a slower
    # host ends the run early, at a checkpoint whose default step count is its stage's (sample_steps)
    c.training.max_train_seconds = 810.0
    return c
