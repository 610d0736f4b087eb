"""Few-step generation on digits: Fréchet distance against NFE for the teacher and every few-step method.

    python experiments/benchmarks/bench_fewstep.py --root runs/fewstep --train [--write-benchmarks]

Runs, each the main job (``python -m diffjax.main``) with its digits config, trained one at a time with
``--train`` (runs already complete under ``--root`` are reused):

* ``teacher``: ``experiments/configs/digits.py`` (the default main job), sampled at 1, 2, 4, 8, 20 and 50 NFE
  by each of ``--teacher-samplers``; its best sampler per NFE is the reference;
* ``pd``: progressive distillation (``digits_pd.py``), the students of the stages at 8, 4, 2 and 1 steps
  (stage-end checkpoints);
* ``cd`` / ``ct``: consistency distillation / training (``digits_cd.py`` / ``digits_ct.py``) at 1 and 2 steps;
* ``rf1``: 1-rectified flow (flow matching, ``digits_flow.py``) and ``rf2``: 2-rectified flow on rf1's
  couplings (``digits_reflow.py``), at 1, 2 and 4 Euler steps.

Score: the Fréchet distance between the independent digits evaluator's features (``diffjax.evaluators``) of
``--num-samples`` samples and of the train split, the mean over ``--sample-seeds`` draws (min-max beside it).
Floor: the same distance for the 297 real test images (finite-sample bias alone). Compute: each run's wall time
from the main job's ``metrics.json`` (``total_seconds``: compilation, training, coupling generation and the
end-of-run evaluation), plus its teacher's for a student.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)  # the repo root: `experiments.*` imports resolve when run as a script
RESULTS = os.path.join(HERE, "results")
CONFIGS = os.path.join(ROOT, "experiments", "configs")

# name -> (config file, teacher run or None)
RUNS = {
    "teacher": ("digits.py", None),
    "pd": ("digits_pd.py", "teacher"),
    "cd": ("digits_cd.py", "teacher"),
    "ct": ("digits_ct.py", None),
    "rf1": ("digits_flow.py", None),
    "rf2": ("digits_reflow.py", "rf1"),
}
# BENCHMARKS.md's figures were measured with digits.py's U-Net, step count and EMA before 2026-12-07; the
# students are the teacher's network (ct and the flows pin the same in their configs)
PINNED = ("--config.model.num_res_blocks=2", "--config.model.attn_resolutions=(4,)", "--config.optim.ema_warmup=False")
RUN_FLAGS = {"teacher": PINNED + ("--config.training.num_steps=600",), "pd": PINNED, "cd": PINNED}
TEACHER_NFE = (1, 2, 4, 8, 20, 50)
# the few-step methods the 1-2 NFE target is about; 1-rectified flow is plain flow matching, the base model that
# reflow straightens (shown for comparison, like the teacher)
FEW_STEP = ("progressive distillation", "consistency distillation", "consistency training", "2-rectified flow")
# (label, method, options) tried for the teacher at each NFE
TEACHER_SAMPLERS = {
    "ddim-trailing": ("ddim", {"grid": "trailing"}),
    "dpm++2m-logSNR": ("dpm_solver++_2m", {"grid": "logSNR"}),
    "dpm++2m-trailing": ("dpm_solver++_2m", {"grid": "trailing"}),
    "dpm++2m-uniform": ("dpm_solver++_2m", {"grid": "time_uniform"}),  # the digits config's own
}


def train_run(root, name, extra_flags=()):
    """Train ``name`` into ``root/name`` unless its metrics.json exists; returns the metrics."""
    workdir = os.path.join(root, name)
    metrics_path = os.path.join(workdir, "metrics.json")
    if not os.path.exists(metrics_path):
        config, teacher = RUNS[name]
        cmd = [sys.executable, "-m", "diffjax.main", "--config", os.path.join(CONFIGS, config), "--workdir", workdir,
               "--noprogress", *RUN_FLAGS.get(name, ()), *extra_flags]
        if teacher is not None:
            cmd.append(f"--config.distill.teacher_workdir={os.path.join(root, teacher)}")
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return json.load(open(metrics_path))


def _draws(run, n, seeds, **kwargs):
    samples, nfe = [], None
    for seed in seeds:
        x, nfe = run.sample(n, key=jax.random.PRNGKey(seed), return_nfe=True, **kwargs)
        samples.append(x)
    return samples, nfe


def _score(evaluator, ref, samples):
    from diffjax import metrics

    fds = [metrics.frechet_distance_from_features(evaluator.features(x), ref) for x in samples]
    return dict(fd=float(np.mean(fds)), fd_min=float(min(fds)), fd_max=float(max(fds)))


def stage_students(workdir):
    """{student steps: checkpoint step} of a progressive-distillation run's kept checkpoints (each stage's last)."""
    from diffjax import load_run
    from diffjax.training.checkpoint import Checkpointer

    out = {}
    for step in Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).all_steps():
        run = load_run(workdir, step=step)
        out.setdefault(run.default_num_steps, step)
        out[run.default_num_steps] = max(out[run.default_num_steps], step)
    return out


def evaluate(root, args, evaluator, ref, compute):
    from diffjax import load_run

    seeds = [int(s) for s in args.sample_seeds.split(",")]
    n = args.num_samples
    rows = []

    def add(method, steps, label, scores, nfe, run_name):
        row = dict(method=method, steps=steps, sampler=label, nfe=nfe, compute_s=compute[run_name], **scores)
        rows.append(row)
        print(json.dumps(row), flush=True)

    if "teacher" in args.runs:
        teacher = load_run(os.path.join(root, "teacher"))
        for nfe in TEACHER_NFE:
            for label, (method, options) in TEACHER_SAMPLERS.items():
                samples, used = _draws(teacher, n, seeds, method=method, num_steps=nfe, **options)
                if used != nfe:
                    continue
                add("teacher", nfe, label, _score(evaluator, ref, samples), used, "teacher")
    if "pd" in args.runs:
        for steps, ckpt in sorted(stage_students(os.path.join(root, "pd")).items(), reverse=True):
            if steps in (8, 4, 2, 1):
                run = load_run(os.path.join(root, "pd"), step=ckpt)
                samples, used = _draws(run, n, seeds)
                add("progressive distillation", steps, f"{run.config.sample.method} (step {ckpt})",
                    _score(evaluator, ref, samples), used, "pd")
    for name, label in (("cd", "consistency distillation"), ("ct", "consistency training")):
        if name in args.runs:
            run = load_run(os.path.join(root, name))
            for steps in (1, 2):
                samples, used = _draws(run, n, seeds, num_steps=steps)
                add(label, steps, run.config.sample.method, _score(evaluator, ref, samples), used, name)
    for name, label in (("rf1", "1-rectified flow"), ("rf2", "2-rectified flow")):
        if name in args.runs:
            run = load_run(os.path.join(root, name))
            for steps in (1, 2, 4):
                samples, used = _draws(run, n, seeds, method="euler", num_steps=steps, grid="trailing")
                add(label, steps, "euler", _score(evaluator, ref, samples), used, name)
    return rows


def best_teacher(rows):
    """{nfe: the teacher row with the lowest FD at that NFE}."""
    best = {}
    for r in rows:
        if r["method"] == "teacher" and (r["nfe"] not in best or r["fd"] < best[r["nfe"]]["fd"]):
            best[r["nfe"]] = r
    return best


def verdicts(rows):
    """The issue's targets, each as (statement, measured, met)."""
    best = best_teacher(rows)
    out = []

    def get(method, steps):
        return next((r for r in rows if r["method"] == method and r["steps"] == steps), None)

    pd4 = get("progressive distillation", 4)
    if pd4 and 50 in best:
        ratio = pd4["fd"] / best[50]["fd"]
        out.append(("4-step progressive-distillation student within 1.25x the teacher's 50-NFE FD",
                    f"{pd4['fd']:.2f} / {best[50]['fd']:.2f} = {ratio:.2f}x", ratio <= 1.25))
    for nfe in (1, 2):
        if nfe not in best:
            continue
        for r in rows:
            if r["method"] in FEW_STEP and r["nfe"] == nfe:
                out.append((f"{r['method']} beats the teacher's best sampler at {nfe} NFE",
                            f"{r['fd']:.2f} vs {best[nfe]['fd']:.2f} ({best[nfe]['sampler']})",
                            r["fd"] < best[nfe]["fd"]))
    rf1, rf2 = get("1-rectified flow", 1), get("2-rectified flow", 1)
    if rf1 and rf2:
        out.append(("2-rectified flow beats 1-rectified flow at 1 Euler step", f"{rf2['fd']:.2f} vs {rf1['fd']:.2f}",
                    rf2["fd"] < rf1["fd"]))
    return out


def plot(rows, floor, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    best = best_teacher(rows)
    nfes = sorted(best)
    ax.plot(nfes, [best[k]["fd"] for k in nfes], "k-o", label="teacher (best sampler per NFE)")
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "teacher"):
        pts = sorted((r["nfe"], r["fd"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=method)
    ax.axhline(floor, color="gray", ls=":", label=f"floor (297 real test images): {floor:.2f}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel("Fréchet distance (digits evaluator)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def render(rows, floor, runs_info, args, plot_path):
    lines = [f"{args.num_samples} samples per cell; Fréchet distance to the train split in the independent digits "
             f"evaluator's 64-d features (lower is better), mean over sampling seeds {args.sample_seeds} (min-max in "
             f"brackets). Floor (297 real test images vs train: finite-sample bias, no model error): {floor:.2f}. "
             f"Plot: `{os.path.relpath(plot_path, ROOT)}`.", "",
             "| method | steps | sampler | NFE | FD | compute (this run; + teacher) |", "|---|---|---|---|---|---|"]
    for r in rows:
        extra = ""
        teacher = RUNS[_run_of(r["method"])][1]
        if teacher is not None and teacher in runs_info:
            extra = f" + {runs_info[teacher]['total_seconds']:.0f} s"
        lines.append(f"| {r['method']} | {r['steps']} | {r['sampler']} | {r['nfe']} | {r['fd']:.2f} "
                     f"[{r['fd_min']:.2f}, {r['fd_max']:.2f}] | {r['compute_s']:.0f} s{extra} |")
    lines += ["", "Runs (the main job's metrics.json; wall seconds on this machine):", "",
              "| run | config | steps | train s | total s |", "|---|---|---|---|---|"]
    for name, m in runs_info.items():
        lines.append(f"| {name} | {RUNS[name][0]} | {m.get('step')} | {m.get('train_seconds', float('nan')):.0f} "
                     f"| {m.get('total_seconds', float('nan')):.0f} |")
    lines += ["", "Targets:", ""]
    lines += [f"- {'met' if ok else 'MISSED'}: {what}: {measured}" for what, measured, ok in verdicts(rows)]
    return "\n".join(lines)


def _run_of(method):
    return {"teacher": "teacher", "progressive distillation": "pd", "consistency distillation": "cd",
            "consistency training": "ct", "1-rectified flow": "rf1", "2-rectified flow": "rf2"}[method]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/fewstep", help="one workdir per run under this directory")
    p.add_argument("--runs", default=",".join(RUNS), help=f"which of {','.join(RUNS)}")
    p.add_argument("--train", action="store_true", help="train the runs that have no metrics.json yet")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--sample-seeds", default="0,1,2")
    p.add_argument("--write-benchmarks", action="store_true")
    p.add_argument("--render-only", action="store_true",
                   help="re-render the table, plot and targets from results/bench_fewstep.json (no sampling)")
    args = p.parse_args(argv)
    if args.render_only:
        saved = json.load(open(os.path.join(RESULTS, "bench_fewstep.json")))
        return _report(saved["rows"], saved["floor"], saved["runs"], args, argv)
    args.runs = [r for r in args.runs.split(",") if r]
    unknown = set(args.runs) - set(RUNS)
    if unknown:
        p.error(f"--runs: unknown {sorted(unknown)}; known: {list(RUNS)}")
    root = os.path.abspath(args.root)

    runs_info = {}
    for name in RUNS:
        needed = name in args.runs or any(RUNS[r][1] == name for r in args.runs)
        if not needed:
            continue
        path = os.path.join(root, name, "metrics.json")
        if args.train:
            runs_info[name] = train_run(root, name)
        elif os.path.exists(path):
            runs_info[name] = json.load(open(path))
        else:
            p.error(f"{path} not found: train it first (--train)")
    compute = {name: m.get("total_seconds", float("nan")) for name, m in runs_info.items()}

    from diffjax import evaluators, metrics
    from experiments.ablations.guidance_sweep import real_split

    evaluator = evaluators.digits_evaluator()
    ref = evaluator.features(real_split("train")[0])
    floor = metrics.frechet_distance_from_features(evaluator.features(real_split("test")[0]), ref)
    rows = evaluate(root, args, evaluator, ref, compute)
    os.makedirs(RESULTS, exist_ok=True)
    runs_info = {k: v for k, v in runs_info.items() if k in args.runs or k == "teacher"}
    json.dump(dict(rows=rows, floor=floor, runs=runs_info), open(os.path.join(RESULTS, "bench_fewstep.json"), "w"),
              indent=2)
    _report(rows, floor, runs_info, args, argv)


def _report(rows, floor, runs_info, args, argv):
    plot_path = os.path.join(RESULTS, "bench_fewstep.png")
    plot(rows, floor, plot_path)
    table = render(rows, floor, runs_info, args, plot_path)
    print(table)
    if args.write_benchmarks:
        from experiments.benchmarks.benchlib import write_section

        write_section("fewstep", table, "python experiments/benchmarks/bench_fewstep.py " + " ".join(argv or sys.argv[1:]))


if __name__ == "__main__":
    from diffjax import xla_cpu

    xla_cpu.tune()
    main()
