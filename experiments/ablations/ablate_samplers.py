"""Sweep samplers x NFE on a trained checkpoint; write a CSV and a plot.

    python experiments/ablations/ablate_samplers.py --workdir runs/digits [--config experiments/configs/digits.py]

Two metrics, each with what it can resolve:
* ``ode_rms``: RMS distance per dimension from the same x_T to the endpoint of the PF-ODE solved
  with adaptive Tsit5 at rtol = atol = 1e-6 (the model's exact deterministic sample). No sampling
  noise floor; defined for deterministic samplers (the ODE solvers, DDIM eta = 0).
* ``sw``: sliced Wasserstein-1 distance (pixel space) between the samples and test images, for
  every sampler; quoted next to its floor, the same distance between two disjoint halves of
  the test split scaled to the sample count (finite-sample noise).
"""

from __future__ import annotations

import argparse
import csv
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import data as data_lib
from diffjax.config import load
from diffjax.metrics import sliced_wasserstein
from diffjax.training.loop import ema_model_fn, setup

DETERMINISTIC = ("ddim", "dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpm_solver++_2m", "dpm_solver++_3m")
STOCHASTIC = ("ddpm", "euler_maruyama")


def reference_endpoint(run, x_T):
    """The PF-ODE endpoint from x_T at tight tolerance: the target every deterministic sampler approximates."""
    from diffjax import sample

    return sample(ema_model_fn(run), run.schedule, x_T, method="pf_ode", num_steps=1, t_end=0.0,
                  prediction=run.config.diffusion.prediction, rtol=1e-6, atol=1e-6)


def test_images(run, n):
    batches = data_lib.eval_batches(run.config.data.dataset, split="test", batch_size=n, num_examples=n,
                                    data_dir=run.config.data.data_dir)
    u = np.concatenate([np.asarray(b["x"]) for b in batches])
    if run.spec.num_bits is None:
        return u.reshape(len(u), -1)
    return data_lib.to_data_range(u.astype(np.float32), run.spec.num_bits).reshape(len(u), -1)  # bin centres


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a run directory with checkpoints/")
    p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "digits.py"))
    p.add_argument("--nfe", default="5,10,20,50")
    p.add_argument("--methods", default=",".join(DETERMINISTIC + STOCHASTIC))
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="CSV path (default: WORKDIR/ablation.csv; the plot beside it)")
    args = p.parse_args(argv)

    config = load(args.config)
    run = setup(config, args.workdir)
    if run.checkpointer.latest_step() is None:
        raise SystemExit(f"no checkpoint under {args.workdir}/checkpoints: train first")
    step = int(run.state.step)
    key = jax.random.PRNGKey(args.seed)
    x_T = run.schedule.prior_sample(key, (args.num_samples, *run.spec.shape))
    t0 = time.perf_counter()
    ref = np.asarray(reference_endpoint(run, x_T)).reshape(args.num_samples, -1)
    print(f"checkpoint step {step}; reference PF-ODE endpoint in {time.perf_counter() - t0:.1f} s")
    data = test_images(run, 2 * args.num_samples)
    k_sw = jax.random.PRNGKey(args.seed + 1)
    floor = float(sliced_wasserstein(data[:args.num_samples], data[args.num_samples:2 * args.num_samples], k_sw))
    print(f"SW floor (two disjoint halves of the test split, n={args.num_samples}): {floor:.4f}")

    from diffjax import sample

    rows = []
    for method in args.methods.split(","):
        for nfe in (int(n) for n in args.nfe.split(",")):
            # singlestep order k uses k evaluations per step, and t_end = 0 ends with one exact denoise
            k = {"dpm_solver_2": 2, "dpm_solver_3": 3}.get(method, 1)
            steps = (nfe - 1) // k + 1
            t0 = time.perf_counter()
            x, used = sample(ema_model_fn(run), run.schedule, x_T, method=method, num_steps=steps, t_end=0.0,
                             key=jax.random.fold_in(key, 7), prediction=config.diffusion.prediction,
                             return_nfe=True)
            x = np.asarray(x).reshape(args.num_samples, -1)
            secs = time.perf_counter() - t0
            ode_rms = float(np.sqrt(np.mean((x - ref) ** 2))) if method in DETERMINISTIC else float("nan")
            sw = float(sliced_wasserstein(jnp.asarray(x), jnp.asarray(data[:args.num_samples]), k_sw))
            rows.append({"method": method, "nfe": int(used), "ode_rms": ode_rms, "sw": sw, "sw_floor": floor,
                         "seconds": secs, "step": step})
            print(f"{method:>16} NFE {int(used):3d}  ode_rms {ode_rms:.2e}  sw {sw:.4f}  ({secs:.1f} s)")

    out = args.out or os.path.join(args.workdir, "ablation.csv")
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, os.path.splitext(out)[0] + ".png", floor)
    print(f"wrote {out}")


def plot(rows, path, floor):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        nfe = [r["nfe"] for r in rs]
        if method in DETERMINISTIC:
            a.plot(nfe, [r["ode_rms"] for r in rs], "o-", label=method)
        b.plot(nfe, [r["sw"] for r in rs], "o-", label=method)
    a.set(xscale="log", yscale="log", xlabel="NFE", ylabel="RMS to exact PF-ODE endpoint", title="deterministic")
    b.axhline(floor, color="k", ls="--", lw=1, label="finite-sample floor")
    b.set(xscale="log", xlabel="NFE", ylabel="sliced W1 to test images", title="all samplers")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    from diffjax import xla_cpu

    xla_cpu.tune()  # XLA:CPU flags and glibc malloc options before JAX starts, as diffjax's CLIs do
    main()
