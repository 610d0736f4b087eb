"""What diffjax's malloc options (``diffjax.xla_cpu.MALLOC_OPTIONS``) buy in the U-Net train step.

    python experiments/perf/malloc_tune.py                      # sizes A and B of bench_train.py, ~20 min
    python experiments/perf/malloc_tune.py --write-benchmarks   # also the "malloc-tune" block of BENCHMARKS.md

XLA:CPU allocates one temporary buffer per execution for all intermediates of a compiled program;
with glibc's defaults a block that large is a fresh mmap, unmapped on free, so every step
page-faults it back in. ``diffjax.xla_cpu.tune()`` sets glibc options (one arena, no mmap, 1 GiB trim
threshold; ``diffjax/xla_cpu.py``) so the buffer is reused. Each setting runs in its own process,
the settings alternating over ``--rounds`` rounds so that host-speed drift hits both alike:
  on   the default: diffjax's options set by ``tune()``;
  off  ``DIFFJAX_MALLOC_TUNE=0``: glibc as it comes (an arena per thread, mmap above its threshold).
Per process and size: ``bench_train.py``'s train step and bare forward + backward, median of
``--repeats`` blocks of back-to-back steps after warm-up; minor page faults and kernel CPU time
per step from ``getrusage``; the process's peak resident memory at the end.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repo root: `experiments.*` imports resolve when run as a script
REPLY = "@@malloc "
CONTENDERS = {"jax_step": "train step", "jax_bare": "bare fwd+bwd"}


def child(size: str, repeats: int) -> dict:
    from diffjax import xla_cpu

    xla_cpu.tune()  # sets, or with DIFFJAX_MALLOC_TUNE=0 skips, the options (and the XLA:CPU flags in both)
    from experiments.benchmarks.bench_train import STEPS, JaxContenders, host_batches

    jc = JaxContenders(size, host_batches(size, 0), "eps")
    steps = STEPS[size][1]
    out = {"malloc": xla_cpu.status()["malloc"], "n_params": jc.n_params}
    for what in CONTENDERS:
        jc.run(what, 3)
        ms, faults, sys_ms = [], [], []
        for _ in range(repeats):
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            ms.append(jc.run(what, steps)[0] * 1e3)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            faults.append((r1.ru_minflt - r0.ru_minflt) / steps)
            sys_ms.append((r1.ru_stime - r0.ru_stime) / steps * 1e3)
        out[what] = dict(ms=statistics.median(ms), faults=statistics.median(faults), sys_ms=statistics.median(sys_ms),
                         steps=steps)
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_child(setting: str, size: str, repeats: int) -> dict:
    env = dict(os.environ)
    env.pop("DIFFJAX_MALLOC_TUNE", None)
    if setting == "off":
        env["DIFFJAX_MALLOC_TUNE"] = "0"
    p = subprocess.run([sys.executable, __file__, "--child", size, "--repeats", str(repeats)], env=env,
                       capture_output=True, text=True, check=False)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith(REPLY)]
    if p.returncode or not line:
        raise SystemExit(f"child ({setting}, {size}) failed:\n{p.stderr[-3000:]}")
    res = json.loads(line[-1][len(REPLY):])
    if bool(res["malloc"]) != (setting == "on"):
        raise SystemExit(f"child ({setting}) ran with malloc options {res['malloc']}: the setting did not take")
    return res


def render(runs: dict, sizes: list, rounds: int) -> str:
    med = statistics.median
    lines = [f"Median over {rounds} process(es) per setting (alternating), each the median of its repeats; "
             "off = `DIFFJAX_MALLOC_TUNE=0`.", "",
             "| size | contender | faults/step off / on | kernel CPU ms/step off / on | ms/step off / on | speed-up off/on "
             "(per-round min-max) | peak RSS MB off / on |", "|---|---|---|---|---|---|---|"]
    for s in sizes:
        off, on = runs[s]["off"], runs[s]["on"]
        for what, label in CONTENDERS.items():
            get = {k: [med(r[what][k] for r in rs) for rs in (off, on)] for k in ("faults", "sys_ms", "ms")}
            per = [a[what]["ms"] / b[what]["ms"] for a, b in zip(off, on)]
            rss = [med(r["maxrss_mb"] for r in rs) for rs in (off, on)]
            lines.append(f"| {s} | {label} | {get['faults'][0]:,.0f} / {get['faults'][1]:,.0f} | "
                         f"{get['sys_ms'][0]:.0f} / {get['sys_ms'][1]:.0f} | {get['ms'][0]:.1f} / {get['ms'][1]:.1f} | "
                         f"**{get['ms'][0] / get['ms'][1]:.3f}x** ({min(per):.3f}-{max(per):.3f}) | "
                         f"{rss[0]:.0f} / {rss[1]:.0f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="A,B")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--write-benchmarks", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(REPLY + json.dumps(child(args.child, args.repeats)), flush=True)
        return
    from experiments.benchmarks.bench_train import STEPS, cpu_name
    from experiments.benchmarks.benchlib import parse_sizes, write_section

    sizes = parse_sizes(ap, args.sizes, STEPS)
    for name in ("rounds", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    t0 = time.time()
    runs = {s: {"off": [], "on": []} for s in sizes}
    for r in range(args.rounds):
        for s in sizes:
            for setting in ("off", "on") if r % 2 == 0 else ("on", "off"):
                res = run_child(setting, s, args.repeats)
                runs[s][setting].append(res)
                print(f"[{time.time() - t0:5.0f}s] round {r + 1}/{args.rounds} {s} {setting}: step "
                      f"{res['jax_step']['ms']:.1f} ms ({res['jax_step']['faults']:,.0f} faults), bare "
                      f"{res['jax_bare']['ms']:.1f} ms", flush=True)
    text = (render(runs, sizes, args.rounds) + f"\n\nMachine: {cpu_name()}, {os.cpu_count()} cores; load average after "
            f"{os.getloadavg()[0]:.2f}; wall {(time.time() - t0) / 60:.1f} min.")
    print(text)
    if args.write_benchmarks:
        write_section("malloc-tune", text, "python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
