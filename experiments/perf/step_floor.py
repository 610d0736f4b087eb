"""How much of the train step is convolution and matmul work, in diffjax and in PyTorch + diffusers.

    python experiments/perf/step_floor.py                      # sizes A and B of bench_train.py, ~10 min
    python experiments/perf/step_floor.py --write-benchmarks   # also the "step-floor" block of BENCHMARKS.md
Writes results/step_floor.json (every timed op with its shapes, count and median time).

Asks what the 1.3x target of bench_train.py leaves for everything that is not a convolution or a
matmul. Both runtimes do the same convolutions and matmuls (same layers; the parameter counts agree
within ~1%); the rest of a step (GroupNorm, SiLU, softmax, dropout masks, residual adds, up/down
sampling, layout copies, the loss) is where a compiler can win or lose.

diffjax: every ``conv_general_dilated`` and ``dot_general`` in the jaxpr of bench_train.py's bare
forward + backward (``jit(value_and_grad(loss))``, eps-MSE, dropout on), on random inputs of their
shapes, timed two ways that bracket what they cost inside the step:
  each alone  every distinct op (shapes, dtypes, dimension numbers) jitted alone and timed call by
              call (blocking after each, minus the round trip of a trivial jitted call), times its
              count: high, each op pays its own thread-pool start-up and output buffer;
  one program all ops of a kind in one jitted program, each instance on its own inputs (so XLA cannot
              merge them): low, independent ops may overlap, where the step's are chained.
The ops' count is checked against the compiled program (XLA keeps every convolution and may turn a
1x1 convolution into a dot). diffjax's rest = the bare forward + backward minus the floor.
PyTorch: the same bare forward + backward of the diffusers peer under ``torch.profiler``, self time
by kind (``diffusers_train_peer.OP_KINDS``: convolution fwd/bwd, mm/addmm/bmm, the fused CPU
attention kernels, dropout's ``bernoulli_``); its rest = the profiled wall minus these.

Then the bound: a diffjax step 1.3x faster than torch's takes at most torch_step / 1.3; minus diffjax's
lower (one-program) convolution + matmul floor and its optimizer + EMA (timed alone, bench_train's
``jax_update``), what is left is the time the rest of the forward + backward may take. Run it on an
otherwise idle machine; the contenders are interleaved per repeat as in bench_train.py.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import sys
import time

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repo root: `experiments.*` imports resolve when run as a script
from experiments.benchmarks.bench_train import (SIZES, STEPS, TARGET_SPEEDUP, JaxContenders, TorchPeer,  # noqa: E402
                                                cpu_name, prepare)
from experiments.benchmarks.benchlib import parse_sizes, write_section  # noqa: E402

GEMM_PRIMS = ("conv_general_dilated", "dot_general")
CALLS = 15  # timed calls per distinct op per repeat (each blocked)


def gemm_eqns(jaxpr) -> list:
    """Every convolution and dot_general equation of a jaxpr, nested jaxprs (jit, custom rules) included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in GEMM_PRIMS:
            out.append(eqn)
        for sub in jex.core.jaxprs_in_params(eqn.params):
            out += gemm_eqns(sub)
    return out


def signature(eqn) -> tuple:
    avals = tuple((tuple(v.aval.shape), str(v.aval.dtype)) for v in eqn.invars)
    return eqn.primitive.name, avals, tuple(sorted((k, repr(v)) for k, v in eqn.params.items()))


def _random_inputs(eqn, key) -> tuple:
    """Standard-normal arrays shaped like the equation's inputs (literals kept), and the next key."""
    args = []
    for v in eqn.invars:
        key, sub = jax.random.split(key)
        args.append(v.val if isinstance(v, jex.core.Literal) else jax.random.normal(sub, v.aval.shape, v.aval.dtype))
    return args, key


class OpFloor:
    """The convolutions and matmuls of one program: each distinct op jitted alone (with its count), and all
    ops of a kind in one jitted program (every instance on its own inputs, so XLA cannot merge them)."""

    def __init__(self, closed_jaxpr):
        eqns = gemm_eqns(closed_jaxpr.jaxpr)
        groups = collections.OrderedDict()
        for e in eqns:
            groups.setdefault(signature(e), []).append(e)
        key = jax.random.PRNGKey(0)
        self.ops = []
        for es in groups.values():
            e = es[0]
            args, key = _random_inputs(e, key)
            fn = jax.jit(lambda *a, e=e: e.primitive.bind(*a, **e.params))
            jax.block_until_ready(fn(*args))
            flop = 2 * np.prod(e.outvars[0].aval.shape, dtype=np.float64) * _contracted(e)
            self.ops.append(dict(prim=e.primitive.name, count=len(es), fn=fn, args=args, flop=flop,
                                 shapes=[tuple(v.aval.shape) for v in e.invars], times=[]))
        self.trivial = jax.jit(lambda x: x + 1)
        self.scalar = jnp.zeros(())
        jax.block_until_ready(self.trivial(self.scalar))
        self.overheads = []
        self.programs = {}
        for prim in GEMM_PRIMS:
            es = [e for e in eqns if e.primitive.name == prim]
            args = []
            for e in es:
                a, key = _random_inputs(e, key)
                args.append(a)
            fn = jax.jit(lambda args, es=es: [e.primitive.bind(*a, **e.params) for e, a in zip(es, args)])
            jax.block_until_ready(fn(args))
            self.programs[prim] = dict(fn=fn, args=args, times=[])

    def run(self):
        """One repeat: CALLS blocked calls of each op (median per op) and of a trivial jitted call (the round trip),
        and 3 calls of each kind's one program (median)."""
        self.overheads.append(_median_call(self.trivial, (self.scalar,)))
        for op in self.ops:
            op["times"].append(_median_call(op["fn"], op["args"]))
        for prog in self.programs.values():
            prog["times"].append(_median_call(prog["fn"], (prog["args"],), calls=3))

    def summary(self) -> dict:
        over = statistics.median(self.overheads)
        by = {p: 0.0 for p in GEMM_PRIMS}
        flop = {p: 0.0 for p in GEMM_PRIMS}
        count = {p: 0 for p in GEMM_PRIMS}
        for op in self.ops:
            t = max(0.0, statistics.median(op["times"]) - over)
            by[op["prim"]] += op["count"] * t
            flop[op["prim"]] += op["count"] * op["flop"]
            count[op["prim"]] += op["count"]
        one = {p: statistics.median(prog["times"]) for p, prog in self.programs.items()}
        return dict(seconds=by, one_program_s=one, flop=flop, count=count, distinct=len(self.ops),
                    call_overhead_s=over)


def _contracted(eqn) -> float:
    """Multiply-adds per output element: the contracted size (a conv: kernel window x input features)."""
    if eqn.primitive.name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        return float(np.prod([eqn.invars[0].aval.shape[d] for d in lc]))
    dn = eqn.params["dimension_numbers"]
    rhs = eqn.invars[1].aval.shape
    return float(np.prod([rhs[d] for d in dn.rhs_spec[1:]]))  # in-features and spatial window


def _median_call(fn, args, calls: int = CALLS) -> float:
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def compiled_counts(jx) -> dict:
    """Convolutions and dots in the compiled bare forward + backward (XLA's optimised HLO)."""
    text = jx.bare_fn.lower(jx.params, jx._batch(), jx.bare_key, np.int32(0)).compile().as_text()
    return dict(conv_general_dilated=len(re.findall(r"= f32\[[^\]]*\][^ ]* convolution\(", text)),
                dot_general=len(re.findall(r"= f32\[[^\]]*\][^ ]* dot\(", text)))


def bench_size(size, repeats, peer, log) -> dict:
    steps = STEPS[size][1]
    config, host, spec = prepare(size, "eps")
    jx = JaxContenders(size, host, "eps")
    jx.warm()
    closed = jax.make_jaxpr(jx.bare_fn)(jx.params, jx._batch(), jx.bare_key, np.int32(0))
    floor = OpFloor(closed)
    counts = compiled_counts(jx)
    log(f"[{size}] {len(floor.ops)} distinct convolutions/matmuls; jaxpr counts "
        f"{ {p: sum(o['count'] for o in floor.ops if o['prim'] == p) for p in GEMM_PRIMS} }, compiled {counts}")
    torch_info = peer.ask(cmd="setup", name=size, spec=spec, warmup=3)
    times = {w: [] for w in ("jax_bare", "jax_step", "jax_update", "torch_bare", "torch_step")}
    for r in range(repeats):
        for w in ("jax_bare", "jax_step", "jax_update"):
            times[w].append(jx.run(w, steps)[0])
        floor.run()
        times["torch_bare"].append(peer.ask(cmd="run", name=size, what="bare", n=steps)["per_step_s"])
        times["torch_step"].append(peer.ask(cmd="run", name=size, what="step", n=steps)["per_step_s"])
        log(f"[{size}] repeat {r + 1}/{repeats}: " + ", ".join(f"{w} {v[-1] * 1e3:.1f}" for w, v in times.items())
            + " ms/step")
    prof = [peer.ask(cmd="profile", name=size, n=steps) for _ in range(3)]
    prof_wall = statistics.median(p["per_step_s"] for p in prof)
    kinds = {k: statistics.median(p["kinds_s"][k] for p in prof) for k in prof[0]["kinds_s"]}
    med = {w: statistics.median(v) for w, v in times.items()}
    fl = floor.summary()
    detail = [dict(prim=o["prim"], count=o["count"], shapes=o["shapes"], flop=o["flop"],
                   median_s=statistics.median(o["times"])) for o in floor.ops]
    return dict(size=size, label=SIZES[size]["label"], steps=steps, repeats=repeats, times=times, median=med,
                floor=fl, floor_ops=detail, compiled_counts=counts,
                torch_profile=dict(wall_s=prof_wall, kinds_s=kinds, counts=prof[0]["counts"]),
                torch_params=torch_info["n_params"], diffjax_params=jx.n_params)


def derive(r) -> dict:
    """The floor's bracket, diffjax's and torch's rest, and the bound that 1.3x puts on diffjax's rest.

    Per kind the lower of the two floors is the low end (one program is usually lower, but on a noisy
    host either can be), the higher the high end; the bound takes the low end, the figure most
    favourable to the target.
    """
    fl, med, tp = r["floor"], r["median"], r["torch_profile"]
    low = sum(min(fl["one_program_s"][p], fl["seconds"][p]) for p in GEMM_PRIMS)
    high = sum(max(fl["one_program_s"][p], fl["seconds"][p]) for p in GEMM_PRIMS)
    target = med["torch_step"] / TARGET_SPEEDUP
    return dict(gemm_low_s=low, gemm_high_s=high, jax_rest_s=(med["jax_bare"] - high, med["jax_bare"] - low),
                torch_rest_s=tp["wall_s"] - sum(tp["kinds_s"].values()), target_step_s=target,
                rest_budget_s=target - low - med["jax_update"])


def fmt(results, meta) -> str:
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    out = []
    for r in results:
        r = {**r, **derive(r)}
        fl, tp, med = r["floor"], r["torch_profile"], r["median"]
        k, one, alone = tp["kinds_s"], fl["one_program_s"], fl["seconds"]

        def cell(p):
            return (f"{ms(one[p])} one program / {ms(alone[p])} each alone ({fl['count'][p]} ops, "
                    f"{fl['flop'][p] / one[p] / 1e9:.0f} / {fl['flop'][p] / alone[p] / 1e9:.0f} GFLOP/s)")

        lo, hi = r["jax_rest_s"]
        out.append(
            f"**{r['size']}: {r['label']}** (diffjax {r['diffjax_params']:,} params, diffusers {r['torch_params']:,}); "
            f"{r['repeats']} repeats x {r['steps']} steps, medians.\n\n"
            "| runtime | fwd+bwd ms | convolutions ms | matmuls ms | fused attention ms | dropout masks ms | "
            "rest ms | step ms |\n|---|---|---|---|---|---|---|---|\n"
            f"| diffjax | {ms(med['jax_bare'])} | {cell('conv_general_dilated')} | {cell('dot_general')} | "
            f"(in matmuls and rest) | (in rest) | **{ms(lo)}-{ms(hi)}** | {ms(med['jax_step'])} |\n"
            f"| PyTorch + diffusers (profiled: {ms(tp['wall_s'])}) | {ms(med['torch_bare'])} | {ms(k['conv'])} "
            f"({tp['counts']['conv']:.0f} ops) | {ms(k['matmul'])} ({tp['counts']['matmul']:.0f} ops) | "
            f"{ms(k['attention'])} | {ms(k['dropout_masks'])} | **{ms(r['torch_rest_s'])}** | "
            f"{ms(med['torch_step'])} |\n\n"
            f"- Compiled diffjax program: {r['compiled_counts']['conv_general_dilated']} convolutions, "
            f"{r['compiled_counts']['dot_general']} dots (jaxpr: {fl['count']['conv_general_dilated']}, "
            f"{fl['count']['dot_general']}; {fl['distinct']} distinct ops timed alone, call round trip "
            f"{fl['call_overhead_s'] * 1e6:.0f} us subtracted). diffjax's rest = fwd+bwd minus the floor, "
            f"the higher or the lower of the two per kind.\n"
            f"- {TARGET_SPEEDUP}x over torch's step ({ms(med['torch_step'])} ms) means a diffjax step of at most "
            f"**{ms(r['target_step_s'])} ms**; minus the lower convolution + matmul floor "
            f"({ms(r['gemm_low_s'])}) and the optimizer + EMA measured alone ({ms(med['jax_update'])}), the rest "
            f"of the forward + backward may take **{ms(r['rest_budget_s'])} ms**, against {ms(lo)}-{ms(hi)} in "
            f"diffjax now and {ms(r['torch_rest_s'])} in torch (which excludes its dropout masks and attention "
            f"kernels).")
    out.append(f"Measured {meta['started_utc']} UTC, `{meta['command']}`. " if "started_utc" in meta else "")
    out[-1] += (f"Machine: {meta['cpu']}, {meta['cpu_count']} cores; jax {jax.__version__}, torch "
               f"{meta['torch']['torch']} ({meta['torch']['torch_threads']} threads); load average before "
               f"{meta['load_before']:.2f}, after {meta['load_after']:.2f}; wall {meta['wall_s'] / 60:.1f} min.")
    return "\n\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="A,B")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--torch-python", default=sys.executable)
    ap.add_argument("--write-benchmarks", action="store_true")
    ap.add_argument("--render", metavar="JSON", help="no measurement: format (and with --write-benchmarks write) "
                    "the results of an earlier run from its json")
    args = ap.parse_args()
    if args.render:
        try:
            saved = json.load(open(args.render))
            saved["results"], saved["meta"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error(f"--render: {args.render!r} is not a step_floor.py results json ({type(e).__name__}: {e})")
        text = fmt(saved["results"], saved["meta"])
        print(text)
        if args.write_benchmarks:
            write_section("step-floor", text, " ".join(["python"] + sys.argv))
        return
    sizes = parse_sizes(ap, args.sizes, SIZES)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1; got {args.repeats}")
    t0 = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t0:6.0f}s] {m}", flush=True)  # noqa: E731
    meta = dict(cpu=cpu_name(), cpu_count=os.cpu_count(), load_before=os.getloadavg()[0],
                started_utc=time.strftime("%Y-%m-%d %H:%M", time.gmtime()), command=" ".join(["python"] + sys.argv))
    peer = TorchPeer(args.torch_python, args.threads)
    meta["torch"] = peer.info
    try:
        results = [bench_size(s, args.repeats, peer, log) for s in sizes]
    finally:
        peer.close()
    meta["wall_s"] = time.perf_counter() - t0
    meta["load_after"] = os.getloadavg()[0]
    os.makedirs(RESULTS, exist_ok=True)
    json.dump(dict(meta=meta, results=results), open(os.path.join(RESULTS, "step_floor.json"), "w"), indent=1)
    text = fmt(results, meta)
    print(text)
    if args.write_benchmarks:
        write_section("step-floor", text, " ".join(["python"] + sys.argv))


if __name__ == "__main__":
    from diffjax import xla_cpu

    xla_cpu.tune()  # XLA:CPU flags and glibc malloc options before JAX starts, as diffjax's CLIs do
    main()
