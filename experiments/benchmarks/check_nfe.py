"""Cross-check diffjax's returned NFE against model calls counted at run time (host callback).

python experiments/benchmarks/check_nfe.py
"""

import jax
import jax.numpy as jnp
import numpy as np

import diffjax
from diffjax.testing.gmm import ring_mixture

COUNT = [0]


def _inc(n):
    COUNT[0] += 1


def main():
    sched = diffjax.DiscreteDDPM.linear()
    g = ring_mixture()
    base = g.model_fn(sched, "eps")

    def model_fn(x, t, cond=None):
        jax.debug.callback(_inc, t[0])
        return base(x, t, cond)

    x_T = sched.prior_sample(jax.random.PRNGKey(0), (64, 2))
    cases = [
        ("ddim", 10, {}), ("ddpm", 10, {}), ("euler_maruyama", 10, {}), ("pc", 5, {}),
        ("dpm_solver_1", 10, {}), ("dpm_solver_2", 5, {}), ("dpm_solver_3", 4, {}),
        ("dpm_solver++_2m", 10, {}), ("pf_ode", 10, {"solver": "euler"}),
        ("pf_ode", 5, {"solver": "heun"}), ("pf_ode", 2, {"solver": "tsit5", "rtol": 1e-3, "atol": 1e-3}),
        ("pf_ode", 1, {"solver": "tsit5", "rtol": 1e-3, "atol": 1e-3}),
    ]
    bad = 0
    for method, steps, opts in cases:
        for t_end in (0.0, None):
            COUNT[0] = 0
            x, nfe = diffjax.sample(model_fn, sched, x_T, method=method, num_steps=steps,
                                    key=jax.random.PRNGKey(1), t_end=t_end, return_nfe=True, **opts)
            jax.block_until_ready(x)
            jax.effects_barrier()
            ok = COUNT[0] == nfe
            bad += not ok
            print(f"{method:16s} {str(opts):48s} S={steps:3d} t_end={t_end}: returned NFE {nfe:4d}, "
                  f"counted {COUNT[0]:4d} {'ok' if ok else 'MISMATCH'}")
    print(f"{bad} mismatches")


if __name__ == "__main__":
    from diffjax import xla_cpu

    xla_cpu.tune()  # XLA:CPU flags and glibc malloc options before JAX starts, as diffjax's CLIs do
    main()
