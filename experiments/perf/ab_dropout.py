"""Paired A/B: the U-Net's forward + backward with Flax's dropout mask (``jax.random.bernoulli``) vs diffjax's CPU kernel.

    python experiments/perf/ab_dropout.py                      # sizes A and B of bench_train.py, ~6 min
    python experiments/perf/ab_dropout.py --write-benchmarks   # also the "dropout-ab" block of BENCHMARKS.md

Both draw the same masks bit for bit (tests/test_models.py); they differ only in how the threefry
rounds are lowered: JAX's primitive as a rolled while loop on CPU (``diffjax.models.ops.dropout``, the
default path), diffjax's written out (``diffjax.models.cpu_kernels.dropout``). One process builds
``bench_train.py``'s bare forward + backward (``jit(value_and_grad(loss))``, eps-MSE, dropout 0.1,
``kernels="cpu"``) twice, once per mask function, and times them
interleaved (order alternating per repeat), so that host-speed drift between runs (which moves
bench_train's absolute figures by 10-20% here) cancels in the per-repeat ratio. Run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repo root: `experiments.*` imports resolve when run as a script
from diffjax.models import cpu_kernels, ops  # noqa: E402
from experiments.benchmarks.bench_train import SIZES, STEPS, JaxContenders, host_batches  # noqa: E402
from experiments.benchmarks.benchlib import parse_sizes, write_section  # noqa: E402

VARIANTS = {"flax.linen.Dropout": ops.dropout, "diffjax Dropout": cpu_kernels.dropout}


def build(size: str):
    """One warmed bare fwd+bwd per mask function; ``cpu_kernels.dropout`` is looked up when the step is traced."""
    out = {}
    host = host_batches(size, 0)
    try:
        for name, fn in VARIANTS.items():
            cpu_kernels.dropout = fn
            jx = JaxContenders(size, host, "eps", kernels="cpu")
            jx.run("jax_bare", 1)  # compile
            jx.run("jax_bare", 1)
            out[name] = jx
    finally:
        cpu_kernels.dropout = VARIANTS["diffjax Dropout"]
    return out


def ab(size: str, repeats: int, log) -> dict:
    steps = STEPS[size][1]
    contenders = build(size)
    names = list(contenders)
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            wall, _ = contenders[n].run("jax_bare", steps)
            times[n].append(wall)
        log(f"[{size}] repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.1f}" for n in names)
            + " ms/step")
    ratio = [a / b for a, b in zip(*(times[n] for n in names))]
    return dict(size=size, steps=steps, repeats=repeats, times=times, ratio=ratio)


def fmt(results) -> str:
    a, b = VARIANTS
    rows = ["| size | steps x repeats | " + f"{a} ms/step (median) | {b} ms/step (median) | "
            "paired ratio (median) | paired ratio min-max | repeats where diffjax is faster |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        t, q = r["times"], r["ratio"]
        rows.append(f"| {r['size']} ({SIZES[r['size']]['label']}) | {r['steps']} x {r['repeats']} | "
                    f"{statistics.median(t[a]) * 1e3:.1f} | {statistics.median(t[b]) * 1e3:.1f} | "
                    f"**{statistics.median(q):.3f}** | {min(q):.3f}-{max(q):.3f} | "
                    f"{sum(x > 1 for x in q)}/{len(q)} |")
    return ("Bare forward + backward (`jit(value_and_grad(loss))`, eps-MSE, dropout 0.1) of bench_train.py's "
            "sizes; ratio = Flax's time / diffjax's in the same repeat (> 1: diffjax's Dropout is faster).\n\n"
            + "\n".join(rows) + f"\n\nLoad average after: {os.getloadavg()[0]:.2f}.")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="A,B")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--write-benchmarks", action="store_true")
    args = ap.parse_args()
    sizes = parse_sizes(ap, args.sizes, SIZES)
    if args.repeats < 2:
        ap.error("--repeats must be >= 2")
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:7.0f}s] {msg}", flush=True)

    log(f"jax {jax.__version__}, devices {jax.devices()}")
    text = fmt([ab(s, args.repeats, log) for s in sizes])
    print(text)
    if args.write_benchmarks:
        write_section("dropout-ab", text, "python " + " ".join(sys.argv))


if __name__ == "__main__":
    from diffjax import xla_cpu

    xla_cpu.tune()  # XLA:CPU flags and glibc malloc options before JAX starts, as diffjax's CLIs do
    main()
