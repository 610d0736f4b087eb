"""k-diffusion samplers driven by the exact Gaussian-mixture oracle (peer for bench_samplers.py).

Runs in its own venv:
  python3 -m venv /work/venvs/kdiff && /work/venvs/kdiff/bin/pip install 'setuptools<81' \\
      torch==2.14.1 torchvision==0.29.1 k-diffusion numpy
  /work/venvs/kdiff/bin/python experiments/benchmarks/peers/kdiffusion_peer.py [--quick]

Reads experiments/benchmarks/results/<problem>_problem.npz (written by bench_samplers.py), writes
experiments/benchmarks/results/peer_kdiffusion_<problem>.{json,npz}.

k-diffusion's variable is x = x_0 + sigma n = x_VP / alpha with sigma = sigma_VP / alpha = exp(-lambda).
Denoiser: D(x, sigma) = x - sigma E[eps | x_VP = alpha x] with alpha = 1/sqrt(1 + sigma^2) (the
closed-form oracle of diffjax/testing/gmm.py in torch, float64 inside; exact at every sigma).
Sigma range: sigma_max = sigma at t = 1 (timestep 999), sigma_min = sigma at t = 1/1000 (timestep 0)
of the same discrete linear schedule; grids: Karras (rho = 7) and exponential (uniform in log sigma,
i.e. logSNR-uniform, the grid diffjax's DPM-Solvers use); both end with a step to sigma = 0.
x_T(k-diffusion) = x_T(VP) / alpha(1). The output at sigma = 0 is x_0, directly comparable.
"""

from __future__ import annotations

import json
import sys
import math
import os
import time

import numpy as np
import torch

import k_diffusion
from k_diffusion import sampling as KS

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from torch_gmm import TorchGMM, peer_problems  # noqa: E402
RESULTS = os.path.join(os.path.dirname(HERE), "results")


class Denoiser(TorchGMM):
    """k-diffusion's model interface: ``model(x, sigma) -> D(x; sigma)``."""

    def __call__(self, x, sigma, **kwargs):
        return self.denoise_sigma(x, sigma)


# label -> (sampler, evaluations per interval (the last interval to 0 costs 1), grid)
SAMPLERS = {
    "sample_euler[karras]": (KS.sample_euler, 1, "karras"),
    "sample_heun[karras]": (KS.sample_heun, 2, "karras"),
    "sample_dpm_2[karras]": (KS.sample_dpm_2, 2, "karras"),
    "sample_lms[karras]": (KS.sample_lms, 1, "karras"),
    "sample_dpmpp_2m[karras]": (KS.sample_dpmpp_2m, 1, "karras"),
    "sample_dpmpp_2m[exponential]": (KS.sample_dpmpp_2m, 1, "exponential"),
    "sample_heun[exponential]": (KS.sample_heun, 2, "exponential"),
    "sample_lms[exponential]": (KS.sample_lms, 1, "exponential"),
}


def main():
    for name, d, args in peer_problems(RESULTS):
        ac = np.asarray(d["alphas_cumprod"], np.float64)
        sigma_max = float(np.sqrt((1 - ac[-1]) / ac[-1]))
        sigma_min = float(np.sqrt((1 - ac[0]) / ac[0]))
        den = Denoiser(d["weights"], d["means"], d["variances"])
        x_T = torch.as_tensor(d["x_T"], dtype=torch.float32) * math.sqrt(1 + sigma_max**2)
        runs, outs = [], {}
        for label, (fn, k, grid) in SAMPLERS.items():
            for budget in [int(b) for b in d["nfes"]]:
                n = (budget - 1) // k + 1  # n sigmas > 0: k (n - 1) + 1 evaluations
                if n < 2:
                    continue
                if grid == "karras":
                    sigmas = KS.get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0)
                else:
                    sigmas = KS.get_sigmas_exponential(n, sigma_min, sigma_max)
                times = []
                for _ in range(args.reps):
                    den.nfe = 0
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        x = fn(den, x_T.clone(), sigmas, disable=True)
                    times.append(time.perf_counter() - t0)
                key = f"{label}@{budget}"
                outs[key] = x.numpy()
                runs.append(dict(key=key, label=label, budget=budget, steps=n, nfe=den.nfe,
                                 deterministic=True, wall_s=float(np.median(times))))
                print(f"  {name} {label:30s} B={budget:3d} n={n:3d} NFE={den.nfe:3d} "
                      f"wall={np.median(times)*1e3:.1f}ms", flush=True)
        np.savez(os.path.join(RESULTS, f"peer_kdiffusion_{name}.npz"), **outs)
        json.dump(dict(versions=dict(k_diffusion=getattr(k_diffusion, "__version__", "0.1.1.post1"),
                                     torch=torch.__version__,
                                     sigma_min=sigma_min, sigma_max=sigma_max),
                       runs=runs),
                  open(os.path.join(RESULTS, f"peer_kdiffusion_{name}.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
