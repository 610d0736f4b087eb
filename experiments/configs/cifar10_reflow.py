"""CIFAR-10 2-rectified flow with Liu et al. 2022's settings (their code's ``cifar10_rf_gaussian_reflow_*.py``).

4M couplings drawn from the 1-rectified flow (``cifar10_flow.py``) by the adaptive PF-ODE (their RK45 at
tolerance 1e-5), written in shards of 10k pairs over every host, then the 1-rectified flow's weights fine-tuned on
them with the flow objective (t uniform, L2; their ``reflow_t_schedule='uniform'``, ``reflow_loss='l2'``), EMA
0.9999. Sampled with Euler on the trailing grid.

    python -m diffjax.main --config experiments/configs/cifar10_reflow.py --workdir runs/c10_rf2 \\
        --config.distill.teacher_workdir=runs/c10_rf1 --config.reflow.couplings_dir=/shared/c10_rf2_couplings

(``reflow.couplings_dir`` must be a directory every host sees: each host writes its own shards and reads all.)

One-step distillation (their ``reflow_distill_k=1``, with L2 instead of their LPIPS): a 2-RF run as the teacher and
``--config.reflow.distill=True --config.sample.num_steps=1 --config.eval.num_examples=0``.
"""

import os

from diffjax.config import load
from diffjax.training.task_reflow import reflow_config


def get_config():
    c = load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10_flow.py"))
    # the adaptive PF-ODE: Tsit5 at rtol = atol = 1e-5 (num_steps is unused)
    reflow_config(c, teacher_workdir="runs/c10_rf1", couplings_dir="runs/c10_rf2/couplings", num_pairs=4_000_000,
                  shard_size=10_000, batch_size=1_000, method="pf_ode", num_steps=1)
    c.optim.ema_decay = 0.9999
    c.training.num_steps = 300_000
    c.sample.method = "euler"
    c.sample.grid = "trailing"
    c.sample.num_steps = 2
    return c
