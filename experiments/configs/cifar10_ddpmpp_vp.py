"""CIFAR-10 with score_sde's DDPM++ (VP SDE, continuous time) settings (Song et al. 2021, app. H).

nf=128, ch_mult (1, 2, 2, 2), 4 residual blocks (BigGAN-style up/down), attention at 16x16,
dropout 0.1, positional time embedding, skip rescaling; VP beta in [0.1, 20]; Adam 2e-4 with
5000 warm-up steps, gradient clipping at 1, EMA 0.9999, batch 128, random flips, 1.3M steps.

    python -m diffjax.main --config experiments/configs/cifar10_ddpmpp_vp.py --workdir runs/c10_vp
"""

from diffjax.config import base


def get_config():
    c = base()
    c.data.dataset = "cifar10"
    c.data.random_flip = True
    c.model.ch = 128
    c.model.ch_mult = (1, 2, 2, 2)
    c.model.num_res_blocks = 4
    c.model.attn_resolutions = (16,)
    c.model.dropout = 0.1
    c.model.resblock_updown = True
    c.model.skip_rescale = True
    c.diffusion.schedule = "vp_linear"
    c.diffusion.beta_min, c.diffusion.beta_max = 0.1, 20.0
    c.diffusion.antithetic = False
    c.diffusion.prediction = c.diffusion.objective = "eps"  # score_sde: eps-matching (L_simple)
    c.diffusion.min_snr_gamma = None  # score_sde's unweighted L_simple
    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 5000
    c.optim.grad_clip = 1.0
    c.optim.ema_decay = 0.9999
    c.training.batch_size = 128
    c.training.num_steps = 1_300_000
    c.training.log_every = 100
    c.training.checkpoint_every = 10_000
    c.training.max_to_keep = 5
    c.sample.method = "dpm_solver++_3m"
    c.sample.num_steps = 20
    c.sample.num_samples = 64
    c.sample.png_scale = 2
    c.eval.num_examples = 10_000
    c.eval.batch_size = 500
    return c
