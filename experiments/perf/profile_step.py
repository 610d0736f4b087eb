"""Where the U-Net's forward + backward spends its time on XLA:CPU: the traced thunks of one compiled program, by kind.

    python experiments/perf/profile_step.py                      # sizes A and B of bench_train.py, ~2 min
    python experiments/perf/profile_step.py --write-benchmarks   # also the "train-profile" block of BENCHMARKS.md

Runs ``bench_train.py``'s bare forward + backward (``jit(value_and_grad(loss))``, eps-MSE, dropout on)
under ``jax.profiler.trace`` with ``--xla_cpu_enable_xprof_traceme=true``, so that XLA:CPU's thunk
executor records one event per executed thunk (a fusion, a copy, a convolution, a while loop, ...).
Events are grouped by name without the ``.N`` suffix (``transpose_copy_fusion.17`` ->
``transpose_copy_fusion``) and summed over every XLA thread; reported per step, with the count.

How to read it: convolutions run asynchronously on the intra-op pool and their events cover the
hand-off only (~70 microseconds each, where one such convolution alone takes a millisecond or more:
BENCHMARKS.md, "XLA:CPU flags"), so their compute is in "wall - traced", not in their row; dots may
be partly so. The other rows are elementwise/reduction kernels and loops that ran inside their
events. The tracer itself slows the step (wall here ~1.2-1.3x the untraced bench_train figure).
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TRACE_FLAG).strip()  # before JAX starts

import jax  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repo root: `experiments.*` imports resolve when run as a script
from experiments.benchmarks.bench_train import JaxContenders, gemm_gflops, host_batches, step_gflop  # noqa: E402
from experiments.benchmarks.benchlib import parse_sizes, write_section  # noqa: E402

STEPS = {"A": 5, "B": 2}  # traced calls per size
# not thunks: the executor's own spans (they enclose the thunks), thread-pool bookkeeping, end markers
SKIP = ("ThunkExecutor", "ThreadpoolListener", "end: ")


def profile(size: str, top: int) -> dict:
    jc = JaxContenders(size, host_batches(size, 0), "eps")
    for _ in range(3):
        jc.run("jax_bare", 1)
    n = STEPS[size]
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            wall = jc.run("jax_bare", n)[0]
        data = jax.profiler.ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
    total, count = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):  # XLA's threads (Eigen pool, PjRt client), not Python
                continue
            for ev in line.events:
                if ev.name.startswith(SKIP):
                    continue
                kind = re.sub(r"\.\d+$", "", ev.name)
                total[kind] += ev.duration_ns / 1e6 / n
                count[kind] += 1 / n
    traced = sum(total.values())
    rows = [dict(kind=k, ms=v, count=count[k]) for k, v in total.most_common(top)]
    return dict(size=size, wall_ms=wall * 1e3, traced_ms=traced, rows=rows, thunks=sum(count.values()),
                gflop=step_gflop(jc), params=jc.n_params)


def render(results) -> str:
    lines = []
    for r in results:
        lines += [f"**{r['size']}** ({r['params']:,} params, {r['gflop']:.1f} GFLOP per fwd+bwd): wall "
                  f"{r['wall_ms']:.0f} ms/step under the tracer; traced thunks {r['traced_ms']:.0f} ms "
                  f"({r['thunks']:.0f} thunks per step); wall - traced {r['wall_ms'] - r['traced_ms']:.0f} ms "
                  "(convolution compute, executor hand-offs).", "",
                  "| thunk kind | ms/step | % of wall | per step |", "|---|---|---|---|"]
        for row in r["rows"]:
            lines.append(f"| `{row['kind']}` | {row['ms']:.2f} | {100 * row['ms'] / r['wall_ms']:.1f} | "
                         f"{row['count']:.0f} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="A,B")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--write-benchmarks", action="store_true")
    args = ap.parse_args()
    sizes = parse_sizes(ap, args.sizes, STEPS)
    if args.top < 1:
        ap.error(f"--top must be >= 1; got {args.top}")
    t0 = time.perf_counter()
    gemm = gemm_gflops()
    results = [profile(s, args.top) for s in sizes]
    gemm += gemm_gflops()
    text = (render(results) + f"\n\nHost speed during the run: best f32 GEMM rate {max(gemm):.0f} GFLOP/s (2048^3 matmul, "
            f"before and after; bench_train.py's runs on a quiet host: ~175). Load average after: "
            f"{os.getloadavg()[0]:.2f}; wall {time.perf_counter() - t0:.0f} s.")
    print(text)
    if args.write_benchmarks:
        write_section("train-profile", text, "python " + " ".join(sys.argv))


if __name__ == "__main__":
    from diffjax import xla_cpu

    xla_cpu.tune()  # XLA:CPU flags and glibc malloc options before JAX starts, as diffjax's CLIs do
    main()
