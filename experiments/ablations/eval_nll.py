"""Test NLL of a model: bits/dim (n-bit data) or nats/dim (continuous data) via the PF-ODE.

    python experiments/ablations/eval_nll.py --oracle gmm8 --num-examples 256
    python experiments/ablations/eval_nll.py --oracle gmm8 --discrete --trace hutchinson

``--oracle`` evaluates the closed-form Gaussian-mixture model (Bayes-optimal score) on its own
samples and prints the exact NLL next to the estimate. Trained checkpoints are wired in by the
training issue (``--checkpoint``, ``--dataset``), through the same ``evaluate_nll`` call.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import diffjax
from diffjax.likelihood import evaluate_nll
from diffjax.testing.gmm import random_mixture, ring_mixture

SCHEDULES = {"vp": diffjax.VPLinear, "ve": diffjax.VE, "subvp": diffjax.SubVP, "cosine": diffjax.VPCosine}


def _oracle(name):
    if name == "ring":
        return ring_mixture()
    if name.startswith("gmm"):
        return random_mixture(jax.random.PRNGKey(1), dim=int(name[3:]), num_components=3)
    raise ValueError(f"--oracle must be 'ring' or 'gmm<D>'; got {name!r}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--oracle", default="gmm8")
    p.add_argument("--checkpoint", default=None, help="trained model (wired in by the training issue)")
    p.add_argument("--schedule", default="vp", choices=sorted(SCHEDULES))
    p.add_argument("--num-examples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--discrete", action="store_true", help="quantize to 8 bits in [-1, 1], report bits/dim")
    p.add_argument("--trace", default="exact", choices=["exact", "hutchinson"])
    p.add_argument("--num-probes", type=int, default=1)
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.checkpoint is not None:
        raise SystemExit("--checkpoint needs the training pipeline (not in this version); use --oracle")

    schedule = SCHEDULES[args.schedule]()
    oracle = _oracle(args.oracle)
    key = jax.random.PRNGKey(args.seed)
    x, _ = oracle.sample(key, args.num_examples)
    if args.discrete:
        data = jnp.clip(jnp.round((x / (jnp.max(jnp.abs(x)) + 1e-6) + 1.0) * 127.5), 0, 255).astype(jnp.int32)
    else:
        data = schedule.marginal(x, schedule.t_min, jax.random.normal(jax.random.fold_in(key, 1), x.shape))
    batches = [data[i:i + args.batch_size] for i in range(0, args.num_examples, args.batch_size)]
    start = time.time()
    out = evaluate_nll(oracle.model_fn(schedule), schedule, batches, key=jax.random.fold_in(key, 2),
                       discrete=args.discrete, trace=args.trace, num_probes=args.num_probes,
                       rtol=args.rtol, atol=args.atol)
    elapsed = time.time() - start
    print(f"{args.oracle} {args.schedule} trace={args.trace}: NLL {out['mean']:.4f} +- {out['stderr']:.4f} "
          f"{out['unit']} over {out['num_examples']} examples, {out['nfe']} NFE, {elapsed:.1f}s")
    if not args.discrete:
        exact = -float(jnp.mean(oracle.log_prob_t(data, schedule, schedule.t_min))) / oracle.dim
        print(f"exact NLL of the oracle at t_min: {exact:.4f} nats/dim")
    return out


if __name__ == "__main__":
    from diffjax import xla_cpu

    xla_cpu.tune()  # XLA:CPU flags and glibc malloc options before JAX starts, as diffjax's CLIs do
    main()
