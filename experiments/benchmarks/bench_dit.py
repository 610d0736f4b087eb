"""DiT vs U-Net on digits at equal wall clock, and the two train steps timed side by side (2 CPU cores).

    python experiments/benchmarks/bench_dit.py --root runs/bench_dit --time --train --evaluate --write-benchmarks
    python experiments/benchmarks/bench_dit.py --search --root runs/bench_dit_search --budget 120 --train-seeds 0 \
        --sample-seeds 0 --time --train --evaluate --write-benchmarks
    python experiments/benchmarks/bench_dit.py --render-only [--search] --write-benchmarks

Contenders: the digits U-Net (``experiments/configs/digits.py``, the default main job) and the digits DiT
(``digits_dit.py``), each through the main job (``python -m diffjax.main``). ``--search`` instead compares DiT
recipes (``SEARCH``: learning rate, dropout, patch size, depth x width at ~1M parameters).

Equal wall clock that does not depend on who else uses the machine: ``--time`` times every contender's
real train step (the trainer's own jitted step, ``steps_per_call`` steps per call, fed by the trainer's
input pipeline) in one process, the contenders interleaved with their order rotated every repeat; per
contender: the median wall time per step over repeats, min-max, process CPU per step, the cores other
processes used meanwhile (``/proc/stat``), and compilation (first call minus the median call). ``--train``
then trains each contender for the number of steps its measured speed gives in ``--budget`` seconds of
the trainer's budget clock (``training.max_train_seconds`` counts compilation: steps = steps/s x
(budget - compile s), rounded down to a multiple of ``steps_per_call``), one training at a time, for each
of ``--train-seeds`` (``config.seed``: initialisation, data order and step keys). ``--anchor unet:300`` sets
the budget to the time the timing run gives the U-Net for 300 steps instead of a number of seconds: on a
loaded machine the same seconds buy fewer steps than on an idle one, and the step ratio is what is compared.
The timing, the trainings and the scoring take ``/tmp/cpu.lock`` (``flock``) themselves, one hold spanning
consecutive units while it stays under 12 minutes: do not wrap this script in ``flock``.

Score (``--evaluate``): ``--num-samples`` samples per draw with the run's default sampler (``config.sample``),
one draw per ``--sample-seeds`` seed; Fréchet distance between the features of the independent digits
evaluator (``diffjax.evaluators.digits_evaluator``) of the samples and of the train split, as in
bench_quality.py: per draw (mean, min-max), and all draws pooled. Floor: the same distance for the 297 real
test images (finite-sample bias, no model error).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
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
LOCK = "/tmp/cpu.lock"

# name -> (config file, overrides of config fields)
# the figures in BENCHMARKS.md were measured before digits.py's EMA warm-up and one-block attention-free U-Net
MAIN = {
    "unet": ("digits.py", {"optim.ema_warmup": False, "model.num_res_blocks": 2, "model.attn_resolutions": (4,)}),
    "dit": ("digits_dit.py", {"optim.ema_warmup": False}),
}
# timed beside MAIN, not trained: one step per jitted call (bench_train.py's "train step" row)
STEP_ONLY = {
    "unet 1 step per call": ("digits.py", {"training.steps_per_call": 1, "model.num_res_blocks": 2,
                                           "model.attn_resolutions": (4,)}),
    "dit 1 step per call": ("digits_dit.py", {"training.steps_per_call": 1}),
}
# DiT recipes: the config's, then one change each
SEARCH = {
    "dit": ("digits_dit.py", {}),
    "dit lr 1e-3": ("digits_dit.py", {"optim.learning_rate": 1e-3}),
    "dit dropout 0": ("digits_dit.py", {"model.dropout": 0.0}),
    "dit patch 1": ("digits_dit.py", {"model.patch_size": 1}),  # timed only: ~4.5x the step time of patch 2
    "dit depth 14 width 64": ("digits_dit.py", {"model.hidden_size": 64, "model.depth": 14}),
}


class CpuLock:
    """/tmp/cpu.lock (flock(2), the lock ``flock /tmp/cpu.lock`` takes), held across consecutive units of work
    while the hold stays under ``max_hold_s``: fewer waits behind other users of the lock, no hold much longer
    than the machine's ~12-minute rule."""

    def __init__(self, max_hold_s: float = 720.0):
        self.max_hold_s, self.f, self.since = max_hold_s, None, None

    def hold(self, next_unit_s: float = 0.0):
        """Hold the lock for a unit expected to take ``next_unit_s``; released first if the hold would run over."""
        if self.f is not None and time.perf_counter() - self.since + next_unit_s > self.max_hold_s:
            self.release()
        if self.f is None:
            self.f = open(LOCK, "a")
            fcntl.flock(self.f, fcntl.LOCK_EX)
            self.since = time.perf_counter()

    def release(self):
        if self.f is not None:
            fcntl.flock(self.f, fcntl.LOCK_UN)
            self.f.close()
            self.f = None


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def make_config(config_file: str, overrides: dict):
    from diffjax.config import load

    c = load(os.path.join(CONFIGS, config_file))
    for path, value in overrides.items():
        section, field = path.split(".")
        c[section][field] = value
    return c


def _flag(value) -> str:
    return str(value) if not isinstance(value, (tuple, list)) else "(" + ",".join(map(str, value)) + ",)"


def timing_key(config_file: str, overrides: dict) -> str:
    """Contenders whose step programs cost the same (they differ only in optimizer numbers) share one timing."""
    c = make_config(config_file, overrides)
    return json.dumps(dict(model=c.model.to_dict(), k=c.training.steps_per_call, b=c.training.batch_size),
                      sort_keys=True, default=str)


class Contender:
    """One config's trainer step (``diffjax.training.loop``'s jitted step and input pipeline), timed per call."""

    def __init__(self, config):
        from diffjax import models
        from diffjax.training import loop

        self.config = config
        self.k = config.training.steps_per_call
        self.run = loop.setup(config, None)
        self.n_params = models.count_params(self.run.state.params)
        self.step_fn = loop._train_step_for(self.run)  # the trainer's own step, not a copy of its construction
        self.batches = loop.train_batches(config, 0)
        self.state = self.run.state
        x = jax.ShapeDtypeStruct((1, *self.run.spec.shape), np.float32)
        t = jax.ShapeDtypeStruct((1,), np.float32)
        apply = jax.jit(lambda p, x, t: self.run.module.apply(p, x, t))
        cost = apply.lower(self.run.state.params, x, t).cost_analysis()
        self.fwd_gflop = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]) / 1e9  # per example

    def call(self, n_calls: int) -> tuple:
        """(wall, process CPU, machine busy) seconds of ``n_calls`` calls of k steps, as the trainer runs them."""
        from diffjax.sharding import global_batch
        from experiments.benchmarks.benchlib import machine_busy_s

        b0, c0, t0 = machine_busy_s(), time.process_time(), time.perf_counter()
        state, metrics = self.state, None
        for _ in range(n_calls):
            chunk = [next(self.batches) for _ in range(self.k)]
            host = chunk[0] if self.k == 1 else jax.tree.map(lambda *xs: np.stack(xs), *chunk)
            state, metrics = self.step_fn(state, global_batch(host, self.run.mesh, stacked=self.k > 1))
        jax.block_until_ready((state, metrics))
        self.state = state
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if not np.all(np.isfinite(np.asarray(metrics["loss"]))):
            raise SystemExit(f"non-finite loss in the {self.config.model.name} step")
        return wall, cpu, machine_busy_s() - b0


def time_steps(contenders: dict, repeats: int, steps: int) -> dict:
    """Interleaved timing (order rotated each repeat) of each contender's trainer step; see the module docstring."""
    built, out = {}, {}
    for name, (config_file, overrides) in contenders.items():
        t0 = time.perf_counter()
        built[name] = Contender(make_config(config_file, overrides))
        first = built[name].call(1)[0]
        out[name] = dict(setup_s=t0, first_call_s=first, n_params=built[name].n_params, k=built[name].k,
                         fwd_gflop=built[name].fwd_gflop,
                         per_step_s=[], cpu_per_step_s=[], other_cores=[])
        out[name]["setup_s"] = time.perf_counter() - t0 - first
        print(f"{name}: first call {first:.1f} s", flush=True)
    names = list(built)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            c = built[name]
            calls = max(1, steps // c.k)
            wall, cpu, busy = c.call(calls)
            o = out[name]
            o["per_step_s"].append(wall / (calls * c.k))
            o["cpu_per_step_s"].append(cpu / (calls * c.k))
            o["other_cores"].append(max(busy - cpu, 0.0) / wall)
        print(f"repeat {r}: " + ", ".join(f"{n} {1e3 * out[n]['per_step_s'][-1]:.0f} ms/step" for n in names),
              flush=True)
    for name, o in out.items():
        med = statistics.median(o["per_step_s"])
        o.update(median_s=med, min_s=min(o["per_step_s"]), max_s=max(o["per_step_s"]), steps_per_s=1.0 / med,
                 cpu_median_s=statistics.median(o["cpu_per_step_s"]), other_cores_max=max(o["other_cores"]),
                 compile_s=o["first_call_s"] - med * o["k"], steps_per_repeat=max(1, steps // o["k"]) * o["k"],
                 repeats=repeats)
    return out


def budget_steps(t: dict, budget: float) -> int:
    """Steps that fit in ``budget`` seconds of the trainer's clock at the measured speed (compilation counted)."""
    n = int((budget - t["compile_s"]) * t["steps_per_s"]) // t["k"] * t["k"]
    if n <= 0:
        raise SystemExit(f"budget {budget} s leaves no steps after {t['compile_s']:.0f} s of compilation")
    return n


def train_one(workdir: str, config_file: str, overrides: dict, seed: int, num_steps: int) -> dict:
    """The main job for ``num_steps`` steps unless ``workdir`` holds its metrics.json (caller holds the lock)."""
    path = os.path.join(workdir, "metrics.json")
    if not os.path.exists(path):
        cmd = [sys.executable, "-m", "diffjax.main", "--config", os.path.join(CONFIGS, config_file),
               "--workdir", workdir, "--noprogress", f"--config.seed={seed}",
               f"--config.training.num_steps={num_steps}", "--config.eval.num_examples=0",
               "--config.training.checkpoint_every=1000000",
               *[f"--config.{k}={_flag(v)}" for k, v in overrides.items()]]
        print("$", " ".join(cmd), flush=True)
        load0, t0 = loadavg(), time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        wall, load1 = time.perf_counter() - t0, loadavg()
        m = json.load(open(path))
        m.update(wall_s=wall, loadavg_before=load0, loadavg_after=load1)
        json.dump(m, open(path, "w"), indent=2, sort_keys=True)
    return json.load(open(path))


def score_run(workdir: str, seeds, num_samples: int, evaluator, ref) -> dict:
    """FD of each draw (mean, min, max) and of all draws pooled, with the run's default sampler (lock: the caller's)."""
    from diffjax import load_run, metrics

    run = load_run(workdir, task="diffusion")
    feats, nfe = [], None
    for s in seeds:
        x, nfe = run.sample(num_samples, key=jax.random.PRNGKey(s), return_nfe=True)
        feats.append(evaluator.features(x))
    fds = [metrics.frechet_distance_from_features(f, ref) for f in feats]
    return dict(fd=float(np.mean(fds)), fd_min=float(min(fds)), fd_max=float(max(fds)), fds=fds,
                fd_pooled=float(metrics.frechet_distance_from_features(np.concatenate(feats), ref)),
                n_pooled=len(seeds) * num_samples, nfe=nfe, method=run.config.sample.method)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/bench_dit", help="one workdir per contender and seed under this directory")
    p.add_argument("--search", action="store_true", help="the DiT recipe search (SEARCH) instead of DiT vs U-Net")
    p.add_argument("--only", default="", help="comma-separated contender names (default: all)")
    p.add_argument("--budget", type=float, default=300.0, help="training seconds per run, compilation included")
    p.add_argument("--anchor", default="",
                   help="NAME:STEPS: the budget is the time the timing run gives NAME for STEPS steps, compilation "
                        "included (instead of --budget; for a loaded machine, where wall seconds buy fewer steps)")
    p.add_argument("--train-seeds", default="0,1")
    p.add_argument("--sample-seeds", default="0,1,2", help="one draw of --num-samples per seed")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=10,
                   help="steps per timed repeat (in calls of each contender's steps_per_call)")
    p.add_argument("--time", action="store_true", help="time the steps (interleaved, under the CPU lock)")
    p.add_argument("--train", action="store_true", help="train the runs that have no metrics.json yet")
    p.add_argument("--evaluate", action="store_true", help="sample and score the trained runs")
    p.add_argument("--write-benchmarks", action="store_true")
    p.add_argument("--render-only", action="store_true", help="re-render from the saved results json")
    args = p.parse_args(argv)
    tag = "bench_dit_search" if args.search else "bench_dit"
    out_path = os.path.join(RESULTS, f"{tag}.json")
    saved = json.load(open(out_path)) if os.path.exists(out_path) else {}
    if args.render_only:
        return report(saved, args, argv)
    table = SEARCH if args.search else MAIN
    names = [n for n in args.only.split(",") if n] or list(table)
    unknown = set(names) - set(table)
    if unknown:
        p.error(f"--only: unknown {sorted(unknown)}; known: {list(table)}")
    contenders = {n: table[n] for n in names}
    saved.setdefault("timing", {})
    saved.setdefault("runs", {})
    saved.setdefault("scores", {})
    saved["args"] = dict(budget=args.budget, train_seeds=args.train_seeds, sample_seeds=args.sample_seeds,
                         num_samples=args.num_samples, contenders={n: list(v) for n, v in table.items()})

    lock = CpuLock()
    if args.time:
        keys, timed = {}, contenders if args.search or args.only else {**contenders, **STEP_ONLY}
        for n, (cfg, ov) in timed.items():
            keys.setdefault(timing_key(cfg, ov), n)
        lock.hold()
        load0, t0 = loadavg(), time.perf_counter()
        t = time_steps({keys[k]: timed[keys[k]] for k in keys}, args.repeats, args.steps)
        info = dict(loadavg_before=load0, loadavg_after=loadavg(), wall_s=time.perf_counter() - t0)
        for n, (cfg, ov) in timed.items():
            saved["timing"][n] = dict(t[keys[timing_key(cfg, ov)]], timed_as=keys[timing_key(cfg, ov)], **info)
        _save(saved, out_path)

    root = os.path.abspath(args.root)
    seeds = [int(s) for s in args.train_seeds.split(",")]
    if args.anchor:
        name, steps = args.anchor.rsplit(":", 1)
        if name not in saved["timing"]:
            p.error(f"--anchor: no step timing for {name!r}: run with --time first")
        t = saved["timing"][name]
        saved["args"].update(anchor=args.anchor, budget=t["compile_s"] + int(steps) / t["steps_per_s"])
        args.budget = saved["args"]["budget"]
    scorer = None
    if args.evaluate:
        from diffjax import evaluators, metrics
        from experiments.ablations.guidance_sweep import real_split

        evaluator = evaluators.digits_evaluator()
        ref = evaluator.features(real_split("train")[0])
        saved["floor"] = float(metrics.frechet_distance_from_features(evaluator.features(real_split("test")[0]), ref))
        sample_seeds = [int(s) for s in args.sample_seeds.split(",")]

        def scorer(key, workdir):
            saved["scores"][key] = score_run(workdir, sample_seeds, args.num_samples, evaluator, ref)
            print(key, json.dumps(saved["scores"][key]), flush=True)

    if args.train:
        print(f"budget {args.budget:.0f} s", flush=True)
        for n in contenders:
            if n not in saved["timing"]:
                p.error(f"no step timing for {n!r}: run with --time first")
    if args.train or args.evaluate:
        for seed in seeds:  # seed-major: a stopped run leaves whole seeds of every contender
            for n, (cfg, ov) in contenders.items():
                key, workdir = f"{n}/{seed}", os.path.join(root, _slug(n), f"seed{seed}")
                # a unit: the training (budget + ~60 s of start-up and the run's own evaluation), then scoring
                lock.hold((args.budget + 60 if args.train else 0) + (60 if args.evaluate else 0))
                if args.train:
                    steps = budget_steps(saved["timing"][n], args.budget)
                    saved["runs"][key] = train_one(workdir, cfg, ov, seed, steps)
                if scorer is not None and os.path.exists(os.path.join(workdir, "metrics.json")):
                    scorer(key, workdir)
                _save(saved, out_path)
    lock.release()
    report(saved, args, argv)


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def _save(saved, path):
    os.makedirs(RESULTS, exist_ok=True)
    json.dump(saved, open(path, "w"), indent=2)


def render_timing(saved) -> str:
    timing = saved.get("timing", {})
    if not timing:
        return "(no timing)"
    any_t = next(iter(timing.values()))
    lines = [f"Each contender's trainer step (its config's `steps_per_call` steps per jitted call, batch 128, the "
             f"trainer's input pipeline), interleaved in one process under `/tmp/cpu.lock`: {any_t['repeats']} "
             f"repeats x {any_t.get('steps_per_repeat') or any_t['calls_per_repeat'] * any_t['k']} steps, order "
             f"rotated each repeat; median (min-max) over repeats. "
             f"Compile = first call minus the median call. Load average (1/5/15 min) before "
             f"{any_t['loadavg_before']}, after {any_t['loadavg_after']}.", "",
             "| contender | params | forward MFLOP per example (XLA) | ms/step median (min-max) | steps/s "
             "| compile s | own CPU ms/step | other processes, cores (max) | timed as |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, t in timing.items():
        lines.append(f"| {n} | {t['n_params']:,} | {1e3 * t['fwd_gflop']:.1f} | {1e3 * t['median_s']:.1f} "
                     f"({1e3 * t['min_s']:.1f}-"
                     f"{1e3 * t['max_s']:.1f}) | {t['steps_per_s']:.2f} | {t['compile_s']:.1f} "
                     f"| {1e3 * t['cpu_median_s']:.0f} | {t['other_cores_max']:.2f} | {t['timed_as']} |")
    return "\n".join(lines)


def render_quality(saved) -> str:
    a, runs, scores, timing = (saved.get(k, {}) for k in ("args", "runs", "scores", "timing"))
    anchor = (f" (the time the timing run gives {a['anchor'].rsplit(':', 1)[0]} for "
              f"{a['anchor'].rsplit(':', 1)[1]} steps)" if a.get("anchor") else "")
    lines = [f"Budget {a.get('budget', float('nan')):.0f} s{anchor} per run, compilation included: "
             f"steps = steps/s x (budget - compile s), both from the timing table. {a.get('num_samples')} samples "
             f"per draw, draws with sampling seeds {a.get('sample_seeds')}, the run's default sampler; FD to the train "
             f"split in the digits evaluator's features (lower is better): mean over draws [min, max], and the draws "
             f"pooled. Floor (297 real test images vs train: finite-sample bias only): "
             f"{saved.get('floor', float('nan')):.2f}.", "",
             "| contender | seed | steps | budget clock s (trainer) | trainer steps/s | wall s | load avg during "
             "| FD [min, max] | FD pooled | sampler, NFE |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    per = {}
    for key, m in runs.items():
        n, seed = key.rsplit("/", 1)
        s = scores.get(key)
        fd = f"{s['fd']:.2f} [{s['fd_min']:.2f}, {s['fd_max']:.2f}]" if s else "-"
        pooled = f"{s['fd_pooled']:.2f}" if s else "-"
        sampler = f"{s['method']}, {s['nfe']}" if s else "-"
        sps = m.get("steps_per_sec") or float("nan")
        lines.append(f"| {n} | {seed} | {m['step']} | {m['loop_seconds']:.0f} | {sps:.2f} | "
                     f"{m.get('wall_s', float('nan')):.0f} | {m.get('loadavg_before', '?').split()[0]} -> "
                     f"{m.get('loadavg_after', '?').split()[0]} | {fd} | {pooled} | {sampler} |")
        if s:
            per.setdefault(n, []).append(s)
    if per:
        lines += ["", "| contender | params | steps/s (timing) | training seeds | FD, mean over seeds and draws "
                  "| FD pooled, mean over seeds |", "|---|---|---|---|---|---|"]
        for n, ss in per.items():
            lines.append(f"| {n} | {timing[n]['n_params']:,} | {timing[n]['steps_per_s']:.2f} | {len(ss)} "
                         f"| {np.mean([s['fd'] for s in ss]):.2f} | {np.mean([s['fd_pooled'] for s in ss]):.2f} |")
    return "\n".join(lines)


def report(saved, args, argv):
    text = render_timing(saved) + "\n\n" + render_quality(saved)
    print(text)
    if args.write_benchmarks:
        from experiments.benchmarks.benchlib import write_section

        write_section("dit-search" if args.search else "dit", text,
                      "python experiments/benchmarks/bench_dit.py " + " ".join(argv or sys.argv[1:]))


if __name__ == "__main__":
    from diffjax import xla_cpu

    xla_cpu.tune()  # XLA:CPU flags and glibc malloc options before JAX starts, as diffjax's CLIs do
    main()
