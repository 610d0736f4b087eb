"""PF-ODE log-likelihood benchmark: diffjax.likelihood.log_likelihood vs the exact Gaussian-mixture
oracle and vs k-diffusion's ``sampling.log_likelihood`` on the same points.

    python experiments/benchmarks/bench_likelihood.py --quick      # D = 8, n = 64, 2 tolerances (< 3 min)
    python experiments/benchmarks/bench_likelihood.py              # D = 8 and 32, n = 256, tol 1e-2, 3e-3, 1e-3..1e-6,
                                                        # per-example and batch error control
    options: --kdiff-python PATH (default /work/venvs/kdiff/bin/python), --no-peer

Problems: g = random_mixture(PRNGKey(1), dim=D, num_components=3) on VPLinear (t_eps = 1e-3) and VE
(t_eps = 0, sigma(0) = 0.01).  Points x = schedule.marginal(x0, t_eps, noise) with
x0 = g.sample(PRNGKey(2), n)[0], noise ~ N(0, I) from PRNGKey(3).  Reference: exact log p_{t_eps}(x)
(float64 numpy re-implementation of g.log_prob_t; its gap to the float32 g.log_prob_t is reported).
diffjax gets prior_logp = exact log p_T (g.log_prob_t at t_max); k-diffusion gets the same exact prior
by swapping its Gaussian prior term using the latent (see the peer).  Errors are per point,
(log p_hat - log p_exact) / D in nats/dim: mean |err|, bias = mean err (+- its standard error),
std.  Wall = median of post-warm-up calls (jax.block_until_ready), points/s = n / wall.

Writes experiments/benchmarks/results/likelihood_{quick,full}.{json,md} and lik_<problem>.npz (peer input).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repo root: `experiments.*` imports resolve when run as a script
from experiments.benchmarks.benchlib import write_section  # noqa: E402
import diffjax
from diffjax.likelihood import log_likelihood
from diffjax.testing.gmm import random_mixture

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
PEER = os.path.join(HERE, "peers", "kdiffusion_likelihood_peer.py")
LOG_2PI = math.log(2 * math.pi)


def exact_logp64(g, alpha, sigma2, x):
    """log p_t(x) of the noised mixture in float64 (alpha, sigma2 scalars at t)."""
    w = np.asarray(g.weights, np.float64)
    mu = np.asarray(g.means, np.float64)
    s2 = np.asarray(g.variances, np.float64)
    x = np.asarray(x, np.float64)
    var = alpha**2 * s2[None] + sigma2
    diff = x[:, None, :] - alpha * mu[None]
    lc = -0.5 * np.sum(diff**2 / var + np.log(var) + LOG_2PI, axis=-1) + np.log(w)[None]
    m = lc.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(lc - m).sum(axis=1, keepdims=True)))[:, 0]


def err_stats(logp, ref, d):
    e = (np.asarray(logp, np.float64) - ref) / d
    return {"mean_abs": float(np.mean(np.abs(e))), "bias": float(np.mean(e)),
            "bias_se": float(np.std(e, ddof=1) / np.sqrt(e.size)), "std": float(np.std(e, ddof=1)),
            "max_abs": float(np.max(np.abs(e)))}


def make_problem(name, dim, n):
    sched, t_eps = {"vp": (diffjax.VPLinear(), 1e-3), "ve": (diffjax.VE(), 0.0)}[name]
    g = random_mixture(jax.random.PRNGKey(1), dim=dim, num_components=3)
    x0 = g.sample(jax.random.PRNGKey(2), n)[0]
    noise = jax.random.normal(jax.random.PRNGKey(3), x0.shape, x0.dtype)
    x = sched.marginal(x0, t_eps, noise)
    a_eps, s2_eps = float(sched.alpha(t_eps)), float(sched.sigma2(t_eps))
    a_T, s2_T = float(sched.alpha(sched.t_max)), float(sched.sigma2(sched.t_max))
    ref = exact_logp64(g, a_eps, s2_eps, x)
    ref32 = np.asarray(g.log_prob_t(x, sched, t_eps), np.float64)
    return {"name": f"{name}-D{dim}", "sched_name": name, "sched": sched, "t_eps": t_eps, "g": g, "x": x,
            "dim": dim, "n": n, "ref": ref, "ref32_gap": float(np.max(np.abs(ref32 - ref)) / dim),
            "alpha_eps": a_eps, "sigma2_eps": s2_eps, "alpha_T": a_T, "sigma2_T": s2_T,
            "model_fn": g.model_fn(sched),  # created once: the jit cache is keyed on its identity
            "prior": (lambda z, g=g, s=sched: g.log_prob_t(z, s, s.t_max))}


def time_call(fn, reps, block_s=0.1):
    """Median over ``reps`` of the per-call wall time, each rep timing a block of back-to-back calls
    lasting about ``block_s`` (a 5 ms call timed alone swings by 30 % on this machine)."""
    jax.block_until_ready(fn())  # warm-up / compile
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    per_block = max(1, int(round(block_s / max(time.perf_counter() - t0, 1e-6))))
    walls = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(per_block):
            out = jax.block_until_ready(fn())
        walls.append((time.perf_counter() - t0) / per_block)
    return out, float(np.median(walls)), walls


def run_diffjax(p, tols, probes_list, seeds, reps, log):
    rows = []
    m, s, x, d = p["model_fn"], p["sched"], p["x"], p["dim"]
    traces = [("exact", 1)] + [("hutchinson", k) for k in probes_list]
    variants = [(tr, k, ec, "schedule") for ec in ("per_example", "batch") for tr, k in traces]
    variants += [(tr, k, "batch", "scaled") for tr, k in traces]  # k-diffusion's coordinates and norm
    for trace, k, ec, coords in variants:
        for tol in tols:
            logps, nfes, walls = [], [], []
            for seed in (seeds if trace == "hutchinson" else seeds[:1]):
                key = jax.random.PRNGKey(seed)
                fn = lambda: log_likelihood(m, s, x, key=key, trace=trace, num_probes=k, probe="rademacher",
                                            rtol=tol, atol=tol, t_eps=p["t_eps"], prior_logp=p["prior"],
                                            error_control=ec, coordinates=coords)
                res, wall, _ = time_call(fn, reps)
                logps.append(np.asarray(res.logp, np.float64))
                nfes.append(int(res.nfe))
                walls.append(wall)
            e = err_stats(np.concatenate(logps), np.tile(p["ref"], len(logps)), d)
            wall = float(np.median(walls))
            tags = ",".join(([coords] if coords != "schedule" else []) + ([ec] if ec != "per_example" else []))
            method = ("exact" if trace == "exact" else f"hutch-rad{k}") + (f" [{tags}]" if tags else "")
            row = {"lib": "diffjax", "method": method, "error_control": ec, "coordinates": coords,
                   "tol": tol, "nfe": int(np.median(nfes)), "nfe_range": [min(nfes), max(nfes)],
                   "wall_s": wall, "pts_per_s": p["n"] / wall, "num_keys": len(logps), **e}
            rows.append(row)
            log(f"  {p['name']} diffjax {row['method']:>12} tol={tol:g} nfe={row['nfe']} wall={wall:.4f}s "
                f"mean|err|={e['mean_abs']:.2e} bias={e['bias']:+.2e}+-{e['bias_se']:.1e} std={e['std']:.2e}")
    # the Gaussian prior's mismatch, once per problem (exact trace, smallest tolerance)
    tol = min(tols)
    res = log_likelihood(m, s, x, rtol=tol, atol=tol, t_eps=p["t_eps"])
    e = err_stats(res.logp, p["ref"], d)
    log(f"  {p['name']} diffjax exact tol={tol:g} Gaussian prior N(0, sigma_T^2): bias={e['bias']:+.2e} "
        f"mean|err|={e['mean_abs']:.2e}")
    return rows, {"tol": tol, **e}


def run_peer(p, tols, seeds, reps, kdiff_python, tag, log):
    a_e, a_T = p["alpha_eps"], p["alpha_T"]
    g = p["g"]
    path = os.path.join(RESULTS, f"lik_{p['name']}_{tag}.npz")
    out = os.path.join(RESULTS, f"lik_{p['name']}_{tag}_kdiff.json")
    np.savez(path, weights=np.asarray(g.weights), means=np.asarray(g.means), variances=np.asarray(g.variances),
             x_k=(np.asarray(p["x"], np.float64) / a_e).astype(np.float32),
             sigma_min=math.sqrt(p["sigma2_eps"]) / a_e, sigma_max=math.sqrt(p["sigma2_T"]) / a_T,
             tols=np.asarray(tols), seeds=np.asarray(seeds))
    cmd = [kdiff_python, PEER, "--problem", path, "--out", out, "--reps", str(reps)]
    log("  $ " + " ".join(os.path.relpath(c) if c.startswith(HERE) else c for c in cmd))
    subprocess.run(cmd, check=True)
    with open(out) as f:
        peer = json.load(f)
    d = p["dim"]
    shift = -d * math.log(a_e)  # log p_VP(x) = log p_k(x / alpha) - D log alpha
    rows, gauss = [], []
    by_tol = {}
    for r in peer["runs"]:
        by_tol.setdefault(r["tol"], []).append(r)
    for tol in tols:
        rs = by_tol[tol]
        lp = np.stack([np.asarray(r["logp_k_exact_prior"]) + shift for r in rs])  # (seeds, n)
        lpg = np.stack([np.asarray(r["logp_k_gauss_prior"]) + shift for r in rs])
        wall = float(np.median([r["wall_s"] for r in rs]))
        nfe = int(np.median([r["nfe_counted"] for r in rs]))
        assert all(r["nfe_counted"] == r["nfe_fevals"] for r in rs)
        for mcalls in sorted({1, len(rs)}):
            # m independent calls (fresh probes) averaged: what a k-diffusion user does for more probes
            groups = [lp[i:i + mcalls].mean(0) for i in range(0, len(rs) - mcalls + 1, mcalls)]
            e = err_stats(np.concatenate(groups), np.tile(p["ref"], len(groups)), d)
            row = {"lib": "k-diffusion", "method": "hutch-rad1" if mcalls == 1 else f"hutch-rad1 x{mcalls} calls",
                   "tol": tol, "nfe": nfe * mcalls, "nfe_range": [min(r["nfe_counted"] for r in rs) * mcalls,
                                                                 max(r["nfe_counted"] for r in rs) * mcalls],
                   "wall_s": wall * mcalls, "pts_per_s": p["n"] / (wall * mcalls), "num_keys": len(groups), **e}
            rows.append(row)
            log(f"  {p['name']} kdiff {row['method']:>20} tol={tol:g} nfe={row['nfe']} wall={row['wall_s']:.4f}s "
                f"mean|err|={e['mean_abs']:.2e} bias={e['bias']:+.2e}+-{e['bias_se']:.1e} std={e['std']:.2e}")
        eg = err_stats(lpg.reshape(-1), np.tile(p["ref"], lpg.shape[0]), d)
        gauss.append({"tol": tol, **eg})
    return rows, gauss, {k: peer[k] for k in ("torch", "dtype", "threads", "sigma_min", "sigma_max")}


def matched(rows):
    """For each k-diffusion row: the fastest diffjax row with mean|err| <= its mean|err|."""
    out = []
    dj = [r for r in rows if r["lib"] == "diffjax"]
    for r in rows:
        if r["lib"] != "k-diffusion":
            continue
        ok = [q for q in dj if q["mean_abs"] <= r["mean_abs"]]
        best = max(ok, key=lambda q: q["pts_per_s"]) if ok else None
        ok_same = [q for q in ok if q["method"].split(" ")[0] == "hutch-rad1"]
        best_same = max(ok_same, key=lambda q: q["pts_per_s"]) if ok_same else None
        out.append({"kdiff": f"{r['method']} tol={r['tol']:g}", "kdiff_mean_abs": r["mean_abs"],
                    "kdiff_pts_per_s": r["pts_per_s"],
                    "diffjax": None if best is None else f"{best['method']} tol={best['tol']:g}",
                    "diffjax_mean_abs": None if best is None else best["mean_abs"],
                    "diffjax_pts_per_s": None if best is None else best["pts_per_s"],
                    "speedup": None if best is None else best["pts_per_s"] / r["pts_per_s"],
                    "same_estimator": None if best_same is None else f"{best_same['method']} tol={best_same['tol']:g}",
                    "speedup_same_estimator": None if best_same is None else
                    best_same["pts_per_s"] / r["pts_per_s"]})
    return out


def to_markdown(results):
    lines = []
    for prob in results["problems"]:
        lines.append(f"### {prob['name']} (n = {prob['n']}, uptime: {prob['uptime']})\n")
        lines.append(f"Exact reference: float64; float32 g.log_prob_t differs by <= {prob['ref32_gap']:.1e} nats/dim. "
                     f"Gaussian prior N(0, sigma_T^2) instead of exact p_T (diffjax, exact trace, tol "
                     f"{prob['gauss_prior']['tol']:g}): bias {prob['gauss_prior']['bias']:+.2e} nats/dim.\n")
        lines.append("| lib | trace | tol | NFE | wall (s) | points/s | mean abs err | bias +- se | std | keys |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in prob["rows"]:
            nfe = str(r["nfe"]) if r["nfe_range"][0] == r["nfe_range"][1] else f"{r['nfe']} ({r['nfe_range'][0]}-{r['nfe_range'][1]})"
            lines.append(f"| {r['lib']} | {r['method']} | {r['tol']:g} | {nfe} | {r['wall_s']:.4f} | "
                         f"{r['pts_per_s']:.0f} | {r['mean_abs']:.2e} | {r['bias']:+.1e} +- {r['bias_se']:.0e} | "
                         f"{r['std']:.1e} | {r['num_keys']} |")
        if prob.get("kdiff_gauss_prior"):
            lines.append("\nk-diffusion with its own Gaussian prior: " + ", ".join(
                f"tol {q['tol']:g}: bias {q['bias']:+.2e}" for q in prob["kdiff_gauss_prior"]))
        if prob.get("matched"):
            lines.append("\nMatched accuracy (fastest diffjax setting with mean abs err <= k-diffusion's):\n")
            lines.append("| k-diffusion | its mean abs err | its points/s | diffjax | its mean abs err | its points/s | speedup | speedup, same estimator (hutch-rad1) |")
            lines.append("|---|---|---|---|---|---|---|---|")
            for q in prob["matched"]:
                f = lambda v, fmt: "-" if v is None else format(v, fmt)
                lines.append(f"| {q['kdiff']} | {q['kdiff_mean_abs']:.2e} | {q['kdiff_pts_per_s']:.0f} | "
                             f"{q['diffjax'] or '-'} | {f(q['diffjax_mean_abs'], '.2e')} | "
                             f"{f(q['diffjax_pts_per_s'], '.0f')} | {f(q['speedup'], '.1f')} | "
                             f"{f(q['speedup_same_estimator'], '.1f')} ({q['same_estimator'] or '-'}) |")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--kdiff-python", default="/work/venvs/kdiff/bin/python")
    ap.add_argument("--dims", type=int, nargs="*")
    ap.add_argument("--schedules", nargs="*", default=["vp", "ve"])
    args = ap.parse_args()
    tag = "quick" if args.quick else "full"
    if args.quick:
        dims, n, tols, probes_list, seeds, reps = [8], 64, [1e-3, 1e-5], [1], [0], 1
    else:
        dims, n, tols, probes_list, seeds, reps = [8, 32], 256, [1e-2, 3e-3, 1e-3, 1e-4, 1e-5, 1e-6], [1, 4], [0, 1, 2, 3], 7
    dims = args.dims or dims
    os.makedirs(RESULTS, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    t_start = time.time()
    results = {"mode": tag, "date": time.strftime("%Y-%m-%d %H:%M"), "platform": platform.platform(),
               "python": sys.version.split()[0], "jax": jax.__version__, "diffrax": __import__("diffrax").__version__,
               "devices": str(jax.devices()), "n": n, "tols": tols, "seeds": seeds, "reps": reps,
               "problems": []}
    for dim in dims:
        for sname in args.schedules:
            p = make_problem(sname, dim, n)
            up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
            up = up[up.find("load average"):]
            log(f"== {p['name']}  ({up})  ref32 gap {p['ref32_gap']:.1e} nats/dim")
            rows, gauss_prior = run_diffjax(p, tols, probes_list, seeds, reps, log)
            prob = {"name": p["name"], "n": n, "dim": dim, "t_eps": p["t_eps"], "uptime": up,
                    "ref32_gap": p["ref32_gap"], "gauss_prior": gauss_prior}
            if not args.no_peer:
                up2 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
                prob["uptime_peer"] = up2[up2.find("load average"):]
                prow, kgauss, info = run_peer(p, tols, seeds, reps, args.kdiff_python, tag, log)
                rows += prow
                prob["kdiff_gauss_prior"], prob["peer"] = kgauss, info
                prob["matched"] = matched(rows)
            prob["rows"] = rows
            results["problems"].append(prob)
    results["elapsed_s"] = time.time() - t_start
    with open(os.path.join(RESULTS, f"likelihood_{tag}.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = to_markdown(results)
    with open(os.path.join(RESULTS, f"likelihood_{tag}.md"), "w") as f:
        f.write(md)
    if tag == "full":
        write_section("likelihood", md, "python experiments/benchmarks/bench_likelihood.py")
    print(md)
    log(f"elapsed {results['elapsed_s']:.0f} s")


if __name__ == "__main__":
    from diffjax import xla_cpu

    xla_cpu.tune()  # XLA:CPU flags and glibc malloc options before JAX starts, as diffjax's CLIs do
    main()
