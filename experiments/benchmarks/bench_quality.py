"""Quality per compute on digits: Fréchet distance of 1000 samples after a fixed training wall time.

    python experiments/benchmarks/bench_quality.py [--budgets 120,600] [--write-benchmarks]

Contenders, each trained from scratch on the digits train split for the same wall-clock budget on
this machine (one at a time, nothing else running) and sampled with the same NFE:

* diffjax: ``python -m diffjax.main --config experiments/configs/digits.py`` with
  ``training.max_train_seconds`` = budget (the clock includes jit compilation) and no step limit,
  then ``diffjax.generate.draw`` with the config's sampler (DPM-Solver++ 2M) at ``--nfe`` steps;
* diffusers: ``UNet2DModel`` (the same layout) + DDPM eps-MSE, diffusers' training recipe
  (``experiments/benchmarks/peers/diffusers_quality_peer.py``: clock from the first step), sampled with
  ``DPMSolverMultistepScheduler`` at ``--nfe`` steps.

Score: Fréchet distance between the evaluator features (``diffjax.evaluators.digits_evaluator``,
an independent classifier trained on the train split only) of the samples and of the train split.
Floor: the same distance for the 297 real test images (finite-sample bias, no model error; at
n = 1000 it would be lower). One training seed per cell; the sampling-seed spread is shown as the
min-max over ``--sample-seeds`` draws (5 by default). Two figures resolve finer than one draw of 1000: the
FD of all draws pooled (5000 samples: less bias and spread), and that pool's FD extrapolated to
infinitely many samples (``diffjax.metrics.frechet_distance_extrapolated``), which removes the bias
that puts every near-converged model at about the same FD of 1000.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repo root: `experiments.*` imports resolve when run as a script
RESULTS = os.path.join(HERE, "results")


def run_diffjax(budget, workdir, nfe, num_samples, seeds):
    cmd = [sys.executable, "-m", "diffjax.main", "--config", os.path.join(ROOT, "experiments", "configs", "digits.py"),
           "--workdir", workdir, "--config.training.num_steps=10000000",
           f"--config.training.max_train_seconds={budget}", "--config.eval.num_examples=0",
           "--config.training.checkpoint_every=100000", "--config.training.log_every=50"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = json.load(open(os.path.join(workdir, "metrics.json")))
    from diffjax import load_run

    run = load_run(workdir, task="diffusion")
    samples, nfe_used = [], None
    for seed in seeds:
        x, nfe_used = run.sample(num_samples, method=run.config.sample.method, num_steps=nfe,
                                 key=jax.random.PRNGKey(seed), return_nfe=True)
        samples.append(x)
    return samples, dict(steps=metrics["step"], train_seconds=metrics["loop_seconds"], nfe=nfe_used,
                         method=run.config.sample.method, n_params=metrics["num_params"])


def run_diffusers(budget, workdir, nfe, num_samples, seeds, train_images, seed=0, max_steps=None):
    from diffjax.config import base

    c = base()
    np.save(os.path.join(workdir, "train.npy"), train_images)
    spec = dict(train_path=os.path.join(workdir, "train.npy"), budget_seconds=budget, max_steps=max_steps, seed=seed,
                sample_seeds=seeds,
                num_samples=num_samples, nfe=nfe, batch_size=c.training.batch_size,
                learning_rate=c.optim.learning_rate, warmup_steps=c.optim.warmup_steps, grad_clip=c.optim.grad_clip,
                ema_decay=c.optim.ema_decay, ch=c.model.ch, ch_mult=list(c.model.ch_mult),
                num_res_blocks=c.model.num_res_blocks, attn_resolutions=list(c.model.attn_resolutions),
                dropout=c.model.dropout, resolution=8, channels=1)
    path, out = os.path.join(workdir, "spec.json"), os.path.join(workdir, "peer")
    json.dump(spec, open(path, "w"))
    subprocess.run([sys.executable, os.path.join(HERE, "peers", "diffusers_quality_peer.py"), "--spec", path,
                    "--out", out], check=True, stdout=subprocess.DEVNULL)
    info = json.load(open(os.path.join(out, "info.json")))
    samples = [np.load(os.path.join(out, f"samples_{s}.npy")) for s in seeds]
    return samples, dict(steps=info["steps"], train_seconds=info["train_seconds"], nfe=info["nfe"],
                         method="DPMSolverMultistep", n_params=info["n_params"], final_loss=info["final_loss"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="120,600", help="training wall-clock budgets in seconds")
    p.add_argument("--nfe", type=int, default=20)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--sample-seeds", default="0,1,2,3,4",
                   help="one draw of --num-samples per seed; the draws are also pooled (5 x 1000 by default)")
    p.add_argument("--contenders", default="diffjax,diffusers")
    p.add_argument("--write-benchmarks", action="store_true")
    args = p.parse_args(argv)

    from diffjax import evaluators, metrics
    from experiments.ablations.guidance_sweep import real_split

    evaluator = evaluators.digits_evaluator()
    train_x, _ = real_split("train")
    test_x, _ = real_split("test")
    ref = evaluator.features(train_x)
    floor = metrics.frechet_distance_from_features(evaluator.features(test_x), ref)
    seeds = [int(s) for s in args.sample_seeds.split(",")]
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        for name in args.contenders.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                if name == "diffjax":
                    samples, info = run_diffjax(budget, tmp, args.nfe, args.num_samples, seeds)
                else:
                    samples, info = run_diffusers(budget, tmp, args.nfe, args.num_samples, seeds, train_x)
            feats = [evaluator.features(x) for x in samples]
            fds = [metrics.frechet_distance_from_features(f, ref) for f in feats]
            pick = np.random.default_rng(0).permutation(args.num_samples)[:len(test_x)]  # the floor's sample size
            fd_matched = float(np.mean([metrics.frechet_distance_from_features(f[pick], ref) for f in feats]))
            pooled = np.concatenate(feats)
            fd_pooled = metrics.frechet_distance_from_features(pooled, ref)
            fd_inf = metrics.frechet_distance_extrapolated(pooled, ref).value
            row = dict(contender=name, budget_s=budget, fd=float(np.mean(fds)), fd_min=min(fds), fd_max=max(fds),
                       fd_matched=fd_matched, fd_pooled=fd_pooled, n_pooled=len(pooled), fd_inf=fd_inf,
                       wall_s=time.perf_counter() - t0, **info)
            rows.append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    json.dump(dict(rows=rows, floor=floor), open(os.path.join(RESULTS, "bench_quality.json"), "w"), indent=2)
    table = render(rows, floor, args)
    print(table)
    if args.write_benchmarks:
        from experiments.benchmarks.benchlib import write_section

        write_section("quality", table, "python experiments/benchmarks/bench_quality.py " + " ".join(argv or sys.argv[1:]))


def render(rows, floor, args):
    lines = [f"{args.num_samples} samples per cell, NFE {args.nfe}; Fréchet distance to the train split in the "
             f"independent digits evaluator's 64-d feature space (lower is better), mean over sampling seeds "
             f"{args.sample_seeds} (min-max in brackets). "
             f"Floor (the 297 real test images vs train; no model error, only finite-sample bias): {floor:.2f}; "
             f"'FD at n=297' subsamples each draw to 297 to compare with it like for like. 'pooled': all draws "
             f"together (n = {len(args.sample_seeds.split(','))} x {args.num_samples}), a smaller finite-sample bias "
             f"and spread than one draw; 'extrapolated': the pooled draws' FD fitted over subset sizes n and "
             f"extrapolated to n -> inf (`diffjax.metrics.frechet_distance_extrapolated`, FID_inf of Chong & "
             f"Forsyth 2020).", "",
             "| budget | contender | FD | FD at n=297 | FD pooled | FD extrapolated | steps trained "
             "| train s (budget clock) | sampler | NFE | params |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget_s']:g} s | {r['contender']} | {r['fd']:.2f} [{r['fd_min']:.2f}, {r['fd_max']:.2f}] "
                     f"| {r['fd_matched']:.2f} | {r['fd_pooled']:.2f} | {r['fd_inf']:.2f} "
                     f"| {r['steps']} | {r['train_seconds']:.0f} | {r['method']} | {r['nfe']} | {r['n_params']:,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    from diffjax import xla_cpu

    xla_cpu.tune()  # XLA:CPU flags and glibc malloc options before JAX starts, as diffjax's CLIs do
    main()
