"""The digits main job (README command 1) under config variants: Fréchet distance, test bits/dim and wall time.

    python experiments/ablations/main_job_variants.py --root runs/main_variants \\
        --variant "default=" --variant "noattn_600=model.num_res_blocks=2+training.num_steps=600" --write-benchmarks

Each variant is ``NAME=field=value+field=value...`` (empty: the digits config as it is). Its run trains
``python -m diffjax.main --config experiments/configs/digits.py`` with those overrides into ``ROOT/NAME``
(skipped if that workdir already has a metrics.json), one run at a time under ``/tmp/cpu.lock``; the run's
own evaluation gives the test bits/dim, and its default sampler draws ``--sample-seeds`` x 1000 samples scored
in the digits evaluator (bench_dit's ``score_run``; floor 10.65 at n = 297, see "Quality per compute").
The table goes to BENCHMARKS.md's ``main-job-variants`` section.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repo root: `experiments.*` imports resolve when run as a script


def parse_variant(text: str):
    name, _, overrides = text.partition("=")
    if not name:
        raise SystemExit(f"--variant {text!r}: expected NAME=field=value+... (NAME non-empty)")
    return name, [o for o in overrides.split("+") if o]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="runs/main_variants")
    ap.add_argument("--variant", action="append", required=True, help="NAME=field=value+field=value (repeatable)")
    ap.add_argument("--sample-seeds", default="0,1,2")
    ap.add_argument("--write-benchmarks", action="store_true")
    args = ap.parse_args(argv)
    from diffjax import evaluators, xla_cpu
    from experiments.ablations.guidance_sweep import real_split
    from experiments.benchmarks.bench_dit import score_run
    from experiments.benchmarks.bench_quality import cpu_lock

    xla_cpu.tune()
    config = os.path.join(ROOT, "experiments", "configs", "digits.py")
    variants = [parse_variant(v) for v in args.variant]
    for name, overrides in variants:
        workdir = os.path.join(args.root, name)
        if os.path.exists(os.path.join(workdir, "metrics.json")):
            continue
        with cpu_lock():
            t0, load0 = time.perf_counter(), os.getloadavg()[0]
            subprocess.run([sys.executable, "-m", "diffjax.main", "--config", config, "--workdir", workdir,
                            "--noprogress", *[f"--config.{o}" for o in overrides]], check=True, cwd=ROOT)
            json.dump(dict(wall_s=time.perf_counter() - t0, loadavg=[load0, os.getloadavg()[0]]),
                      open(os.path.join(workdir, "wall.json"), "w"))
    ev = evaluators.digits_evaluator()
    ref = ev.features(real_split("train")[0])
    seeds = [int(s) for s in args.sample_seeds.split(",")]
    lines = ["| variant | overrides | params | steps | FD, mean [min, max] of draws | test bits/dim | train s "
             "(loop) | process wall s | load |", "|---|---|---|---|---|---|---|---|---|"]
    for name, overrides in variants:
        workdir = os.path.join(args.root, name)
        m = json.load(open(os.path.join(workdir, "metrics.json")))
        wall = json.load(open(os.path.join(workdir, "wall.json"))) if os.path.exists(
            os.path.join(workdir, "wall.json")) else dict(wall_s=float("nan"), loadavg=[float("nan")] * 2)
        with cpu_lock():
            r = score_run(workdir, seeds, 1000, ev, ref)
        lines.append(f"| {name} | {' '.join(overrides) or '(digits.py)'} | {m['num_params']:,} | {m['step']} | "
                     f"{r['fd']:.2f} [{r['fd_min']:.2f}, {r['fd_max']:.2f}] | {m['test_bpd']:.2f} +- "
                     f"{m['test_bpd_stderr']:.2f} | {m['loop_seconds']:.0f} | {wall['wall_s']:.0f} | "
                     f"{wall['loadavg'][0]:.1f}-{wall['loadavg'][1]:.1f} |")
        print(lines[-1], flush=True)
    table = (f"{len(seeds)} draws of 1000 samples per run with its default sampler; FD floor 10.65 (297 real test "
             "images). train s: the run's loop clock (compilation included); process wall s: the whole command "
             "(training, evaluation, sample grid).\n\n" + "\n".join(lines))
    print(table)
    if args.write_benchmarks:
        from experiments.benchmarks.benchlib import write_section

        write_section("main-job-variants", table, "python experiments/ablations/main_job_variants.py "
                      + " ".join(argv or sys.argv[1:]))


if __name__ == "__main__":
    main()
