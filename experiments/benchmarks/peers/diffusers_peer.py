"""diffusers schedulers driven by the exact Gaussian-mixture oracle (peer for bench_samplers.py).

Reads experiments/benchmarks/results/<problem>_problem.npz (mixture parameters, x_T, written by
bench_samplers.py) and writes experiments/benchmarks/results/peer_diffusers_<problem>.{json,npz} (final samples,
NFE counted in the model wrapper, wall time); bench_samplers.py --merge-only scores them with the
same metrics as diffjax.

Schedule: diffusers' own "linear" betas 1e-4..0.02, 1000 steps (= DiscreteDDPM.linear()). The oracle
is the closed-form E[eps | x_t] of diffjax/testing/gmm.py re-implemented in torch (float64 inside);
at an integer timestep tau it uses alpha_bar = scheduler.alphas_cumprod[tau] (our t = (tau+1)/1000), as
a network trained on the discrete chain would. EulerDiscreteScheduler's (fractional) timesteps are
evaluated at the scheduler's own sigma: its model input scale_model_input(x) = x / sqrt(1 + sigma^2)
is the VP x_t with alpha = 1/sqrt(1+sigma^2); x_T is converted to x_T * sqrt(1 + sigma_max^2).

Every sampler starts at timestep 999 (t = 1) from the same x_T and ends with a step to sigma = 0
(DDIM: timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False; the others their
defaults, final_sigmas_type="zero").

Usage: python experiments/benchmarks/peers/diffusers_peer.py [--quick]
"""

from __future__ import annotations

import json
import sys
import os
import time

import numpy as np
import torch

import diffusers
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       UniPCMultistepScheduler)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from torch_gmm import TorchGMM, peer_problems  # noqa: E402
RESULTS = os.path.join(os.path.dirname(HERE), "results")


def run_discrete(sched, oracle, x_T, steps):
    """DDIM / DPM-Solver / UniPC: model input is the VP x_t at integer timestep tau."""
    sched.set_timesteps(steps)
    ac = sched.alphas_cumprod.to(torch.float64)
    x = x_T.clone() * sched.init_noise_sigma
    for tau in sched.timesteps:
        a2 = ac[int(tau)]
        eps = oracle.eps(x, torch.sqrt(a2), torch.sqrt(1 - a2))
        x = sched.step(eps, tau, x).prev_sample
    return x


def run_euler(sched, oracle, x_T, steps):
    sched.set_timesteps(steps)
    x = x_T.clone() * torch.sqrt(1 + sched.sigmas[0].to(torch.float64) ** 2).to(x_T.dtype)
    for tau in sched.timesteps:
        x_in = sched.scale_model_input(x, tau)
        s = sched.sigmas[sched.step_index].to(torch.float64)
        eps = oracle.eps(x_in, 1 / torch.sqrt(1 + s**2), s / torch.sqrt(1 + s**2))
        x = sched.step(eps, tau, x).prev_sample
    return x


def configs():
    common = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    return {
        "DDIM[trailing]": (lambda: DDIMScheduler(**common, timestep_spacing="trailing",
                                                 set_alpha_to_one=True, clip_sample=False),
                           run_discrete),
        "DPMSolverMultistep[++2M]": (lambda: DPMSolverMultistepScheduler(**common), run_discrete),
        "DPMSolverMultistep[++2M,lu_lambdas]": (
            lambda: DPMSolverMultistepScheduler(**common, use_lu_lambdas=True), run_discrete),
        "DPMSolverMultistep[++2M,karras]": (
            lambda: DPMSolverMultistepScheduler(**common, use_karras_sigmas=True), run_discrete),
        "DPMSolverMultistep[++3M]": (
            lambda: DPMSolverMultistepScheduler(**common, solver_order=3), run_discrete),
        "UniPCMultistep[bh2]": (lambda: UniPCMultistepScheduler(**common), run_discrete),
        "UniPCMultistep[bh2,order3]": (
            lambda: UniPCMultistepScheduler(**common, solver_order=3), run_discrete),
        "UniPCMultistep[bh1]": (
            lambda: UniPCMultistepScheduler(**common, solver_type="bh1"), run_discrete),
        "UniPCMultistep[bh1,order3]": (
            lambda: UniPCMultistepScheduler(**common, solver_type="bh1", solver_order=3),
            run_discrete),
        # the peers' own best settings (issue 25): Karras sigmas for UniPC and DPM-Solver++(3M)
        "UniPCMultistep[bh2,karras]": (
            lambda: UniPCMultistepScheduler(**common, use_karras_sigmas=True), run_discrete),
        "UniPCMultistep[bh2,order3,karras]": (
            lambda: UniPCMultistepScheduler(**common, solver_order=3, use_karras_sigmas=True), run_discrete),
        "DPMSolverMultistep[++3M,karras]": (
            lambda: DPMSolverMultistepScheduler(**common, solver_order=3, use_karras_sigmas=True), run_discrete),
        "DPMSolverMultistep[++3M,lu_lambdas]": (
            lambda: DPMSolverMultistepScheduler(**common, solver_order=3, use_lu_lambdas=True), run_discrete),
        "EulerDiscrete": (lambda: EulerDiscreteScheduler(**common), run_euler),
        "EulerDiscrete[karras]": (lambda: EulerDiscreteScheduler(**common, use_karras_sigmas=True),
                                  run_euler),
    }


def main():
    for name, d, args in peer_problems(RESULTS):
        nfes = [int(b) for b in d["nfes"]]
        oracle = TorchGMM(d["weights"], d["means"], d["variances"])
        x_T = torch.as_tensor(d["x_T"], dtype=torch.float32)
        runs, outs = [], {}
        for label, (make, runner) in configs().items():
            for budget in nfes:
                steps = budget  # one evaluation per step, the last one to sigma = 0
                try:
                    times = []
                    for _ in range(args.reps):
                        sched = make()
                        oracle.nfe = 0
                        t0 = time.perf_counter()
                        with torch.no_grad():
                            x = runner(sched, oracle, x_T, steps)
                        times.append(time.perf_counter() - t0)
                except Exception as e:
                    print(f"  {label} NFE {budget}: FAILED {type(e).__name__}: {e}", flush=True)
                    continue
                key = f"{label}@{budget}"
                outs[key] = x.numpy()
                runs.append(dict(key=key, label=label, budget=budget, steps=steps, nfe=oracle.nfe,
                                 deterministic=True, wall_s=float(np.median(times)),
                                 timesteps=[float(t) for t in sched.timesteps]))
                print(f"  {name} {label:38s} B={budget:3d} NFE={oracle.nfe:3d} "
                      f"wall={np.median(times)*1e3:.1f}ms", flush=True)
        np.savez(os.path.join(RESULTS, f"peer_diffusers_{name}.npz"), **outs)
        json.dump(dict(versions=dict(diffusers=diffusers.__version__, torch=torch.__version__),
                       runs=runs), open(os.path.join(RESULTS, f"peer_diffusers_{name}.json"), "w"),
                  indent=1)


if __name__ == "__main__":
    main()
