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
The SDE / ancestral DPM-Solver++ samplers run with eta = 0 (their ODE solvers). sample_dpm_fast and
sample_dpm_adaptive stop at sigma_min; the step to sigma = 0, D(x; sigma_min), is added (one evaluation).
x_T(k-diffusion) = x_T(VP) / alpha(1). The output at sigma = 0 is x_0, directly comparable.
"""

from __future__ import annotations

import functools
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


def _eta0(fn):
    """The deterministic (eta = 0) member of a k-diffusion SDE / ancestral sampler family."""
    return functools.partial(fn, eta=0.0)


# label -> (sampler, evaluations per interval (the last interval to 0 costs 1), grid); each sampler on
# k-diffusion's Karras (rho = 7) grid and on its log-sigma grid (get_sigmas_exponential)
_FAMILIES = {
    "sample_euler": (KS.sample_euler, 1),
    "sample_heun": (KS.sample_heun, 2),
    "sample_dpm_2": (KS.sample_dpm_2, 2),
    "sample_lms": (KS.sample_lms, 1),
    "sample_dpmpp_2m": (KS.sample_dpmpp_2m, 1),
    # DPM-Solver++(2S), (2M) midpoint/heun and (3M) with eta = 0: the ODE members of the SDE samplers
    "sample_dpmpp_2s_ancestral[eta=0]": (_eta0(KS.sample_dpmpp_2s_ancestral), 2),
    "sample_dpmpp_2m_sde[eta=0,heun]": (functools.partial(KS.sample_dpmpp_2m_sde, eta=0.0, solver_type="heun"), 1),
    "sample_dpmpp_3m_sde[eta=0]": (_eta0(KS.sample_dpmpp_3m_sde), 1),
}
SAMPLERS = {f"{name}[{grid}]": (fn, k, grid) for name, (fn, k) in _FAMILIES.items()
            for grid in ("karras", "exponential")}
# k-diffusion's adaptive DPM-Solver-12 / -23 (its defaults: rtol 0.05, atol 0.0078, h_init 0.05)
ADAPTIVE = [(order, rtol) for order in (2, 3) for rtol in (0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002)]


def sigmas_for(grid, n, sigma_min, sigma_max):
    if grid == "karras":
        return KS.get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0)
    return KS.get_sigmas_exponential(n, sigma_min, sigma_max)


def run_fixed(den, x_T, sigma_min, sigma_max, budget, reps):
    """Every fixed-grid sampler at one NFE budget, and sample_dpm_fast (its own logSNR steps, n = budget - 1)."""
    for label, (fn, k, grid) in SAMPLERS.items():
        n = (budget - 1) // k + 1  # n sigmas > 0: k (n - 1) + 1 evaluations
        if n < 2:
            continue
        sigmas = sigmas_for(grid, n, sigma_min, sigma_max)
        yield label, n, lambda: fn(den, x_T.clone(), sigmas, disable=True)
    # DPM-Solver-fast: budget - 1 evaluations from sigma_max to sigma_min (orders 3, ..., 3, 2|1), then
    # the step to sigma = 0 (one evaluation)
    yield "sample_dpm_fast", budget - 1, lambda: _to_zero(
        den, KS.sample_dpm_fast(den, x_T.clone(), sigma_min, sigma_max, budget - 1, disable=True), sigma_min)


def _to_zero(den, x, sigma_min):
    """The final step from sigma_min to sigma = 0, D(x; sigma_min) (one evaluation), as every sampler here ends."""
    return den(x, torch.full((x.shape[0],), sigma_min, dtype=x.dtype))


def main():
    for name, d, args in peer_problems(RESULTS):
        ac = np.asarray(d["alphas_cumprod"], np.float64)
        sigma_max = float(np.sqrt((1 - ac[-1]) / ac[-1]))
        sigma_min = float(np.sqrt((1 - ac[0]) / ac[0]))
        den = Denoiser(d["weights"], d["means"], d["variances"])
        x_T = torch.as_tensor(d["x_T"], dtype=torch.float32) * math.sqrt(1 + sigma_max**2)
        runs, outs = [], {}

        def record(label, budget, steps, thunk, extra=None):
            times = []
            for _ in range(args.reps):
                den.nfe = 0
                t0 = time.perf_counter()
                with torch.no_grad():
                    x = thunk()
                times.append(time.perf_counter() - t0)
            key = f"{label}@{budget}"
            outs[key] = x.numpy()
            runs.append(dict(key=key, label=label, budget=budget, steps=steps, nfe=den.nfe,
                             deterministic=True, wall_s=float(np.median(times)), **(extra or {})))
            print(f"  {name} {label:44s} B={budget} n={steps} NFE={den.nfe:3d} "
                  f"wall={np.median(times)*1e3:.1f}ms", flush=True)

        for budget in [int(b) for b in d["nfes"]]:
            for label, n, thunk in run_fixed(den, x_T, sigma_min, sigma_max, budget, args.reps):
                record(label, budget, n, thunk)
        for order, rtol in ADAPTIVE:
            label = f"sample_dpm_adaptive[order={order},rtol={rtol:g}]"
            record(label, None, None,
                   lambda: _to_zero(den, KS.sample_dpm_adaptive(den, x_T.clone(), sigma_min, sigma_max, order=order,
                                                                rtol=rtol, disable=True), sigma_min),
                   dict(adaptive=dict(order=order, rtol=rtol, atol=0.0078)))
        np.savez(os.path.join(RESULTS, f"peer_kdiffusion_{name}.npz"), **outs)
        json.dump(dict(versions=dict(k_diffusion=getattr(k_diffusion, "__version__", "0.1.1.post1"),
                                     torch=torch.__version__,
                                     sigma_min=sigma_min, sigma_max=sigma_max),
                       runs=runs),
                  open(os.path.join(RESULTS, f"peer_kdiffusion_{name}.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
