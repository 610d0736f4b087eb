"""Train-step benchmark on CPU: diffjax's jitted step vs its bare forward+backward vs PyTorch + diffusers.

Sizes (the Flax U-Net ``diffjax.models.UNet`` built by ``build_model`` from ``config.base()``):
  A  digits default: 8x8x1, the ``base()`` model fields as they are at run time (printed in the
     table; ch 32, ch_mult (1, 2), 2 res blocks, attention at 4, dropout 0.1 when written), batch 128
  B  CIFAR-like: 32x32x3, ch 32, ch_mult (1, 2, 2), 1 res block, attention at 16, batch 32: the
     cheapest network in the range ch 32..64 / 1..2 res blocks with attention at 16 (DDPM's
     CIFAR attention resolution). diffjax runs it at ~0.35-0.5 steps/s on an idle 2-core EPYC (and
     torch at ~1.4), so 7 repeats stay within minutes; anything larger would not.

Contenders, all fed the same fixed host arrays (a pool of 4 uniform [-1, 1] batches, one
transferred per step: ``global_batch`` for JAX, ``torch.from_numpy`` of an NCHW copy for torch):
  jax_step   the real step: ``make_train_step(build_loss(...), build_optimizer(...), ema_decay,
             shardings, mesh)`` on a 1-device mesh; jitted, state donated; eps-MSE loss
             (antithetic t, dropout), Adam + warm-up + global-norm clipping, EMA (all ``base()``).
  jax_step_fused  the same step with ``steps_per_call=4``: four steps per call in one ``lax.scan``
             over a stack of four batches (``training.steps_per_call``); per-step time = call / 4.
  jax_bare   ``jit(value_and_grad(loss_fn))`` of the same loss w.r.t. the same params (no
             optimizer, no EMA, no donation).
  jax_update the rest of the step alone: ``optimizer.update`` + ``apply_updates`` + ``ema_update`` on
             a fixed gradient tree (jitted, state donated); a breakdown, not a target.
  torch_step eager PyTorch, ``torch.set_num_threads(2)``: diffusers ``UNet2DModel`` laid out like
             the Flax U-Net (``experiments/benchmarks/peers/diffusers_train_peer.py``), same loss, schedule,
             Adam hyper-parameters + ``LambdaLR`` warm-up, ``clip_grad_norm_``, ``_foreach_lerp_`` EMA.
  torch_bare the same forward + backward only (its own overhead ratio, for comparison).

The torch peer runs in its own process (JSON lines over a pipe), so the two runtimes never share
thread pools; the driver interleaves the contenders (order rotated every repeat) so load drift
hits all of them alike. Each repeat times N back-to-back steps (JAX: dispatch all, then
``block_until_ready``); reported: median and min-max over repeats of the per-step time. JAX
compilation is excluded from the timings and reported separately (first call minus the median
step). No persistent compilation cache, so the compile figures are real.

Targets: overhead = jax_step / jax_bare <= 1.1; speed-up = torch_step / jax_step >= 1.3.

Work and rate: the FLOPs of one forward + backward (XLA's cost analysis of the compiled bare program;
the diffusers model has the same layers) over each contender's time give its GFLOP/s, set against the
best f32 GEMM rate measured in the run (a 2048^3 matmul in XLA and in torch, probed before and
after the timings): how much of the machine's attainable rate a step already uses, and how much the
1.3x target would ask for.

Commands:
  python experiments/benchmarks/bench_train.py --quick   # ~2-3 min on a quiet 2-core machine; writes
                                              # results/bench_train_quick.{json,md}, not BENCHMARKS.md
  python experiments/benchmarks/bench_train.py           # full (<= ~15 min): results/bench_train.json and the
                                              # "train" section of BENCHMARKS.md
Options: --sizes A,B  --repeats R  --steps-a N  --steps-b N  --threads 2  --no-torch
         --write-benchmarks (also write BENCHMARKS.md from a --quick run)
         --kernels-ab (also the step and fwd+bwd on the default model ops, kernels="xla", interleaved with
                       the CPU-kernel ones; results/bench_train_kernels.* and BENCHMARKS.md's train-kernels section)
Run it on an otherwise idle machine. The CPU time other processes take during every timed run
(machine busy time from /proc/stat minus the contender's own) is recorded and shown, and the
table is marked contaminated above 0.25 cores. XLA_FLAGS, if set, is recorded in the json.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repo root: `experiments.*` imports resolve when run as a script
from experiments.benchmarks.benchlib import machine_busy_s, parse_sizes, write_section  # noqa: E402

from diffjax.config import base
from diffjax.models import count_params, init_params, resolve_kernels
from diffjax.training import TrainState, global_batch, make_mesh, make_train_step, shard_state, state_shardings
from diffjax.training.builders import build_loss, build_model, build_optimizer, build_schedule
from diffjax.training.state import ema_update, make_optimizer

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
PEER = os.path.join(HERE, "peers", "diffusers_train_peer.py")
POOL = 4  # fixed host batches, cycled
REPLY = "@@peer "  # the peer's reply-line prefix (diffusers_train_peer.REPLY; not imported: that imports torch)

SIZES = {
    "A": dict(label="digits default, 8x8x1", resolution=8, channels=1, batch=128, model={}),
    "B": dict(label="CIFAR-like, 32x32x3", resolution=32, channels=3, batch=32,
              model=dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,))),
}
# steps per timed repeat, (quick, full); repeats (quick, full)
STEPS = {"A": (4, 20), "B": (4, 8)}  # multiples of FUSED
FUSED = 4  # steps per call of the jax_step_fused contender (training.steps_per_call)
REPEATS = (2, 7)
TARGET_OVERHEAD, TARGET_SPEEDUP = 1.1, 1.3
JAX_CONTENDERS = ("jax_bare", "jax_step", "jax_step_fused", "jax_update")
XLA_CONTENDERS = ("xla_jax_bare", "xla_jax_step")  # --kernels-ab: the default-ops model (kernels="xla")
GEMM_N, GEMM_REPEATS = 2048, 10  # the attainable-rate probe: one large f32 matmul, best of 10 calls
CONTAMINATED = 0.25  # cores used by other processes during a timed run above which the run is flagged


def make_config(size: str, objective: str = "eps", kernels: str = "auto"):
    """``base()`` with the size's model fields, batch, regression target (prediction = objective) and model ops.

    Everything else (schedule, antithetic t, dropout, optimizer, warm-up, clipping, EMA) is read from
    ``base()`` at run time, and the torch peer is configured from the same values.
    """
    c = base()
    s = SIZES[size]
    for k, v in s["model"].items():
        c.model[k] = v
    c.model.kernels = kernels
    c.training.batch_size = s["batch"]
    d = c.diffusion
    d.prediction = d.objective = objective
    d.min_snr_gamma = None  # the peer's plain MSE on the target
    # what the torch peer re-implements; fail loudly if base() moves outside it
    if d.schedule != "vp_linear" or d.learned_variance or c.model.num_classes is not None \
            or c.optim.optimizer != "adam" or c.model.name != "unet":
        raise SystemExit(f"the torch peer implements an unconditional U-Net, vp_linear, Adam; base() has "
                         f"{c.model.name}, {d.schedule}, learned_variance={d.learned_variance}, "
                         f"num_classes={c.model.num_classes}, {c.optim.optimizer}")
    return c


def host_batches(size: str, seed: int) -> np.ndarray:
    """The fixed host data, (POOL, batch, H, W, C) float32 uniform in [-1, 1] (content does not affect speed)."""
    s = SIZES[size]
    shape = (POOL, s["batch"], s["resolution"], s["resolution"], s["channels"])
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)


def peer_spec(size: str, config, schedule, data_path: str) -> dict:
    """Everything the torch peer needs, read from the same config (Adam betas/eps: make_optimizer's defaults)."""
    s, m, o, d = SIZES[size], config.model, config.optim, config.diffusion
    adam = {k: inspect.signature(make_optimizer).parameters[k].default for k in ("b1", "b2", "eps")}
    return dict(resolution=s["resolution"], channels=s["channels"], batch=s["batch"], data_path=data_path,
                seed=config.seed, ch=m.ch, ch_mult=list(m.ch_mult),
                num_res_blocks=m.num_res_blocks, attn_resolutions=list(m.attn_resolutions), dropout=m.dropout,
                beta_min=d.beta_min, beta_max=d.beta_max, t_eps=float(schedule.t_min), objective=d.objective,
                antithetic=bool(d.antithetic),
                learning_rate=o.learning_rate, warmup_steps=o.warmup_steps, grad_clip=o.grad_clip,
                ema_decay=o.ema_decay, **adam)


class JaxContenders:
    """The diffjax step, the bare forward+backward and the update-only part for one size."""

    def __init__(self, size: str, host: np.ndarray, objective: str, kernels: str = "auto"):
        c = self.config = make_config(size, objective, kernels)
        s = SIZES[size]
        module = build_model(c)
        self.schedule = build_schedule(c.diffusion)
        loss_fn = build_loss(c, self.schedule, module)
        optimizer = build_optimizer(c)
        self.mesh = make_mesh(num_devices=1)
        k_init, k_run = jax.random.split(jax.random.PRNGKey(c.seed))
        t0 = time.perf_counter()
        params = init_params(module, k_init, (1, s["resolution"], s["resolution"], s["channels"]))
        self.init_s = time.perf_counter() - t0
        self.n_params = count_params(params)
        state = TrainState.create(params, optimizer, k_run)
        self.shardings = state_shardings(state, self.mesh)
        self.state = shard_state(state, self.shardings)
        self.step_fn = make_train_step(loss_fn, optimizer, ema_decay=c.optim.ema_decay, shardings=self.shardings,
                                       mesh=self.mesh, steps_per_call=1)
        # the same step, FUSED steps per call (lax.scan over a stack of batches); its own state copy
        # (copies of params and key: the other step donates its state, whose buffers may be these)
        self.state_fused = shard_state(TrainState.create(jax.tree.map(jnp.copy, params), optimizer,
                                                         jnp.copy(k_run)), self.shardings)
        self.step_fused = make_train_step(loss_fn, optimizer, ema_decay=c.optim.ema_decay, shardings=self.shardings,
                                          mesh=self.mesh, steps_per_call=FUSED)
        self.host = host
        self.i = 0

        # bare forward + backward of the same loss; a fresh key per step as the step draws one.
        # Copies: the step donates the state's buffers, which device_put / asarray may share.
        self.params = jax.tree.map(jnp.copy, jax.device_put(params, self.shardings.params))
        self.bare_key = jnp.copy(k_run)
        self.bare_fn = jax.jit(lambda p, b, key, i: jax.value_and_grad(loss_fn, has_aux=True)(
            p, b, jax.random.fold_in(key, i)))

        # the remainder of one_step in diffjax.training.step: optimizer update, apply, EMA
        decay = c.optim.ema_decay

        def update(params, ema, opt_state, grads):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            new = optax.apply_updates(params, updates)
            return new, ema_update(ema, new, decay), opt_state

        self.update_fn = jax.jit(update, donate_argnums=(0, 1, 2))
        self.upd = (jax.tree.map(jnp.copy, self.params), jax.tree.map(jnp.copy, self.params),
                    optimizer.init(self.params))
        self.grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), self.params)
        self.first_call_s = {}

    def _batch(self):
        x = self.host[self.i % POOL]
        self.i += 1
        return global_batch({"x": x}, self.mesh)

    def _stack(self):
        x = self.host[np.arange(self.i, self.i + FUSED) % POOL]
        self.i += FUSED
        return global_batch({"x": x}, self.mesh, stacked=True)

    def warm(self, contenders=JAX_CONTENDERS):
        """First call of each function (compile + one step), then one more call each."""
        for what in contenders:
            t0 = time.perf_counter()
            self.run(what, FUSED if what == "jax_step_fused" else 1)
            self.first_call_s[what] = time.perf_counter() - t0
            self.run(what, FUSED if what == "jax_step_fused" else 1)
        loss = float(self.last_metrics["loss"][0])
        if not np.isfinite(loss):
            raise SystemExit(f"non-finite loss {loss} in the diffjax step")

    def run(self, what: str, n: int) -> tuple:
        """(wall, process CPU) seconds per step over n back-to-back calls, blocking once at the end."""
        c0, t0 = time.process_time(), time.perf_counter()
        if what == "jax_step":
            state, metrics = self.state, None
            for _ in range(n):
                state, metrics = self.step_fn(state, self._batch())
            jax.block_until_ready((state, metrics))
            self.state, self.last_metrics = state, metrics
        elif what == "jax_step_fused":
            if n % FUSED:
                raise ValueError(f"jax_step_fused runs steps in calls of {FUSED}; got n={n}")
            state, metrics = self.state_fused, None
            for _ in range(n // FUSED):
                state, metrics = self.step_fused(state, self._stack())
            jax.block_until_ready((state, metrics))
            self.state_fused = state
        elif what == "jax_bare":
            out = None
            for _ in range(n):
                out = self.bare_fn(self.params, self._batch(), self.bare_key, np.int32(self.i))
            jax.block_until_ready(out)
        elif what == "jax_update":
            upd = self.upd
            for _ in range(n):
                upd = self.update_fn(*upd, self.grads)
            self.upd = jax.block_until_ready(upd)
        else:
            raise ValueError(what)
        return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


class TorchPeer:
    """The diffusers peer in a subprocess, one JSON line per request."""

    def __init__(self, python: str, threads: int):
        self.proc = subprocess.Popen([python, PEER, "--serve", "--threads", str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info = self._read()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                msg = json.loads(line[len(REPLY):])
                if "error" in msg:
                    raise RuntimeError(f"torch peer: {msg['error']}")
                return msg
        raise RuntimeError(f"torch peer exited with code {self.proc.wait()}")

    def ask(self, **msg):
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        try:
            self.ask(cmd="quit")
        except (RuntimeError, BrokenPipeError):
            pass  # the peer already exited (e.g. after an error it reported); just reap it
        self.proc.wait(timeout=30)


def gemm_gflops(n: int = GEMM_N, repeats: int = GEMM_REPEATS) -> list:
    """GFLOP/s of a jitted n x n x n f32 matmul per timed call (XLA:CPU's Eigen GEMM, every core XLA sees)."""
    f = jax.jit(jnp.matmul)
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n))
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n))
    for _ in range(3):
        f(a, b).block_until_ready()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return rates


def step_gflop(jx) -> float:
    """FLOPs of one forward + backward of the size's model (XLA's cost analysis of the compiled bare program), in G.

    The diffusers model has the same layers (parameter counts within ~1%), so the same count serves
    as the work of either runtime's step; the optimizer and EMA add ~10 FLOPs per parameter.
    """
    cost = jx.bare_fn.lower(jx.params, jx._batch(), jx.bare_key, np.int32(0)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) / 1e9


def _nanmax(xs):
    xs = [x for x in xs if np.isfinite(x)]
    return max(xs) if xs else float("nan")


def summarize(times):
    return dict(median_s=statistics.median(times), min_s=min(times), max_s=max(times), per_repeat_s=times)


def prepare(size: str, objective: str):
    """The size's config, its host data (also saved for the peer) and the peer's spec."""
    config = make_config(size, objective)
    host = host_batches(size, config.seed)
    data_dir = os.path.join(tempfile.gettempdir(), "diffjax_bench_train")  # not under results/: not for git
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, f"host_batches_{size}.npy")
    np.save(path, host)
    return config, host, peer_spec(size, config, build_schedule(config.diffusion), path)


def bench_size(size, quick, repeats, steps, peer, log, objective, kernels_ab=False):
    s = SIZES[size]
    config, host, spec = prepare(size, objective)
    log(f"[{size}] {s['label']}, batch {s['batch']}, model {dict(config.model)}: building diffjax model + step")
    jx = JaxContenders(size, host, objective)
    t0 = time.perf_counter()
    jx.warm()
    log(f"[{size}] diffjax params {jx.n_params:,}; init {jx.init_s:.1f}s; first calls (compile + 1 step) "
        + ", ".join(f"{k} {v:.1f}s" for k, v in jx.first_call_s.items()) + f" (warm-up {time.perf_counter() - t0:.0f}s)")
    runners = {w: (lambda w=w, n=steps: jx.run(w, n)) for w in JAX_CONTENDERS}
    if kernels_ab:  # the same step and fwd+bwd on the default (stock lax / Flax) ops, interleaved with the rest
        xla = JaxContenders(size, host, objective, kernels="xla")
        t0 = time.perf_counter()
        xla.warm([w[len("xla_"):] for w in XLA_CONTENDERS])
        log(f"[{size}] kernels=xla first calls " + ", ".join(f"{k} {v:.1f}s" for k, v in xla.first_call_s.items())
            + f" (warm-up {time.perf_counter() - t0:.0f}s)")
        for w in XLA_CONTENDERS:
            runners[w] = lambda w=w, n=steps: xla.run(w[len("xla_"):], n)
    torch_info = None
    if peer is not None:
        torch_info = peer.ask(cmd="setup", name=size, spec=spec, warmup=1 if quick else 3)
        log(f"[{size}] torch params {torch_info['n_params']:,} (diffjax/torch = "
            f"{jx.n_params / torch_info['n_params']:.4f}); setup + warm-up {torch_info['setup_s']:.1f}s")
        def torch_runner(what):
            def run():
                reply = peer.ask(cmd="run", name=size, what=what, n=steps)
                return reply["per_step_s"], reply["cpu_per_step_s"]
            return run

        runners["torch_step"], runners["torch_bare"] = torch_runner("step"), torch_runner("bare")
    order = list(runners)
    times, cpu, other = ({w: [] for w in order} for _ in range(3))
    for r in range(repeats):
        rot = order[r % len(order):] + order[:r % len(order)]
        for w in rot:
            b0, t0 = machine_busy_s(), time.perf_counter()
            wall, c = runners[w]()
            window = time.perf_counter() - t0
            times[w].append(wall)
            cpu[w].append(c)
            # only one contender runs at a time: the rest of the machine's busy time is someone else's
            busy = machine_busy_s() - b0 - c * steps  # /proc/stat ticks are 10 ms: skip runs under 1 s
            other[w].append(max(0.0, busy) / window if np.isfinite(busy) and window >= 1.0 else float("nan"))
        log(f"[{size}] repeat {r + 1}/{repeats}: " + ", ".join(f"{w} {times[w][-1] * 1e3:.1f}" for w in order)
            + " ms/step; other processes " + ", ".join(f"{other[w][-1]:.2f}" for w in order) + " cores")
    res = dict(size=size, label=s["label"], batch=s["batch"], shape=[s["resolution"], s["resolution"], s["channels"]],
               model_fields=config.model.to_dict(), steps_per_repeat=steps, repeats=repeats,
               diffjax_params=jx.n_params, init_s=jx.init_s, first_call_s=jx.first_call_s,
               timings={w: dict(summarize(v), cpu_median_s=statistics.median(cpu[w]), cpu_per_repeat_s=cpu[w],
                                other_cores_per_repeat=other[w], other_cores_max=_nanmax(other[w]))
                        for w, v in times.items()}, peer_spec=spec)
    med = {w: v["median_s"] for w, v in res["timings"].items()}
    res["compile_s"] = {w: jx.first_call_s[w] - med[w] for w in jx.first_call_s}
    res["kernels"] = resolve_kernels(config.model.kernels)
    if kernels_ab:
        res["compile_s"].update({"xla_" + w: xla.first_call_s[w] - med["xla_" + w] for w in ("jax_step", "jax_bare")})
        res["xla_over_cpu_step"] = med["xla_jax_step"] / med["jax_step"]
        res["xla_over_cpu_step_paired"] = [a / b for a, b in zip(times["xla_jax_step"], times["jax_step"])]
    res["step_gflop"] = step_gflop(jx)
    res["overhead"] = med["jax_step"] / med["jax_bare"]
    res["overhead_paired"] = [a / b for a, b in zip(times["jax_step"], times["jax_bare"])]
    res["update_fraction"] = med["jax_update"] / med["jax_step"]
    if peer is not None:
        res.update(torch_params=torch_info["n_params"], torch_config=torch_info["config"],
                   torch_adam_flags=torch_info.get("adam_flags"),
                   param_ratio=jx.n_params / torch_info["n_params"],
                   speedup=med["torch_step"] / med["jax_step"],
                   speedup_fused=med["torch_step"] / med["jax_step_fused"],
                   speedup_paired=[a / b for a, b in zip(times["torch_step"], times["jax_step"])],
                   torch_overhead=med["torch_step"] / med["torch_bare"])
    return res


def fmt(results, meta):
    names = {"jax_step": "diffjax train step", "jax_step_fused": f"diffjax train step, {FUSED} per call (lax.scan)",
             "jax_bare": "diffjax bare fwd+bwd (jit value_and_grad)",
             "jax_update": "diffjax optimizer+EMA alone (breakdown)", "torch_step": "PyTorch+diffusers train step",
             "torch_bare": "PyTorch+diffusers bare fwd+bwd",
             "xla_jax_step": "diffjax train step, default ops (kernels=xla)",
             "xla_jax_bare": "diffjax bare fwd+bwd, default ops (kernels=xla)"}
    lines = []
    for r in results:
        m = r["model_fields"]
        lines.append(f"**{r['size']}: {r['label']}, batch {r['batch']}** (ch {m['ch']}, ch_mult {tuple(m['ch_mult'])}, "
                     f"{m['num_res_blocks']} res block(s), attention at {tuple(m['attn_resolutions'])}, dropout "
                     f"{m['dropout']}; {r['peer_spec']['objective']}-MSE) — diffjax UNet {r['diffjax_params']:,} params"
                     + (f", diffusers UNet2DModel {r['torch_params']:,} params (ratio {r['param_ratio']:.3f})"
                        if "torch_params" in r else "")
                     + f"; {r['repeats']} repeats x {r['steps_per_repeat']} steps.")
        lines += ["", "| contender | median ms/step | min-max ms/step | steps/s (median) | GFLOP/s (fwd+bwd work) "
                      "| own CPU ms/step (median) | other processes, cores (max over repeats) |",
                  "|---|---|---|---|---|---|---|"]
        for w, t in r["timings"].items():
            rate = "-" if w == "jax_update" else f"{r['step_gflop'] / t['median_s']:.0f}"
            lines.append(f"| {names[w]} | {t['median_s'] * 1e3:.1f} | {t['min_s'] * 1e3:.1f}-{t['max_s'] * 1e3:.1f} | "
                         f"{1 / t['median_s']:.2f} | {rate} | {t['cpu_median_s'] * 1e3:.0f} | "
                         f"{'-' if np.isnan(t['other_cores_max']) else format(t['other_cores_max'], '.2f')} |")
        pr = r["overhead_paired"]
        lines += ["", f"- Model ops of the rows not marked otherwise: kernels={r['kernels']}."]
        if "xla_over_cpu_step" in r:
            q = r["xla_over_cpu_step_paired"]
            lines.append(f"- Default ops (kernels=xla) / CPU kernels, train step = **{r['xla_over_cpu_step']:.3f}** "
                         f"(per-repeat {min(q):.3f}-{max(q):.3f}; > 1: the CPU kernels are faster); compile: step "
                         f"{r['compile_s']['xla_jax_step']:.1f} s, bare {r['compile_s']['xla_jax_bare']:.1f} s.")
        lines += [f"- JAX compile (first call minus median step): step {r['compile_s']['jax_step']:.1f} s, "
                      f"bare {r['compile_s']['jax_bare']:.1f} s; optimizer+EMA alone = "
                      f"{100 * r['update_fraction']:.1f}% of the step."]
        ok = r["overhead"] <= TARGET_OVERHEAD
        lines.append(f"- Overhead step/bare = **{r['overhead']:.3f}** (per-repeat {min(pr):.3f}-{max(pr):.3f}); "
                     f"target <= {TARGET_OVERHEAD}: **{'met' if ok else 'not met'}**.")
        if "speedup" in r:
            sp = r["speedup_paired"]
            ok = r["speedup"] >= TARGET_SPEEDUP
            lines.append(f"- Speed-up torch/diffjax step = **{r['speedup']:.2f}x** (per-repeat {min(sp):.2f}-"
                         f"{max(sp):.2f}x); target >= {TARGET_SPEEDUP}x: **{'met' if ok else 'not met'}**. "
                         f"(torch's own step/bare = {r['torch_overhead']:.3f}.)")
            lines.append(f"- With {FUSED} steps fused per call (`training.steps_per_call={FUSED}`): speed-up "
                         f"**{r['speedup_fused']:.2f}x**, step/bare {r['timings']['jax_step_fused']['median_s'] / r['timings']['jax_bare']['median_s']:.3f}.")
            peak = max(max(v) for v in meta["gemm_gflops"].values() if v)
            need = r["timings"]["torch_step"]["median_s"] / TARGET_SPEEDUP
            lines.append(f"- Work and rate: one fwd+bwd is {r['step_gflop']:.1f} GFLOP (XLA's cost analysis); the best f32 "
                         f"GEMM rate measured in this run is {peak:.0f} GFLOP/s ({GEMM_N}^3 matmul, XLA and torch). "
                         f"torch's step runs at {r['step_gflop'] / r['timings']['torch_step']['median_s']:.0f} GFLOP/s "
                         f"({100 * r['step_gflop'] / r['timings']['torch_step']['median_s'] / peak:.0f}% of it); "
                         f"{TARGET_SPEEDUP}x would need <= {need * 1e3:.0f} ms/step, i.e. "
                         f"{r['step_gflop'] / need:.0f} GFLOP/s = **{100 * r['step_gflop'] / need / peak:.0f}% of the "
                         f"GEMM rate** for the whole step (its 3x3 convolutions, GroupNorms, attention and updates).")
        lines.append("")
    over = ", ".join(f"{r['size']} {r['overhead']:.3f} ({'met' if r['overhead'] <= TARGET_OVERHEAD else 'not met'})"
                     for r in results)
    lines.append(f"Verdict, overhead step / bare fwd+bwd <= {TARGET_OVERHEAD}: {over}.")
    if all("speedup" in r for r in results):
        sp = ", ".join(f"{r['size']} {r['speedup']:.2f}x ({'met' if r['speedup'] >= TARGET_SPEEDUP else 'not met'})"
                       for r in results)
        lines.append(f"Verdict, speed-up over PyTorch+diffusers >= {TARGET_SPEEDUP}x: {sp}.")
    lines.append("")
    la0, la1 = meta["loadavg_before"], meta["loadavg_after"]
    worst = _nanmax([t["other_cores_max"] for r in results for t in r["timings"].values()])
    meta["other_cores_max"] = worst
    lines.append(f"Machine: {meta['cpu']}, {meta['cpu_count']} cores; JAX {meta['jax']} ({meta['backend']}), "
                 + (f"torch {meta['torch']['torch']} ({meta['torch']['torch_threads']} threads), diffusers "
                    f"{meta['torch']['diffusers']}; " if meta.get("torch") else "")
                 + f"load average before {la0[0]:.2f}/{la0[1]:.2f}/{la0[2]:.2f}, after {la1[0]:.2f}/{la1[1]:.2f}/"
                 f"{la1[2]:.2f} (1/5/15 min); other processes used {meta['other_cores_idle_check']:.2f} cores in "
                 f"the 3 s before the run and up to {worst:.2f} cores during a timed run; wall "
                 f"{meta['wall_s'] / 60:.1f} min.")
    if not worst <= CONTAMINATED:
        lines.append(f"\n**Contaminated: other processes used more than {CONTAMINATED} of the {meta['cpu_count']} "
                     f"cores during timed runs; these numbers are not a valid comparison.**")
    return "\n".join(lines)


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # no /proc (not Linux): fall back to what platform knows
    return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default="A,B")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--steps-a", type=int)
    ap.add_argument("--steps-b", type=int)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (JAX uses every core XLA sees)")
    ap.add_argument("--torch-python", default=sys.executable)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--objective", choices=("eps", "v"), default="eps",
                    help="regression target (prediction = objective) for both; default eps-MSE")
    ap.add_argument("--write-benchmarks", action="store_true", help="write BENCHMARKS.md also from --quick")
    ap.add_argument("--kernels-ab", action="store_true",
                    help="also time the step and fwd+bwd on the default model ops (kernels=xla), interleaved; "
                         "writes the train-kernels section of BENCHMARKS.md instead of train")
    ap.add_argument("--dump-specs", metavar="PATH", help="only write the peer specs (JSON) + host data and exit; "
                    "for diffusers_train_peer.py --spec PATH")
    args = ap.parse_args()
    mode = "quick" if args.quick else "full"
    repeats = args.repeats or REPEATS[not args.quick]
    steps = {k: v[not args.quick] for k, v in STEPS.items()}
    steps["A"] = args.steps_a or steps["A"]
    steps["B"] = args.steps_b or steps["B"]
    sizes = parse_sizes(ap, args.sizes, SIZES)

    if args.dump_specs:
        json.dump({s: prepare(s, args.objective)[2] for s in sizes}, open(args.dump_specs, "w"), indent=1)
        print(f"wrote {args.dump_specs}")
        return
    t_start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)  # noqa: E731
    meta = dict(mode=mode, jax=jax.__version__, backend=jax.default_backend(), devices=str(jax.devices()),
                cpu=cpu_name(), cpu_count=os.cpu_count(), loadavg_before=os.getloadavg(),
                xla_flags=os.environ.get("XLA_FLAGS", ""), command=" ".join(["python"] + sys.argv))
    b0 = machine_busy_s()
    time.sleep(3.0)
    meta["other_cores_idle_check"] = (machine_busy_s() - b0) / 3.0
    log(f"load average {meta['loadavg_before']}; other processes busy {meta['other_cores_idle_check']:.2f} cores")
    peer = None if args.no_torch else TorchPeer(args.torch_python, args.threads)
    if peer is not None:
        meta["torch"] = peer.info
    try:
        gemm = {"xla": [], "torch": []}

        def probe_gemm():
            gemm["xla"] += gemm_gflops()
            if peer is not None:
                gemm["torch"] += peer.ask(cmd="gemm", n=GEMM_N, repeats=GEMM_REPEATS)["gflops"]

        probe_gemm()
        results = [bench_size(s, args.quick, repeats, steps[s], peer, log, args.objective, args.kernels_ab)
                   for s in sizes]
        probe_gemm()  # again at the end: the best of both probes is the rate the host allowed
        meta["gemm_gflops"] = gemm
        log("f32 GEMM %d^3 best GFLOP/s: " % GEMM_N + ", ".join(f"{k} {max(v):.1f}" for k, v in gemm.items() if v))
    finally:
        if peer is not None:
            peer.close()
    meta["loadavg_after"] = os.getloadavg()
    meta["wall_s"] = time.perf_counter() - t_start
    text = fmt(results, meta)
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    stem = ("bench_train" if mode == "full" else "bench_train_quick") + ("_kernels" if args.kernels_ab else "")
    json.dump(dict(meta=meta, results=results), open(os.path.join(RESULTS, stem + ".json"), "w"), indent=1)
    open(os.path.join(RESULTS, stem + ".md"), "w").write(text + "\n")
    if mode == "full" or args.write_benchmarks:
        write_section("train-kernels" if args.kernels_ab else "train", text, meta["command"])


if __name__ == "__main__":
    from diffjax import xla_cpu

    xla_cpu.tune()  # XLA:CPU flags and glibc malloc options before JAX starts, as diffjax's CLIs do
    main()
