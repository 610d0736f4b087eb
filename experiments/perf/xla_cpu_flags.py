"""What diffjax's XLA:CPU flags (``diffjax/xla_cpu.py``) buy: the same programs with and without them.

Each setting runs in its own process (XLA reads its flags once, at backend start):
  off  DIFFJAX_XLA_CPU_FLAGS=0: jaxlib's defaults (convolutions as YNNPACK fusions on jaxlib 0.10)
  on   the default: ``diffjax.xla_cpu.CPU_FLAGS`` appended to XLA_FLAGS by ``tune()``
and times, in that process:
  * one 3x3 SAME convolution (NHWC, f32) at the shapes of the benchmark U-Nets: forward,
    weight gradient alone, forward + both gradients (jit of grad of sum(conv * g));
  * the bare U-Net forward + backward of ``experiments/benchmarks/bench_train.py`` (its ``jax_bare``) at sizes A and B;
and checks the compiled HLO for YNNPACK fusions (``__ynn_fusion``) so the table says which path ran.
Timing: median of R repeats of back-to-back calls after two warm-up calls. The settings alternate
(off, on, off, on, ...) over ``--rounds`` rounds so load drift hits both alike.

Commands:
  python experiments/perf/xla_cpu_flags.py            # ~6 min; "xla-cpu-flags" section of BENCHMARKS.md
  python experiments/perf/xla_cpu_flags.py --quick    # ~3 min; results/xla_cpu_flags_quick.json only
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repo root: `experiments.*` imports resolve when run as a script
RESULTS = os.path.join(HERE, "results")
REPLY = "@@result "
# (batch, height, width, in channels, out channels): the 3x3 convolutions of bench_train's sizes
CONV_SHAPES = [(32, 32, 32, 64, 64), (32, 32, 32, 32, 32), (32, 16, 16, 64, 64), (128, 8, 8, 32, 32),
               (128, 4, 4, 64, 64)]


def child(repeats: int, sizes: list) -> dict:
    from diffjax import xla_cpu

    xla_cpu.tune()  # applies, or with DIFFJAX_XLA_CPU_FLAGS=0 skips, the flags (and the malloc options in both)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    def timed(f, *args, n):
        jax.block_until_ready(f(*args))
        jax.block_until_ready(f(*args))
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(n):
                r = f(*args)
            jax.block_until_ready(r)
            out.append((time.perf_counter() - t0) / n * 1e3)
        return statistics.median(out)

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    res = {"status": xla_cpu.status(), "conv": [], "unet": {}}
    ynn = False
    for shape in CONV_SHAPES:
        n, h, w_, c, d = shape
        k = jax.random.split(jax.random.PRNGKey(0), 3)
        x = jax.random.normal(k[0], (n, h, w_, c))
        w = 0.1 * jax.random.normal(k[1], (3, 3, c, d))
        g = jax.random.normal(k[2], (n, h, w_, d))
        fwd = jax.jit(conv)
        wgrad = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
        both = jax.jit(jax.grad(lambda x, w, g: jnp.sum(conv(x, w) * g), argnums=(0, 1)))
        ynn |= "__ynn_fusion" in both.lower(x, w, g).compile().as_text()
        reps = max(1, int(2e8 / (n * h * w_ * c * d * 9)))  # ~0.2 GFLOP of forward per timed block
        res["conv"].append(dict(shape=shape, fwd_ms=timed(fwd, x, w, n=reps), wgrad_ms=timed(wgrad, x, w, g, n=reps),
                                fwd_bwd_ms=timed(both, x, w, g, n=reps), gflop_fwd=2 * n * h * w_ * c * d * 9 / 1e9))
    from experiments.benchmarks.bench_train import JaxContenders, host_batches

    for size in sizes:
        jc = JaxContenders(size, host_batches(size, 0), "eps")
        jc.run("jax_bare", 1)
        jc.run("jax_bare", 1)
        steps = 5 if size == "A" else 2
        ms = statistics.median(jc.run("jax_bare", steps)[0] * 1e3 for _ in range(repeats))
        text = jc.bare_fn.lower(jc.params, jc._batch(), jc.bare_key, 0).compile().as_text()
        res["unet"][size] = dict(bare_ms=ms, ynn_fusions=text.count("__ynn_fusion"), params=jc.n_params)
    res["ynn_in_conv"] = ynn
    return res


def run_child(setting: str, repeats: int, sizes: list) -> dict:
    from diffjax.xla_cpu import CPU_FLAGS, OPT_OUT

    env = dict(os.environ)
    env.pop(OPT_OUT, None)
    # neither setting inherits the flags: "on" gets them from importing diffjax, "off" not at all
    keep = [t for t in env.get("XLA_FLAGS", "").split() if t.split("=", 1)[0] not in CPU_FLAGS]
    env["XLA_FLAGS"] = " ".join(keep)
    if setting == "off":
        env[OPT_OUT] = "0"
    out = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(repeats), "--sizes", ",".join(sizes)],
                         env=env, capture_output=True, text=True, check=False)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith(REPLY)]
    if out.returncode or not line:
        raise SystemExit(f"child ({setting}) failed:\n{out.stderr[-3000:]}")
    return json.loads(line[-1][len(REPLY):])


def render(runs: dict, sizes: list) -> str:
    def med(setting, get):
        return statistics.median(get(r) for r in runs[setting])

    on, off = runs["on"][0], runs["off"][0]
    lines = [f"Flags added by diffjax: `{on['status']['added_by_diffjax']}` (jaxlib {on['status']['jaxlib']}); "
             f"'off' = `DIFFJAX_XLA_CPU_FLAGS=0`. YNNPACK fusions in the compiled conv program: off "
             f"{off['ynn_in_conv']}, on {on['ynn_in_conv']}. Median over {len(runs['on'])} process(es) per setting "
             "(alternating), each the median of its repeats.", "",
             "| 3x3 conv (N, H, W, Cin, Cout) | fwd GFLOP | off: fwd / wgrad / fwd+bwd ms | on: fwd / wgrad / fwd+bwd ms | fwd+bwd speed-up |",
             "|---|---|---|---|---|"]
    for i, c in enumerate(on["conv"]):
        f = {s: [med(s, lambda r, k=k: r["conv"][i][k]) for k in ("fwd_ms", "wgrad_ms", "fwd_bwd_ms")]
             for s in ("off", "on")}
        lines.append(f"| {tuple(c['shape'])} | {c['gflop_fwd']:.3f} | " + " / ".join(f"{v:.2f}" for v in f["off"])
                     + " | " + " / ".join(f"{v:.2f}" for v in f["on"]) + f" | {f['off'][2] / f['on'][2]:.2f}x |")
    lines += ["", "| U-Net bare fwd+bwd (bench_train size) | params | off ms/step (ynn fusions) | on ms/step (ynn fusions) | speed-up |",
              "|---|---|---|---|---|"]
    for s in sizes:
        a = med("off", lambda r: r["unet"][s]["bare_ms"])
        b = med("on", lambda r: r["unet"][s]["bare_ms"])
        lines.append(f"| {s} | {on['unet'][s]['params']:,} | {a:.1f} ({off['unet'][s]['ynn_fusions']}) | "
                     f"{b:.1f} ({on['unet'][s]['ynn_fusions']}) | {a / b:.2f}x |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", default="A,B")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    if args.child:
        print(REPLY + json.dumps(child(args.repeats, sizes)), flush=True)
        return
    rounds = args.rounds or (1 if args.quick else 2)
    runs = {"off": [], "on": []}
    t0 = time.time()
    for r in range(rounds):
        for setting in ("off", "on") if r % 2 == 0 else ("on", "off"):
            runs[setting].append(run_child(setting, args.repeats, sizes))
            print(f"[{time.time() - t0:5.0f}s] round {r + 1}/{rounds} {setting}: unet "
                  + ", ".join(f"{s} {runs[setting][-1]['unet'][s]['bare_ms']:.1f} ms" for s in sizes), flush=True)
    text = render(runs, sizes)
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    name = "xla_cpu_flags_quick" if args.quick else "xla_cpu_flags"
    with open(os.path.join(RESULTS, name + ".json"), "w") as f:
        json.dump(runs, f, indent=1)
    if not args.quick:
        from experiments.benchmarks.bench_train import cpu_name
        from experiments.benchmarks.benchlib import write_section

        text += f"\n\nMachine: {cpu_name()}, {os.cpu_count()} cores; wall {(time.time() - t0) / 60:.1f} min."
        write_section("xla-cpu-flags", text, "python experiments/perf/xla_cpu_flags.py")


if __name__ == "__main__":
    main()
