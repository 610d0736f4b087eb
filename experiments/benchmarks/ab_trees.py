"""Paired A/B of diffjax's train step between two source trees (e.g. two commits), same host hour.

    git worktree add /tmp/base <commit>
    python experiments/benchmarks/ab_trees.py --base /tmp/base --rounds 2 --write-benchmarks

Runs ``bench_train.py --quick --no-torch`` (the diffjax contenders only: step, fused step, bare
forward + backward, update alone) from each tree in turn, each in its own process with that tree
first on ``PYTHONPATH`` (so it imports that tree's diffjax), alternating base / this tree for
``--rounds`` rounds so that host-speed drift hits both alike. Reports each round's medians and the
per-round ratio this tree / base (< 1: this tree is faster). It first hashes the programs each tree
hands to XLA (bare forward + backward, train step): where they are identical, the timing rounds
measure only the host's drift. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repo root: `experiments.*` imports resolve when run as a script
from experiments.benchmarks.benchlib import write_section  # noqa: E402

CONTENDERS = ("jax_step", "jax_step_fused", "jax_bare")

# Run inside each tree: sha1 of the lowered StableHLO (source locations stripped) of bench_train's bare
# forward + backward and train step; equal hashes mean both trees hand XLA the same program.
_PROGRAMS = """
import glob, hashlib, json, os, re, sys
tree, size = sys.argv[1], sys.argv[2]
sys.path[:0] = [os.path.dirname(sorted(glob.glob(os.path.join(tree, "experiments", "**", "bench_train.py"),
                                                  recursive=True))[0]), tree]
import jax, jax.numpy as jnp
import bench_train as bt
from diffjax.training import TrainState, make_train_step
from diffjax.training.builders import build_loss, build_model, build_optimizer, build_schedule
c, s = bt.make_config(size), bt.SIZES[size]
module, opt = build_model(c), build_optimizer(c)
loss_fn = build_loss(c, build_schedule(c.diffusion), module)
shape = (s["batch"], s["resolution"], s["resolution"], s["channels"])
def state(k):
    x = jnp.zeros((1,) + shape[1:])
    return TrainState.create(module.init({"params": k, "dropout": k}, x, jnp.zeros((1,)), None, train=False), opt, k)
st = jax.eval_shape(state, jax.random.PRNGKey(0))
batch = {"x": jax.ShapeDtypeStruct(shape, jnp.float32)}
bare = jax.jit(jax.value_and_grad(loss_fn, has_aux=True)).lower(st.params, batch, st.key).as_text()
step = make_train_step(loss_fn, opt, ema_decay=c.optim.ema_decay).lower(st, batch).as_text()
sha = lambda t: hashlib.sha1(re.sub(r"loc\\([^)]*\\)", "", t).encode()).hexdigest()[:12]
print(json.dumps(dict(bare=sha(bare), step=sha(step))))
"""


def program_hashes(tree: str, size: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROGRAMS, tree, size], cwd=tree, env=dict(os.environ, PYTHONPATH=tree),
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"lowering bench_train's programs in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _script(tree: str) -> str:
    found = sorted(glob.glob(os.path.join(tree, "experiments", "**", "bench_train.py"), recursive=True))
    if not found:
        raise SystemExit(f"--base {tree}: no experiments/**/bench_train.py there")
    return found[0]


def _git_rev(tree: str) -> str:
    out = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    # results files the benchmarks themselves rewrite do not count as changes to the code
    dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":(exclude,glob)**/results/**"], capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + (" (+ uncommitted changes)" if dirty else "")


def run_tree(tree: str, sizes: str, repeats: int, log) -> dict:
    """One bench_train run from ``tree``; returns {size: {contender: median ms/step}}."""
    script = _script(tree)
    env = dict(os.environ, PYTHONPATH=tree)
    cmd = [sys.executable, script, "--quick", "--no-torch", "--sizes", sizes, "--repeats", str(repeats),
           "--steps-a", "20", "--steps-b", "8"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"bench_train in {tree} failed:\n{out.stderr[-3000:]}")
    res = json.load(open(os.path.join(os.path.dirname(script), "results", "bench_train_quick.json")))
    got = {r["size"]: {w: r["timings"][w]["median_s"] * 1e3 for w in CONTENDERS} for r in res["results"]}
    got["_xla_flags"] = res["meta"].get("xla_flags", "")
    log(f"{tree}: " + "; ".join(f"{s} " + ", ".join(f"{w} {v:.1f}" for w, v in got[s].items())
                                for s in got if not s.startswith("_")) + f" ms/step ({time.perf_counter() - t0:.0f} s)")
    return got


def fmt(rounds, sizes, base_rev, this_rev, programs) -> str:
    same = {s: programs[s][0] == programs[s][1] for s in sizes}
    lines = ["Programs (sha1 of the lowered StableHLO without source locations, base / this): " + "; ".join(
        f"{s} bare {programs[s][0]['bare']} / {programs[s][1]['bare']}, step {programs[s][0]['step']} / "
        f"{programs[s][1]['step']} ({'identical' if same[s] else 'different'})" for s in sizes) + ".", "",f"Base: `{base_rev}`; this tree: `{this_rev}`. Median ms/step of each run (bench_train `--quick "
             f"--no-torch`, A 20 / B 8 steps per repeat); ratio = this / base within a round (< 1: this tree faster).",
             "", "| size | contender | " + " | ".join(f"round {i + 1} base | round {i + 1} this | ratio"
                                                     for i in range(len(rounds))) + " | median ratio |",
             "|---|---|" + "---|---|---|" * len(rounds) + "---|"]
    for s in sizes:
        for w in CONTENDERS:
            cells, ratios = [], []
            for base, this in rounds:
                ratios.append(this[s][w] / base[s][w])
                cells.append(f"{base[s][w]:.1f} | {this[s][w]:.1f} | {ratios[-1]:.3f}")
            lines.append(f"| {s} | {w} | " + " | ".join(cells) + f" | **{statistics.median(ratios):.3f}** |")
    lines.append("")
    lines.append(f"Load average after: {os.getloadavg()[0]:.2f}. XLA_FLAGS seen by the runs: base "
                 f"`{rounds[0][0]['_xla_flags']}`, this `{rounds[0][1]['_xla_flags']}`.")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the other source tree (e.g. a git worktree of an older commit)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="bench_train repeats per run")
    ap.add_argument("--sizes", default="A,B")
    ap.add_argument("--write-benchmarks", action="store_true")
    args = ap.parse_args()
    if args.rounds < 1 or args.repeats < 1:
        ap.error("--rounds and --repeats must be >= 1")
    sizes = args.sizes.split(",")
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    programs = {s: (program_hashes(os.path.abspath(args.base), s), program_hashes(ROOT, s)) for s in sizes}
    log(f"program hashes (base, this): {programs}")
    rounds = []
    for _ in range(args.rounds):
        base = run_tree(os.path.abspath(args.base), args.sizes, args.repeats, log)
        this = run_tree(ROOT, args.sizes, args.repeats, log)
        rounds.append((base, this))
    text = fmt(rounds, sizes, _git_rev(args.base), _git_rev(ROOT), programs)
    print(text)
    if args.write_benchmarks:
        write_section("train-commits", text, "python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
