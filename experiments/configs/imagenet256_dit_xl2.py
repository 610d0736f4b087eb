"""Pod scale: DiT-XL/2 on the 32x32x4 latents of ImageNet 256x256 (Peebles & Xie 2023, sec. 4 and 5.1).

    # the first stage: a KL-f8 autoencoder (LDM's kl-f8 architecture) on the same images
    python -m diffjax.main --config experiments/configs/imagenet256_dit_xl2.py:autoencoder --workdir runs/imagenet256_ae
    # the latent DiT
    python -m diffjax.main --config experiments/configs/imagenet256_dit_xl2.py --workdir runs/imagenet256_dit_xl2 \\
        --config.latent.autoencoder_workdir=runs/imagenet256_ae

The paper's settings: DiT-XL/2 (28 blocks, width 1152, 16 heads, patch 2: 256 tokens), class-conditional on the
1000 classes with label dropout 0.1 (a learned null class for classifier-free guidance), learned sigma (Nichol &
Dhariwal's hybrid loss: L_simple on eps + the VLB for the variance), the linear 1000-step DDPM schedule (betas
1e-4 to 0.02) with eps-prediction, AdamW at a constant 1e-4 with no weight decay, no warm-up and no clipping,
batch 256, EMA decay 0.9999, 400K steps, float32, horizontal flips. Sampling: 250 DDPM steps, as the paper's FIDs.
The paper encodes with Stable Diffusion's KL-f8 VAE and its fixed scale 0.18215; here the autoencoder is LDM's
kl-f8 architecture trained by ``:autoencoder`` and the scale factor is estimated (1 / std of the first batch's
latents). No likelihood evaluation (the paper reports FID).

Data: the TFDS set ``imagenet256`` (ImageNet-1k train / validation, centre crop and resize to 256x256 as ADM's
``center_crop_arr``), prepared beforehand as array_record under ``config.data.data_dir``. Not run on CPU; its
validation is tested (tests/test_autoencoder.py).
"""

import ml_collections
from ml_collections import config_dict

from diffjax.config import base
from diffjax.models import dit_fields
from diffjax.training.task_autoencoder import autoencoder_section
from diffjax.training.task_latent import latent_section


def _kl_f8():
    """LDM's ``autoencoder_kl_f8`` (models/first_stage_models/kl-f8/config.yaml): ch 128 x (1, 2, 4, 4), two residual
    blocks per level, 4 latent channels, KL weight 1e-6, L1 reconstruction (their perceptual/GAN terms are left out)."""
    return autoencoder_section(latent_channels=4, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, kl_weight=1e-6,
                               recon="l1")


def get_config(arg=None):
    c = base()
    c.data.dataset = "imagenet256"
    c.data.dequantize = False
    c.data.random_flip = True
    c.autoencoder = _kl_f8()
    c.optim.update(optimizer="adamw", learning_rate=1e-4, weight_decay=0.0, warmup_steps=0, grad_clip=0.0,
                   ema_decay=0.9999)
    c.training.update(batch_size=256, num_steps=400_000, steps_per_call=1, log_every=100, checkpoint_every=10_000,
                      max_to_keep=3)
    c.training.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
    c.eval.num_examples = 0
    c.sample.update(num_samples=64)
    if arg == "autoencoder":  # LDM's first stage: batch 256 at lr 4.5e-6 per image (their base_learning_rate x batch)
        c.task = "autoencoder"
        c.optim.update(optimizer="adam", learning_rate=4.5e-6 * 256, ema_decay=0.999)
        c.training.update(num_steps=200_000, checkpoint_every=5_000)
        return c
    if arg is not None:
        raise ValueError(f"imagenet256_dit_xl2.py: the config argument is ':autoencoder' or nothing; got {arg!r}")
    c.task = "latent_diffusion"
    c.latent = latent_section("runs/imagenet256_ae")
    c.model = ml_collections.ConfigDict({
        "name": "dit", **dit_fields("XL/2"), "mlp_ratio": 4.0, "dropout": 0.0, "freq_dim": 256, "num_classes": 1000,
        "dtype": config_dict.placeholder(str), "kernels": "auto"})
    c.diffusion.update(schedule="ddpm_linear", num_timesteps=1000, prediction="eps", objective="hybrid",
                       learned_variance=True, cond_drop_prob=0.1, antithetic=False, min_snr_gamma=None,
                       time_sampling="uniform")
    c.sample.update(method="ddpm", num_steps=250, grid=None)
    return c
