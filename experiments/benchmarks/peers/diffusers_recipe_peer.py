"""diffusers' own training recipe on digits, as a diffusers user runs it (peer of experiments/benchmarks/bench_quality.py).

    python experiments/benchmarks/peers/diffusers_recipe_peer.py --spec SPEC.json --out DIR

The recipe of diffusers' ``train_unconditional`` example scaled to 8x8 digits (issue 26):
``UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
block_out_channels=(32, 64, 64), down_block_types=3 x "DownBlock2D", up_block_types=3 x "UpBlock2D",
norm_num_groups=8)`` (1.06M parameters); ``DDPMScheduler`` (1000 steps, linear betas); eps-MSE at
integer t uniform; AdamW lr 1e-3 (the example's betas (0.95, 0.999), weight decay 1e-6, eps 1e-8),
100 linear warm-up steps then constant (``get_scheduler("constant_with_warmup")``: a wall-clock budget
has no known step count for the example's cosine decay); gradient clipping 1.0; batch 128;
``EMAModel(decay=0.999)`` with its default warm-up min(0.999, (1 + n) / (10 + n)); images scaled as the
example's ``ToTensor`` + ``Normalize([0.5], [0.5])``: x = 2 u / 255 - 1. torch threads: ``--threads`` (2).
The clock starts at the first step (model build excluded) and training stops at the first step boundary
past the budget. Samples: the EMA weights, ``DPMSolverMultistepScheduler`` (its defaults, DPM-Solver++ 2M)
with ``num_inference_steps`` = the NFE, once per sampling seed, saved as uint8 images.

SPEC.json: train_path (uint8 (N, 8, 8, 1) .npy), budget_seconds, seed, sample_seeds, num_samples, nfe.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

UNET = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, norm_num_groups=8)
RECIPE = dict(learning_rate=1e-3, adam_betas=(0.95, 0.999), weight_decay=1e-6, adam_eps=1e-8, warmup_steps=100,
              grad_clip=1.0, batch_size=128, ema_decay=0.999)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = json.load(open(args.spec))
    torch.manual_seed(spec["seed"])
    train = np.load(spec["train_path"])
    if train.dtype != np.uint8 or train.ndim != 4 or train.shape[1:] != (8, 8, 1):
        raise ValueError(f"train_path must hold uint8 images (N, 8, 8, 1); got {train.dtype} {train.shape}")
    train = torch.from_numpy(np.ascontiguousarray(train.transpose(0, 3, 1, 2))).float() * (2.0 / 255.0) - 1.0

    model = UNet2DModel(**UNET).train()
    opt = torch.optim.AdamW(model.parameters(), lr=RECIPE["learning_rate"], betas=RECIPE["adam_betas"],
                            weight_decay=RECIPE["weight_decay"], eps=RECIPE["adam_eps"])
    lr_sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=RECIPE["warmup_steps"])
    ema = EMAModel(model.parameters(), decay=RECIPE["ema_decay"])
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    gen = torch.Generator().manual_seed(spec["seed"])

    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < spec["budget_seconds"]:
        x0 = train[torch.randint(0, len(train), (RECIPE["batch_size"],), generator=gen)]
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (len(x0),), generator=gen)
        loss = F.mse_loss(model(ddpm.add_noise(x0, eps, t), t).sample, eps)  # DDPM simple loss (Ho et al. 2020, eq. 14)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPE["grad_clip"])
        opt.step()
        lr_sched.step()
        ema.step(model.parameters())
        steps += 1
    train_seconds = time.perf_counter() - t0

    ema.copy_to(model.parameters())
    model.eval()
    solver = DPMSolverMultistepScheduler.from_config(ddpm.config)
    os.makedirs(args.out, exist_ok=True)
    t1 = time.perf_counter()
    for seed in spec["sample_seeds"]:
        sgen, out = torch.Generator().manual_seed(seed), []
        with torch.no_grad():
            for start in range(0, spec["num_samples"], 500):
                solver.set_timesteps(spec["nfe"])
                x = torch.randn((min(500, spec["num_samples"] - start), 1, 8, 8), generator=sgen)
                for t in solver.timesteps:
                    x = solver.step(model(x, t).sample, t, x).prev_sample
                out.append(x.clamp(-1, 1).permute(0, 2, 3, 1).numpy())
        x = np.concatenate(out)
        images = np.clip(np.rint((x + 1.0) / 2.0 * 255.0), 0, 255).astype(np.uint8)
        np.save(os.path.join(args.out, f"samples_{seed}.npy"), images)
    info = dict(steps=steps, train_seconds=train_seconds, final_loss=loss.item(), nfe=len(solver.timesteps),
                sample_seconds=(time.perf_counter() - t1) / len(spec["sample_seeds"]),
                n_params=sum(p.numel() for p in model.parameters()), torch=torch.__version__,
                threads=torch.get_num_threads())
    json.dump(info, open(os.path.join(args.out, "info.json"), "w"), indent=2)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
