"""Guidance on digits: conditional accuracy and Fréchet distance vs the guidance weight; CSV, plot, grids.

    python experiments/ablations/guidance_sweep.py --cond-workdir runs/digits_cond \\
        [--uncond-workdir runs/digits --classifier-workdir runs/digits_classifier] [--write-benchmarks]

For classifier-free guidance (the class-conditional run, weights w) and, if given, classifier
guidance (ADM-G: the unconditional run guided by the noise-conditional classifier, scales s), draw
``--per-class`` samples of each of the 10 classes with the run's sampler and score them with the
independent evaluator (``diffjax.evaluators.digits_evaluator``: trained on the train split only,
clean images, never seen by the guided models):

* ``accuracy``: fraction of samples the evaluator assigns to the class they were asked for;
* ``fd``: Fréchet distance of the samples' evaluator features to the train split's (all classes),
  ``fd_class``: the mean over classes of the per-class distance (samples of class k vs train
  images of class k). Floors (finite samples, no model error): the same distances between the
  test split and the train split; ``*_matched``: the model's distances with its samples
  subsampled to the test split's sizes, comparable with the floor.

Writes ``experiments/ablations/results/guidance_sweep.csv``, ``docs/guidance_tradeoff.png`` and a 10 x 10
grid per setting listed in ``--grids`` (``docs/guidance_grid_<kind><scale>.png``, row = class).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repo root: `experiments.*` imports resolve when run as a script
RESULTS = os.path.join(ROOT, "experiments", "ablations", "results")
DOCS = os.path.join(ROOT, "docs")


def class_stats(evaluator, images, labels, num_classes=10):
    """Evaluator features: (all features, {class: features})."""
    feats = evaluator.features(images)
    return feats, {k: feats[labels == k] for k in range(num_classes)}


def fd_scores(metrics, feats, per_class, ref_feats, ref_per_class, sizes=None):
    """(FD overall, mean per-class FD); ``sizes`` = (n, {class: n_k}) first subsamples the features to
    those counts, so that model and floor are compared at the same sample size (FD's finite-sample
    bias grows as the sample shrinks)."""
    if sizes is not None:
        n, n_class = sizes
        feats = feats[np.random.default_rng(0).permutation(len(feats))[:n]]
        per_class = {k: v[:n_class[k]] for k, v in per_class.items()}
    fd = metrics.frechet_distance_from_features(feats, ref_feats)
    fd_class = float(np.mean([metrics.frechet_distance_from_features(per_class[k], ref_per_class[k])
                              for k in per_class]))
    return fd, fd_class


def real_split(name):
    from diffjax import data as data_lib

    batches = list(data_lib.eval_batches("digits", split=name, batch_size=10_000))
    return np.concatenate([b["x"] for b in batches]), np.concatenate([b["label"] for b in batches])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cond-workdir", required=True, help="class-conditional run (experiments/configs/digits_cond.py)")
    p.add_argument("--uncond-workdir", help="unconditional run for classifier guidance (default digits run)")
    p.add_argument("--classifier-workdir", help="noise-conditional classifier run (digits_classifier.py)")
    p.add_argument("--w", default="0,0.5,1,2,3,5", help="classifier-free guidance weights")
    p.add_argument("--s", default="0,1,2,4,8", help="classifier guidance scales")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--grids", default="cfg0,cfg1,cfg3,cg0,cg4", help="settings to save as 10x10 grids")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-benchmarks", action="store_true")
    args = p.parse_args(argv)

    from diffjax import evaluators, metrics
    from diffjax.data import to_data_range
    from diffjax import load_run, runs
    from diffjax.training import plots

    evaluator = evaluators.digits_evaluator()
    train_x, train_y = real_split("train")
    test_x, test_y = real_split("test")
    ref_feats, ref_per_class = class_stats(evaluator, train_x, train_y)
    floor_feats, floor_per_class = class_stats(evaluator, test_x, test_y)
    floor = fd_scores(metrics, floor_feats, floor_per_class, ref_feats, ref_per_class)
    floor_acc = evaluator.accuracy(test_x, test_y)
    matched = (len(test_x), {k: len(v) for k, v in floor_per_class.items()})  # the floor's sample sizes
    labels = np.repeat(np.arange(10, dtype=np.int32), args.per_class)

    settings = [("cfg", float(w)) for w in args.w.split(",")]
    models = {"cfg": load_run(args.cond_workdir, task="diffusion")}
    if args.classifier_workdir:
        if not args.uncond_workdir:
            sys.exit("--classifier-workdir needs --uncond-workdir (the model it guides)")
        runs.check_same_schedule(runs.load_config(args.uncond_workdir), runs.load_config(args.classifier_workdir))
        models["cg"] = load_run(args.uncond_workdir, task="diffusion")
        classifier = load_run(args.classifier_workdir, task="classifier")
        settings += [("cg", float(s)) for s in args.s.split(",")]

    rows, grids = [], set(args.grids.split(","))
    os.makedirs(DOCS, exist_ok=True)
    for kind, scale in settings:
        run = models[kind]
        guide = dict(guidance_scale=scale) if kind == "cfg" else dict(classifier=classifier, classifier_scale=scale)
        t0 = time.perf_counter()
        x, nfe = run.sample(len(labels), labels=labels, method=run.config.sample.method,
                            num_steps=run.config.sample.num_steps, batch_size=500, key=jax.random.PRNGKey(args.seed),
                            return_nfe=True, **guide)
        secs = time.perf_counter() - t0
        feats, per_class = class_stats(evaluator, x, labels)
        fd, fd_class = fd_scores(metrics, feats, per_class, ref_feats, ref_per_class)
        fd_m, fd_class_m = fd_scores(metrics, feats, per_class, ref_feats, ref_per_class, matched)
        row = dict(guidance=kind, scale=scale, accuracy=evaluator.accuracy(x, labels), fd=fd, fd_class=fd_class,
                   fd_matched=fd_m, fd_class_matched=fd_class_m,
                   num_samples=len(labels), method=run.config.sample.method, nfe_per_sample=nfe,
                   sample_seconds=round(secs, 2))
        rows.append(row)
        print(row, flush=True)
        tag = f"{kind}{scale:g}"
        if tag in grids:
            pick = np.concatenate([np.flatnonzero(labels == k)[:10] for k in range(10)])
            grid = plots.image_grid(to_data_range(x[pick].astype(np.float32), 8), ncols=10)
            plots.save_png(grid, os.path.join(DOCS, f"guidance_grid_{tag}.png"),
                           scale=4)

    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "guidance_sweep.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, floor, floor_acc, os.path.join(DOCS, "guidance_tradeoff.png"))
    table = render(rows, floor, floor_acc, args.per_class)
    print(table)
    if args.write_benchmarks:
        from experiments.benchmarks.benchlib import write_section

        write_section("guidance", table, "python " + " ".join(["experiments/ablations/guidance_sweep.py", *(argv or sys.argv[1:])]))


def plot(rows, floor, floor_acc, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    names = {"cfg": "classifier-free (w)", "cg": "classifier guidance (s)"}
    for kind in dict.fromkeys(r["guidance"] for r in rows):
        rs = [r for r in rows if r["guidance"] == kind]
        sc = [r["scale"] for r in rs]
        axes[0].plot(sc, [r["accuracy"] for r in rs], "o-", label=names[kind])
        axes[1].plot(sc, [r["fd"] for r in rs], "o-", label=names[kind])
        axes[2].plot([r["fd_class"] for r in rs], [r["accuracy"] for r in rs], "o-", label=names[kind])
        for r in rs:
            axes[2].annotate(f"{r['scale']:g}", (r["fd_class"], r["accuracy"]), fontsize=7)
    axes[0].axhline(floor_acc, ls=":", c="gray", label="real test images")
    axes[1].axhline(floor[0], ls=":", c="gray", label="floor (test vs train)")
    axes[2].axvline(floor[1], ls=":", c="gray")
    axes[0].set(xlabel="guidance scale", ylabel="conditional accuracy")
    axes[1].set(xlabel="guidance scale", ylabel="Fréchet distance (all classes)")
    axes[2].set(xlabel="mean per-class Fréchet distance", ylabel="conditional accuracy", title="trade-off")
    for a in axes:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render(rows, floor, floor_acc, per_class):
    lines = [f"{per_class} samples per class ({10 * per_class} in all) per setting; evaluator features (64-d) of the "
             f"independent digits classifier; cfg = classifier-free guidance of the conditional model (weight w), "
             f"cg = classifier guidance of the unconditional model by the noise-conditional classifier (scale s). "
             f"Floors from real data, the 297 test images vs the train split (no model error, only "
             f"finite-sample bias): accuracy {floor_acc:.3f}, FD {floor[0]:.2f}, per-class FD {floor[1]:.2f}. "
             f"FD shrinks as the sample grows, so the columns 'at test n' subsample the model's samples to the "
             f"test split's sizes (297 overall, its count per class) and compare with the floor like for like.", "",
             "| guidance | scale | accuracy | FD (all) | per-class FD | FD at test n | per-class FD at test n "
             "| sampler | NFE/sample | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['guidance']} | {r['scale']:g} | {r['accuracy']:.3f} | {r['fd']:.2f} | {r['fd_class']:.2f} "
                     f"| {r['fd_matched']:.2f} | {r['fd_class_matched']:.2f} "
                     f"| {r['method']} | {r['nfe_per_sample']} | {r['sample_seconds']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    from diffjax import xla_cpu

    xla_cpu.tune()  # XLA:CPU flags and glibc malloc options before JAX starts, as diffjax's CLIs do
    main()
