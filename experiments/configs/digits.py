"""The default main job: a small U-Net on scikit-learn's 8x8 digits (embedded, offline), minutes on CPU.

    python -m diffjax.main --config experiments/configs/digits.py --workdir runs/digits

``base()`` plus three fields:

* the cosine schedule (Nichol & Dhariwal 2021) instead of ``base()``'s VP-linear. The linear
  schedule is close to pure noise over half of t (SNR 0.086 at t = 0.5, 0.003 at 0.75; cosine 0.98
  and 0.17), which Nichol & Dhariwal found wasteful at low resolution. With cosine the Fréchet
  distance of 1000 samples (experiments/ablate_recipe.py, BENCHMARKS.md "Training recipe") fell from 39.8 / 35.1 to
  28.2 / 24.3 after 400 steps (training seeds 0 / 1) and from 4.0 / 3.9 to 3.3 / 2.7 after 2100
  (the diffusers peer: 3.6 / 3.6);
* five train steps fused per jitted call (``lax.scan``; 900, 50 and 500 steps are multiples of 5):
  ~10% more steps/s on 2 CPU cores than one step per call (experiments/bench_train.py, "4 per
  call" rows in BENCHMARKS.md). ``base()`` keeps one step per call so that any
  ``num_steps``/``log_every`` override stays valid;
* EMA warm-up (decay min(ema_decay, (1 + n) / (10 + n)), as diffusers' ``EMAModel`` and score_sde): without it
  the EMA of a short run still carries 0.995^n of the random initialisation (5% after the 600 steps, 76%
  after 55). Measured on this job (training seed 0, 2026-12-07): Fréchet distance of 1000 samples 9.06
  [8.74, 9.61] vs 11.49 [10.35, 12.21] (3 draws; floor 10.65) and test 5.70 +- 0.02 vs 5.90 +- 0.02
  bits/dim; after 60 s of training (50-55 steps) FD 162 vs 224 (BENCHMARKS.md, "Quality per compute").

* one residual block per level and no attention (``base()``: two, with attention at 4x4), trained for 900
  steps instead of 600: chosen for quality per second of training (issue 26; BENCHMARKS.md "Choosing the digits
  default"). At 120 s of training it takes 700 steps instead of 390 (6.7 vs 4.0 steps/s) and reaches Fréchet
  distance 9.1 instead of 14.5 (training seed 0, 2 draws); as the main job (900 steps vs 600, about the same
  wall time) FD 6.86 [6.11, 7.38] vs 9.06 [8.74, 9.61] (3 draws; floor 10.65) and test 5.65 +- 0.02 vs 5.70 +- 0.02
  bits/dim. Configs and scripts whose BENCHMARKS.md figures were measured before pin the previous U-Net
  (``model.num_res_blocks=2``, ``model.attn_resolutions=(4,)``).

``base()`` keeps VP-linear: the conditional runs (``digits_cond.py``, ``digits_classifier.py``) and
the guidance sweep in BENCHMARKS.md were measured with it, and bench_train's torch peer implements it.
"""

from diffjax.config import base


def get_config():
    c = base()
    c.diffusion.schedule = "vp_cosine"
    c.training.steps_per_call = 5
    c.optim.ema_warmup = True
    # decay 0.999 once the warm-up passes it: the warm-up (1 + n) / (10 + n) stays below 0.995 until step
    # 1791, so runs up to there (the 900-step main job) are unchanged and longer ones average over a longer
    # horizon (the 600 s rows of BENCHMARKS.md "Quality per compute")
    c.optim.ema_decay = 0.999
    c.model.resblock_updown = True  # the U-Net's default, named here so that it can be ablated from the command line
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = ()
    c.training.num_steps = 900
    return c
