"""Error of the last step to sigma = 0 alone, on the sampler benchmark's oracle problems.

From the same x_T as ``bench_samplers.py``, solve the PF-ODE exactly (Tsit5, rtol = atol = 1e-6) down
to t_stop, then take the step to sigma = 0 (the plain denoise x0_hat(x_{t_stop})) and report its RMS
distance to the exact endpoint (the benchmark's reference). This is the floor that a sampler whose
grid stops at t_stop and jumps to x_0 cannot go below, whatever it does before t_stop.

    python experiments/benchmarks/final_step_error.py      # < 1 min; writes the "final-step" block of BENCHMARKS.md
"""

from __future__ import annotations

import os
import sys

import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repo root: `experiments.*` imports resolve when run as a script
from experiments.benchmarks.bench_samplers import ADAPTIVE_STEPS, make_problem, rms  # noqa: E402
from experiments.benchmarks.benchlib import write_section  # noqa: E402
import diffjax  # noqa: E402
from diffjax.parameterization import make_denoiser  # noqa: E402

T_STOPS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1)


def main():
    lines = ["| problem | " + " | ".join(f"t_stop = {t:g}" for t in T_STOPS) + " |",
             "|---|" + "---|" * len(T_STOPS)]
    for name in ("ring", "gmm32"):
        sched, g, x_T, _, _ = make_problem(name, 2000)
        model_fn = g.model_fn(sched, "eps")
        denoise = make_denoiser(model_fn, sched, "eps")
        kw = dict(method="pf_ode", num_steps=ADAPTIVE_STEPS, solver="tsit5", rtol=1e-6, atol=1e-6)
        ref = diffjax.sample(model_fn, sched, x_T, t_end=0.0, **kw)
        errs = []
        for t_stop in T_STOPS:
            x = diffjax.sample(model_fn, sched, x_T, t_end=t_stop, **kw)
            errs.append(rms(denoise(x, jnp.asarray(t_stop), None).x0, ref))
        lines.append(f"| {name} | " + " | ".join(f"{e:.2e}" for e in errs) + " |")
        print(lines[-1], flush=True)
    write_section("final-step", "RMS distance to the exact ODE endpoint of the exact x_{t_stop} followed by "
                  "the plain denoise (n = 2000, same x_T as the sampler tables).\n\n" + "\n".join(lines),
                  "python experiments/benchmarks/final_step_error.py")


if __name__ == "__main__":
    from diffjax import xla_cpu

    xla_cpu.tune()  # XLA:CPU flags and glibc malloc options before JAX starts, as diffjax's CLIs do
    main()
