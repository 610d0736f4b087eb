"""Samplers x time grids x NFE on a trained digits run: Fréchet distance; a CSV, a plot and a table.

    python experiments/ablations/ablate_samplers.py --workdir /work/runs/teacher [--write-benchmarks]
    python experiments/ablations/ablate_samplers.py --render-only --write-benchmarks   # from the stored CSV

Score: the Fréchet distance between the digits evaluator's features (``diffjax.evaluators``) of
``--num-samples`` samples and of the train split, mean over the sampling seeds ``--draws`` (min-max beside
it); the same x_T draws for every cell (seed s: ``run.sample(key=PRNGKey(s))``), so cells are paired.
Floor: the same distance for the 297 real test images (finite-sample bias, no model error), as in
``experiments/benchmarks/bench_fewstep.py``.

NFE is matched, not steps: every sampler ends with one evaluation to sigma = 0 (a denoise, or the Euler
step of edm_heun / k-diffusion's ``sample_heun``), so ``steps`` grid intervals cost
``(steps - 1) * k + 1`` evaluations with k per step (1: ddim, euler, dpm_solver++_2m/3m, unipc; 2: heun,
edm_heun, dpm_solver_2; 3: dpm_solver_3). Each cell takes the most steps within its NFE target; the NFE
column is the count ``diffjax.sample`` reports. ``dpm_adaptive`` picks its own steps: one row per
``--adaptive-rtol``, its NFE the mean over draws. Cells are written to the CSV as they finish; a rerun skips
the cells already there (``--fresh`` starts over). ``ddim_*`` grids need a DiscreteDDPM schedule and are
skipped on a continuous one.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)  # the repo root: `experiments.*` imports resolve when run as a script
RESULTS = os.path.join(HERE, "results")
CSV_PATH = os.path.join(RESULTS, "ablate_samplers.csv")
PLOT_PATH = os.path.join(RESULTS, "ablate_samplers.png")
SECTION = "ablate-samplers"
SECTION_TITLE = "## Samplers x time grids on digits: Fréchet distance at NFE 5 / 10 / 20"

# method -> model evaluations per step (the final step to sigma = 0 is one evaluation for every method)
EVALS_PER_STEP = {"ddim": 1, "euler": 1, "dpm_solver++_2m": 1, "dpm_solver++_3m": 1, "unipc": 1,
                  "heun": 2, "edm_heun": 2, "dpm_solver_2": 2, "dpm_solver_3": 3}
GRIDS = ("logSNR", "karras", "time_uniform", "time_quadratic", "trailing", "ddim_trailing")
FIELDS = ("method", "grid", "options", "target_nfe", "steps", "nfe", "fd", "fd_min", "fd_max", "draws",
          "num_samples", "seconds")


def nfe_of(method: str, steps: int) -> int:
    """Model evaluations of ``steps`` grid intervals ending at sigma = 0: (steps - 1) k + 1."""
    return (steps - 1) * EVALS_PER_STEP[method] + 1


def steps_for(method: str, nfe: int) -> int:
    """The most grid intervals whose evaluations stay within ``nfe`` (at least 1)."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1; got {nfe}")
    return (nfe - 1) // EVALS_PER_STEP[method] + 1


def _csv_list(text, cast=str):
    return [cast(s.strip()) for s in text.split(",") if s.strip()]


def read_rows(path=CSV_PATH):
    if not os.path.exists(path):
        return []
    rows = list(csv.DictReader(open(path)))
    for r in rows:
        for k in ("target_nfe", "steps", "draws", "num_samples"):
            r[k] = int(r[k])
        for k in ("nfe", "fd", "fd_min", "fd_max", "seconds"):
            r[k] = float(r[k])
    return rows


def append_row(row, path=CSV_PATH):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: row[k] for k in FIELDS})


def cells(methods, grids, nfes, rtols, discrete):
    """(method, grid, options, target NFE, steps) in run order: grid by grid, dpm_adaptive after the second."""
    out, adaptive = [], [("dpm_adaptive", "adaptive", f"order=3,rtol={rtol},atol=0.0078", 0, 1) for rtol in rtols]
    for i, grid in enumerate(grids):
        if i == 2:
            out += adaptive
        if grid.startswith("ddim_") and not discrete:
            print(f"skip grid {grid}: needs a DiscreteDDPM schedule", flush=True)
            continue
        for nfe in nfes:
            for m in methods:
                out.append((m, grid, "", nfe, steps_for(m, nfe)))
    return out + (adaptive if len(grids) < 3 else [])


def _options(text):
    return {k: (int(v) if k == "order" else float(v)) for k, v in (kv.split("=") for kv in text.split(",") if kv)}


def run_cells(args):
    import jax

    from diffjax import evaluators, load_run, metrics
    from diffjax.schedules import DiscreteDDPM
    from experiments.ablations.guidance_sweep import real_split

    run = load_run(args.workdir)
    evaluator = evaluators.digits_evaluator()
    ref = evaluator.features(real_split("train")[0])
    floor = metrics.frechet_distance_from_features(evaluator.features(real_split("test")[0]), ref)
    print(f"floor (297 real test images vs train): {floor:.3f}", flush=True)
    done = {(r["method"], r["grid"], r["options"], r["target_nfe"]) for r in read_rows()}
    todo = cells(args.methods, args.grids, args.nfe, args.adaptive_rtol, isinstance(run.schedule, DiscreteDDPM))
    for method, grid, opts, target, steps in todo:
        if (method, grid, opts, target) in done:
            continue
        kwargs = _options(opts) if opts else {"grid": grid}
        t0 = time.perf_counter()
        fds, nfes = [], []
        for seed in args.draws:
            x, used = run.sample(args.num_samples, method=method, num_steps=steps, key=jax.random.PRNGKey(seed),
                                 batch_size=args.num_samples, return_nfe=True, **kwargs)
            if method != "dpm_adaptive" and used != nfe_of(method, steps):
                raise RuntimeError(f"{method}: {steps} steps made {used} evaluations, expected {nfe_of(method, steps)}")
            fds.append(metrics.frechet_distance_from_features(evaluator.features(x), ref))
            nfes.append(used)
        row = dict(method=method, grid=grid, options=opts, target_nfe=target, steps=steps,
                   nfe=float(np.mean(nfes)), fd=float(np.mean(fds)), fd_min=float(min(fds)), fd_max=float(max(fds)),
                   draws=len(fds), num_samples=args.num_samples, seconds=time.perf_counter() - t0)
        append_row(row)
        print(f"{method:>16} {grid:>14} {opts:>28} NFE {row['nfe']:5.1f}  FD {row['fd']:7.2f} "
              f"[{row['fd_min']:.2f}-{row['fd_max']:.2f}]  ({row['seconds']:.0f} s)", flush=True)
    return floor


def best_grids(rows):
    """{method: the grid with the least summed FD over the NFE targets it has every target of}."""
    fixed = [r for r in rows if r["method"] != "dpm_adaptive"]
    targets = sorted({r["target_nfe"] for r in fixed})
    out = {}
    for m in dict.fromkeys(r["method"] for r in fixed):
        score = {}
        for g in dict.fromkeys(r["grid"] for r in fixed if r["method"] == m):
            fd = {r["target_nfe"]: r["fd"] for r in fixed if r["method"] == m and r["grid"] == g}
            if set(fd) == set(targets):
                score[g] = sum(fd.values())
        if score:
            out[m] = min(score, key=score.get)
    return out


def plot(rows, floor, path=PLOT_PATH):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, g in best_grids(rows).items():
        rs = sorted((r for r in rows if r["method"] == m and r["grid"] == g), key=lambda r: r["nfe"])
        ax.errorbar([r["nfe"] for r in rs], [r["fd"] for r in rs],
                    yerr=[[r["fd"] - r["fd_min"] for r in rs], [r["fd_max"] - r["fd"] for r in rs]],
                    marker="o", capsize=2, label=f"{m} ({g})")
    ad = sorted((r for r in rows if r["method"] == "dpm_adaptive"), key=lambda r: r["nfe"])
    if ad:
        ax.plot([r["nfe"] for r in ad], [r["fd"] for r in ad], "k*--", ms=9, label="dpm_adaptive (rtol sweep)")
    ax.axhline(floor, color="gray", ls=":", label=f"floor (297 real test images): {floor:.2f}")
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="Fréchet distance (digits evaluator)",
           title="each sampler on its best grid")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(rows, floor, reading=""):
    fixed = [r for r in rows if r["method"] != "dpm_adaptive"]
    targets = sorted({r["target_nfe"] for r in fixed})
    n = sorted({r["num_samples"] for r in rows})
    d = sorted({r["draws"] for r in rows})
    best = {t: min((r for r in fixed if r["target_nfe"] == t), key=lambda r: r["fd"]) for t in targets}
    lines = [f"{'/'.join(map(str, n))} samples per draw, {'/'.join(map(str, d))} draw(s) per cell (the same x_T "
             "draws in every cell); Fréchet distance to the train split in the digits evaluator's features (lower "
             f"is better), mean over draws [min-max]. Floor (297 real test images vs train): {floor:.2f}. "
             f"Plot: `experiments/ablations/results/ablate_samplers.png`; CSV: "
             "`experiments/ablations/results/ablate_samplers.csv`. NFE: matched within each target "
             "((steps - 1) x evaluations per step + 1 for the final step to sigma = 0); the cell's actual NFE "
             "in brackets where it falls short of the target. **Bold**: the best cell per NFE.", ""]
    lines += ["| sampler | grid | " + " | ".join(f"NFE {t}" for t in targets) + " |",
              "|---|---|" + "---|" * len(targets)]
    for m in dict.fromkeys(r["method"] for r in fixed):
        for g in dict.fromkeys(r["grid"] for r in fixed if r["method"] == m):
            cellz = []
            for t in targets:
                r = next((r for r in fixed if r["method"] == m and r["grid"] == g and r["target_nfe"] == t), None)
                if r is None:
                    cellz.append("not run")
                    continue
                s = f"{r['fd']:.2f} [{r['fd_min']:.2f}-{r['fd_max']:.2f}]"
                s = f"**{s}**" if r is best[t] else s
                cellz.append(s + (f" ({int(r['nfe'])})" if int(r["nfe"]) != t else ""))
            lines.append(f"| {m} | {g} | " + " | ".join(cellz) + " |")
    ad = sorted((r for r in rows if r["method"] == "dpm_adaptive"), key=lambda r: r["nfe"])
    if ad:
        lines += ["", "Adaptive DPM-Solver-23 (`dpm_adaptive`, order 3, atol 0.0078 as k-diffusion's default):", "",
                  "| options | NFE (mean over draws) | FD |", "|---|---|---|"]
        lines += [f"| {r['options']} | {r['nfe']:.1f} | {r['fd']:.2f} [{r['fd_min']:.2f}-{r['fd_max']:.2f}] |"
                  for r in ad]
    lines += ["", "Best grid per sampler (least summed FD over the NFE targets): "
              + ", ".join(f"{m}: {g}" for m, g in best_grids(rows).items()) + "."]
    if reading:
        lines += ["", reading.strip()]
    return "\n".join(lines)


def ensure_section():
    """Append this script's heading and result markers to BENCHMARKS.md if it lacks them."""
    from experiments.benchmarks.benchlib import BENCHMARKS, markers

    begin, end = markers(SECTION)
    doc = open(BENCHMARKS).read()
    if begin not in doc:
        with open(BENCHMARKS, "a") as f:
            f.write(f"\n{SECTION_TITLE}\n\n```bash\npython experiments/ablations/ablate_samplers.py "
                    f"--workdir /work/runs/teacher --write-benchmarks\n```\n\n{begin}\n{end}\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="a trained digits run (checkpoints/), e.g. /work/runs/teacher")
    p.add_argument("--methods", default=",".join(EVALS_PER_STEP))
    p.add_argument("--grids", default=",".join(GRIDS))
    p.add_argument("--nfe", default="5,10,20")
    p.add_argument("--adaptive-rtol", default="0.2,0.1,0.05", help="dpm_adaptive rtols ('' for none)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--draws", default="0,1,2", help="sampling seeds (x_T and noise)")
    p.add_argument("--fresh", action="store_true", help="discard the stored CSV first")
    p.add_argument("--render-only", action="store_true", help="table and plot from the stored CSV")
    p.add_argument("--reading", help="a text file appended to the table (the run's reading)")
    p.add_argument("--write-benchmarks", action="store_true")
    args = p.parse_args(argv)
    args.methods = _csv_list(args.methods)
    unknown = set(args.methods) - set(EVALS_PER_STEP)
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)}; known: {list(EVALS_PER_STEP)}")
    args.grids = _csv_list(args.grids)
    args.nfe = _csv_list(args.nfe, int)
    if any(n < 1 for n in args.nfe):
        p.error(f"--nfe: every NFE must be >= 1; got {args.nfe}")
    args.adaptive_rtol = _csv_list(args.adaptive_rtol, float)
    args.draws = _csv_list(args.draws, int)
    if not args.draws or args.num_samples < 2:
        p.error("--draws needs a seed and --num-samples >= 2")
    os.makedirs(RESULTS, exist_ok=True)
    floor_path = os.path.join(RESULTS, "ablate_samplers_floor.txt")
    if args.render_only:
        floor = float(open(floor_path).read())
    else:
        if not args.workdir:
            p.error("--workdir is required unless --render-only")
        if args.fresh and os.path.exists(CSV_PATH):
            os.remove(CSV_PATH)
        floor = run_cells(args)
        open(floor_path, "w").write(f"{floor!r}\n")
    rows = read_rows()
    plot(rows, floor)
    table = render(rows, floor, open(args.reading).read() if args.reading else "")
    print(table)
    if args.write_benchmarks:
        from experiments.benchmarks.benchlib import write_section

        ensure_section()
        write_section(SECTION, table, "python experiments/ablations/ablate_samplers.py " + " ".join(argv or sys.argv[1:]))


if __name__ == "__main__":
    from diffjax import xla_cpu

    xla_cpu.tune()  # XLA:CPU flags and glibc malloc options before JAX starts, as diffjax's CLIs do
    main()
