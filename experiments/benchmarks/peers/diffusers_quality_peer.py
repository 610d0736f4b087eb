"""diffusers peer of experiments/benchmarks/bench_quality.py: train UNet2DModel with DDPM eps-MSE for a wall-time budget, sample.

    python experiments/benchmarks/peers/diffusers_quality_peer.py --spec SPEC.json --out DIR

The recipe is diffusers' ``train_unconditional`` example on the digits train split: ``DDPMScheduler``
(1000 steps, linear betas 1e-4..0.02), integer t uniform, ``add_noise``, eps-MSE; the network is
``UNet2DModel`` laid out like diffjax's digits U-Net (``diffusers_train_peer.unet_config``), with the
optimisation settings of diffjax's digits config (Adam, lr, warm-up, clipping, batch, EMA decay,
dequantized inputs x = -1 + 2 (u + U) / 256) so only the framework and the objective differ. The clock
starts at the first step (model build excluded) and training stops at the first step boundary past
the budget. Samples: the EMA weights, ``DPMSolverMultistepScheduler`` (DPM-Solver++ 2M, the
scheduler's defaults) with ``num_inference_steps`` = the NFE, in batches, once per sampling seed, saved as uint8 images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel  # noqa: E402
from diffusers_train_peer import unet_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = json.load(open(args.spec))
    torch.manual_seed(spec["seed"])
    rng = np.random.default_rng(spec["seed"])
    train = np.load(spec["train_path"]).astype(np.float32)  # uint8 (N, 8, 8, 1)
    train = torch.from_numpy(np.ascontiguousarray(train.transpose(0, 3, 1, 2)))

    model = UNet2DModel(**unet_config(spec)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=spec["learning_rate"])
    warm = spec["warmup_steps"]
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / warm) if warm else 1.0)
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")

    steps, t0 = 0, time.perf_counter()
    max_steps = spec.get("max_steps")  # a fixed step count instead (experiments/ablations/ablate_recipe.py)
    while time.perf_counter() - t0 < spec["budget_seconds"] and (max_steps is None or steps < max_steps):
        idx = torch.from_numpy(rng.integers(0, len(train), spec["batch_size"]))
        x0 = -1.0 + 2.0 * (train[idx] + torch.rand_like(train[idx])) / 256.0
        eps = torch.randn_like(x0)
        t = torch.randint(0, 1000, (len(x0),))
        loss = F.mse_loss(model(ddpm.add_noise(x0, eps, t), t).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, spec["grad_clip"])
        opt.step()
        lr_sched.step()
        # diffjax's EMA, with its warm-up decay min(d, (1 + n) / (10 + n)) when the config has it on
        decay = min(spec["ema_decay"], (1 + steps) / (10 + steps)) if spec.get("ema_warmup") else spec["ema_decay"]
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - decay)
        steps += 1
    train_seconds = time.perf_counter() - t0

    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    model.eval()
    solver = DPMSolverMultistepScheduler.from_config(ddpm.config)
    os.makedirs(args.out, exist_ok=True)
    t1 = time.perf_counter()
    for seed in spec["sample_seeds"]:
        gen, out = torch.Generator().manual_seed(seed), []
        with torch.no_grad():
            for start in range(0, spec["num_samples"], 500):
                n = min(500, spec["num_samples"] - start)
                solver.set_timesteps(spec["nfe"])
                x = torch.randn((n, 1, 8, 8), generator=gen)
                nfe = 0
                for t in solver.timesteps:
                    x = solver.step(model(x, t).sample, t, x).prev_sample
                    nfe += 1
                out.append(x.clamp(-1, 1).permute(0, 2, 3, 1).numpy())
        x = np.concatenate(out)
        images = np.clip(np.rint((x + 1.0) / 2.0 * 255.0), 0, 255).astype(np.uint8)  # bin centres, as diffjax
        np.save(os.path.join(args.out, f"samples_{seed}.npy"), images)
    info = dict(steps=steps, train_seconds=train_seconds, final_loss=loss.item(), nfe=nfe,
                sample_seconds=(time.perf_counter() - t1) / len(spec["sample_seeds"]), n_params=sum(p.numel() for p in params),
                torch=torch.__version__, threads=torch.get_num_threads())
    json.dump(info, open(os.path.join(args.out, "info.json"), "w"), indent=2)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
