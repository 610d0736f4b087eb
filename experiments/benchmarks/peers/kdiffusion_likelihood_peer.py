"""k-diffusion's PF-ODE log-likelihood on the exact Gaussian-mixture oracle (peer for bench_likelihood.py).

Runs in its own venv (see BENCHMARKS.md, "## Samplers" for the install):
  /work/venvs/kdiff/bin/python experiments/benchmarks/peers/kdiffusion_likelihood_peer.py \\
      --problem experiments/benchmarks/results/lik_<name>.npz --out experiments/benchmarks/results/lik_<name>_kdiff.json

What k-diffusion 0.1.1.post1 integrates (``k_diffusion.sampling.log_likelihood``):
  * the ODE dx/dsigma = (x - D(x, sigma)) / sigma in k-diffusion's variable x_k = x_VP / alpha,
    sigma_k = sigma_VP / alpha = exp(-lambda), from sigma_min to sigma_max, with
    ``torchdiffeq.odeint(method="dopri5", rtol, atol)`` on the augmented state (x, delta_ll);
  * d delta_ll / dsigma = v . (dd/dx) v with ONE Rademacher probe v per example
    (``torch.randint_like(x, 2) * 2 - 1``, drawn once per call), i.e. a 1-probe Hutchinson trace;
  * log p = log N(latent; 0, sigma_max^2 I) + delta_ll.  It returns (log p, {"fevals": n}), not the
    latent.  To give it the exact prior p_T we wrap the ``odeint`` it imported (``KS.odeint``) to
    capture the latent, then swap the Gaussian prior term for the exact mixture log-density at
    sigma_max.  The Gaussian-prior value is reported too.

Denoiser: D(x_k, sigma) = E[x_0 | x_0 + sigma n = x_k] for the mixture sum_k w_k N(mu_k, diag(s_k^2))
(per-component Gaussian posterior means, weighted by the softmax responsibilities), the same closed
form as diffjax/testing/gmm.py with alpha = 1.  Computed in ``--dtype`` (float32 by default, matching
diffjax's float32 runs).

Input npz (written by bench_likelihood.py): weights, means, variances, x_k (n, D) float32,
sigma_min, sigma_max, tols, seeds.  Output JSON: per tolerance and seed, per-point log p_k (exact
prior and Gaussian prior), NFE (k-diffusion's fevals and a counter in the model wrapper) and wall times.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

import k_diffusion
from k_diffusion import sampling as KS

LOG_2PI = math.log(2 * math.pi)


class MixtureDenoiser:
    """Exact denoiser of a diagonal Gaussian mixture under x = x_0 + sigma n, with a call counter."""

    def __init__(self, weights, means, variances, dtype):
        self.dtype = dtype
        w = torch.as_tensor(weights, dtype=dtype)
        self.logw = torch.log(w / w.sum())
        self.means = torch.as_tensor(means, dtype=dtype)
        self.var = torch.as_tensor(variances, dtype=dtype)
        self.calls = 0

    def __call__(self, x, sigma, **kwargs):
        self.calls += 1
        s2 = (sigma.to(self.dtype) ** 2).reshape(-1, 1, 1)  # (B, 1, 1)
        xx = x.to(self.dtype)
        var = self.var[None] + s2  # (B, K, D)
        diff = xx[:, None, :] - self.means[None]
        log_comp = -0.5 * torch.sum(diff**2 / var + torch.log(var) + LOG_2PI, dim=-1)
        resp = torch.softmax(log_comp + self.logw[None], dim=-1)[..., None]
        x0 = torch.sum(resp * (self.means[None] + self.var[None] / var * diff), dim=1)
        return x0.to(x.dtype)

    def log_prob(self, x, sigma):
        """Exact log p_sigma(x) of the noised mixture (float64 on the side)."""
        x = torch.as_tensor(x, dtype=torch.float64)
        var = self.var.to(torch.float64)[None] + float(sigma) ** 2
        diff = x[:, None, :] - self.means.to(torch.float64)[None]
        log_comp = -0.5 * torch.sum(diff**2 / var + torch.log(var) + LOG_2PI, dim=-1)
        return torch.logsumexp(log_comp + self.logw.to(torch.float64)[None], dim=-1)


_captured = {}
_orig_odeint = KS.odeint


def _capturing_odeint(*args, **kwargs):
    sol = _orig_odeint(*args, **kwargs)
    _captured["latent"] = sol[0][-1].detach().clone()
    return sol


KS.odeint = _capturing_odeint  # k-diffusion calls the name it imported into its module


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problem", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    # 1 thread: on this 2-core machine torch's intra-op threading made these tiny (256 x 32) ops
    # ~30x slower under load (0.057 s vs 1.6 s per call); 1 is k-diffusion's best setting here.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=1, help="timed repeats per (tol, seed); wall = median")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    p = np.load(args.problem)
    model = MixtureDenoiser(p["weights"], p["means"], p["variances"], dtype)
    x = torch.as_tensor(p["x_k"], dtype=dtype)
    s_min, s_max = float(p["sigma_min"]), float(p["sigma_max"])
    tols = [float(t) for t in p["tols"]]
    seeds = [int(s) for s in p["seeds"]]

    # warm-up (allocator, autograd, torchdiffeq import paths)
    torch.manual_seed(12345)
    KS.log_likelihood(model, x[:16], s_min, s_max, atol=1e-3, rtol=1e-3)

    runs = []
    for tol in tols:
        for seed in seeds:
            walls = []
            for _ in range(args.reps):  # same seed each repeat: identical result, only the time differs
                torch.manual_seed(seed)
                model.calls = 0
                t0 = time.perf_counter()
                ll, info = KS.log_likelihood(model, x, s_min, s_max, atol=tol, rtol=tol)
                walls.append(time.perf_counter() - t0)
            wall = float(np.median(walls))
            latent = _captured["latent"].to(torch.float64)
            ll = ll.to(torch.float64)
            gauss = torch.distributions.Normal(0.0, s_max).log_prob(latent).flatten(1).sum(1)
            exact_prior = model.log_prob(latent, s_max)
            runs.append({
                "tol": tol, "seed": seed, "wall_s": wall, "walls_s": walls,
                "nfe_fevals": int(info["fevals"]), "nfe_counted": int(model.calls),
                "logp_k_gauss_prior": ll.tolist(),
                "logp_k_exact_prior": (ll - gauss + exact_prior).tolist(),
            })
            print(f"kdiff tol={tol:g} seed={seed} nfe={info['fevals']} (counted {model.calls}) "
                  f"wall={wall:.3f}s", flush=True)
    out = {
        "lib": "k-diffusion", "k_diffusion": getattr(k_diffusion, "__version__", "0.1.1.post1"),
        "torch": torch.__version__, "dtype": args.dtype, "threads": args.threads,
        "n": int(x.shape[0]), "dim": int(x.shape[1]), "sigma_min": s_min, "sigma_max": s_max,
        "runs": runs,
    }
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
