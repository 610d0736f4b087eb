"""The closed-form mixture oracle of diffjax/testing/gmm.py in torch (float64 inside), for peers.

The peer environments have torch but not JAX, so this mirrors ``GaussianMixture.denoise`` once.
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2 * math.pi)


class TorchGMM:
    """sum_k w_k N(mu_k, diag(s_k^2)) pushed through x_t = alpha x_0 + sigma eps; counts calls."""

    def __init__(self, weights, means, variances):
        self.logw = torch.log(torch.as_tensor(weights, dtype=torch.float64))
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.var = torch.as_tensor(variances, dtype=torch.float64)
        self.nfe = 0

    def eps(self, x, alpha, sigma):
        """E[eps | x_t] = -sigma score of the noised mixture (one model evaluation)."""
        self.nfe += 1
        x64 = x.to(torch.float64)
        alpha = torch.as_tensor(alpha, dtype=torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        var = alpha**2 * self.var + sigma**2  # (K, D)
        diff = x64[:, None, :] - alpha * self.means[None]  # (B, K, D)
        log_comp = -0.5 * torch.sum(diff**2 / var + torch.log(var) + LOG_2PI, dim=-1)
        resp = torch.softmax(log_comp + self.logw[None], dim=-1)[..., None]
        return (sigma * torch.sum(resp * diff / var, dim=1)).to(x.dtype)

    def denoise_sigma(self, x, sigma):
        """k-diffusion's D(x; s) = E[x_0 | x_0 + s n = x], via the VP view alpha = 1/sqrt(1+s^2)."""
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)[0]
        alpha = 1 / torch.sqrt(1 + s**2)
        eps = self.eps(x.to(torch.float64) * alpha, alpha, s * alpha).to(torch.float64)
        return (x.to(torch.float64) - s * eps).to(x.dtype)


def peer_problems(results_dir):
    """Parse the peers' common CLI and yield (name, problem arrays, args) for each saved problem."""
    import argparse
    import os

    import numpy as np

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--problems", default=None, help="comma-separated problems (default ring, gmm32; ring if --quick)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    names = args.problems.split(",") if args.problems else (["ring"] if args.quick else ["ring", "gmm32"])
    for name in names:
        path = os.path.join(results_dir, f"{name}_problem.npz")
        if not os.path.exists(path):
            print(f"skip {name}: {path} missing (run bench_samplers.py first)")
            continue
        yield name, np.load(path), args
