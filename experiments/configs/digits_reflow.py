"""2-rectified flow on digits: reflow of the 1-rectified flow of ``digits_flow.py`` (Liu et al. 2022 sec. 2.3).

    python -m diffjax.main --config experiments/configs/digits_flow.py --workdir runs/fewstep/rf1
    python -m diffjax.main --config experiments/configs/digits_reflow.py --workdir runs/fewstep/rf2

(the teacher run and the couplings' directory are ``distill.teacher_workdir`` and ``reflow.couplings_dir``)

The run first writes ``reflow.num_pairs`` couplings (z, x = ODE_1RF(z)), solved by the teacher with
``reflow.method`` / ``reflow.num_steps`` (resumable shard by shard), then fine-tunes the teacher's weights on their
interpolants with the flow objective. Sampled with a few Euler steps (``sample.num_steps``); ``diffjax.generate
--num_steps`` overrides. ``--config.reflow.distill=True --config.sample.num_steps=1 --config.eval.num_examples=0``
with a 2-RF run as the teacher gives Liu et al.'s distilled one-step model.
"""

import os

from diffjax.config import load
from diffjax.training.task_reflow import reflow_config


def get_config():
    c = load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_flow.py"))
    # the teacher's ODE solver, Heun at 10 steps (19 NFE): on a 500-step 1-RF it ends 0.012 RMS (pixels in
    # [-1, 1]) from the adaptive Tsit5 solve (rtol = atol = 1e-5, 470 NFE); Euler at 20 NFE 0.026,
    # DPM-Solver++(2M) at 10 / 20 steps 0.069 / 0.027
    reflow_config(c, teacher_workdir="runs/fewstep/rf1", couplings_dir="runs/fewstep/rf2/couplings",
                  num_pairs=8_000, shard_size=2_000, method="heun", num_steps=10)
    # t uniform (Liu et al.): a few-step sampler evaluates the 2-RF at t near 1, which logit-normal times
    # (digits_flow.py) almost never train
    c.diffusion.time_sampling = "uniform"
    c.training.num_steps = 1000
    c.sample.num_steps = 2
    return c
