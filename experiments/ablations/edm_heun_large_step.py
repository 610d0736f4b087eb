"""Why ``edm_heun`` is poor on t-based grids with few steps: Heun in s = sigma / alpha over a large first step.

    python experiments/ablations/edm_heun_large_step.py

On the cosine schedule s falls from 118.8 at t_max to 2.4 at t = 0.75, and the trapezoid rule over that step
weights the end slope by the whole step length. The script prints the RMS distance to the exact PF-ODE endpoint
(Tsit5 at rtol = atol = 1e-8, float64) of edm_heun / heun (Heun in t) and edm_euler / euler on the ring oracle,
5 steps from the same 512 x_T, for four grids (quoted in BENCHMARKS.md, "Samplers x time grids on digits").
"""

import jax
import jax.numpy as jnp

import diffjax
from diffjax.testing.gmm import ring_mixture


def main():
    jax.config.update("jax_enable_x64", True)
    s = diffjax.VPCosine()
    model_fn = ring_mixture().model_fn(s, "v")
    x_T = s.prior_sample(jax.random.PRNGKey(0), (512, 2))
    ref = diffjax.sample(model_fn, s, x_T, method="pf_ode", num_steps=1, prediction="v", t_end=0.0,
                         rtol=1e-8, atol=1e-8)
    s_of = lambda t: float(s.sigma(t) / s.alpha(t))  # noqa: E731
    print(f"s(t_max) = {s_of(s.t_max):.1f}, s(0.75) = {s_of(0.75):.2f}")
    print("| grid | method | NFE | RMS to the exact endpoint |\n|---|---|---|---|")
    for grid in ("time_uniform", "logSNR", "karras", "trailing"):
        for method in ("edm_heun", "heun", "edm_euler", "euler"):
            x, nfe = diffjax.sample(model_fn, s, x_T, method=method, num_steps=5, prediction="v", t_end=0.0,
                                    grid=grid, return_nfe=True)
            print(f"| {grid} | {method} | {int(nfe)} | {float(jnp.sqrt(jnp.mean((x - ref) ** 2))):.3f} |")


if __name__ == "__main__":
    main()
