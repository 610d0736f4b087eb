"""Compiled memory per device of a DiT-XL/2 train step on a pod, from XLA's memory analysis; written into BENCHMARKS.md.

    python experiments/perf/dit_memory.py                      # depths 2, 4 and 28 (~3 min on 2 cores)
    python experiments/perf/dit_memory.py --depths 2,4         # shallow depths only, extrapolated to 28

DiT-XL/2 (Peebles & Xie 2023) on 256x256 images as 32x32x4 latents, 1000 classes, learned sigma
(8 output channels), global batch 256, trained as diffjax's trainer does (``make_train_step``:
the diffusion loss with the hybrid VLB term, AdamW, gradient clipping, EMA), laid out on 8
simulated devices by ``diffjax.sharding`` under fsdp 8 and data 2 x fsdp 2 x model 2. Nothing is
allocated: parameters, optimizer state and batch are ``jax.eval_shape`` / ``ShapeDtypeStruct``
with shardings, and the step is only lowered and compiled (for XLA:CPU, whose buffer
assignment is what ``memory_analysis`` reads; a GPU/TPU compile differs in fusion and in its
temporaries). Bytes are per device: the SPMD program is one device's.

Beside it, the arithmetic a reader can check: the train state is params + Adam's two moments +
the EMA copy = 4 x 4 bytes per parameter, divided by the shards the rule set gives each tensor
(``state / shards``; "16 P / n" if every tensor were split n ways). The full 28 blocks compile in
under a minute per layout on XLA:CPU; every byte count is also extrapolated linearly in the depth
from the two shallowest depths (the blocks are identical), and the fit is checked against each
deeper compiled depth (``--depths 2,4`` alone gives the fit only).
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo root
from diffjax.config import base  # noqa: E402
from diffjax.models import DiT, dit_fields  # noqa: E402
from diffjax.sharding import batch_sharding, make_mesh, tree_shardings  # noqa: E402
from diffjax.training.builders import build_loss, build_optimizer, build_schedule  # noqa: E402
from diffjax.training.state import TrainState  # noqa: E402
from diffjax.training.step import make_train_step  # noqa: E402
from experiments.benchmarks import benchlib  # noqa: E402

LAYOUTS = {"fsdp 8": {"data": 1, "fsdp": 8, "model": 1},
           "data 2 x fsdp 2 x model 2": {"data": 2, "fsdp": 2, "model": 2}}
FULL_DEPTH = dit_fields("XL/2")["depth"]  # 28
FIELDS = ("argument", "output", "alias", "temp", "generated_code")
COLUMNS = FIELDS + ("total",)
SECTION = "dit-memory"


def xl2_config(batch_size: int):
    """The trainer's config for ImageNet-256 latent DiT-XL/2 (paper sec. 5: AdamW, lr 1e-4, no weight decay, EMA 0.9999)."""
    c = base()
    c.diffusion.learned_variance = True
    c.optim.optimizer, c.optim.learning_rate, c.optim.weight_decay, c.optim.ema_decay = "adamw", 1e-4, 0.0, 0.9999
    c.training.batch_size = batch_size
    return c


def compile_step(depth: int, mesh_axes: dict, batch_size: int, min_size: int):
    """Lower and compile the sharded train step of DiT-XL/2 cut to ``depth`` blocks on abstract arrays."""
    c = xl2_config(batch_size)
    module = DiT(**{**dit_fields("XL/2"), "depth": depth}, num_classes=1000, out_channels=8)
    c.model.num_classes = 1000  # the loss drops labels to the null class (cond_drop_prob)
    mesh = make_mesh(mesh_axes, 8)
    x = jnp.zeros((1, 32, 32, 4))
    params = jax.eval_shape(lambda k: module.init(k, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)),
                            jax.random.PRNGKey(0))
    optimizer = build_optimizer(c)
    state = jax.eval_shape(lambda p, k: TrainState.create(p, optimizer, k), params, jax.random.PRNGKey(1))
    shardings = tree_shardings(state, mesh, min_size)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, shardings)
    bs = batch_sharding(mesh)
    batch = {"x": jax.ShapeDtypeStruct((batch_size, 32, 32, 4), jnp.float32, sharding=bs),
             "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=bs)}
    step = make_train_step(build_loss(c, build_schedule(c.diffusion), module), optimizer,
                           ema_decay=c.optim.ema_decay, shardings=shardings, mesh=mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    got = {f: int(getattr(m, f"{f}_size_in_bytes")) for f in FIELDS}
    n_params = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    layout = "split" if params["params"]["block0"]["qkv"]["kernel"].ndim == 3 else "fused"
    state_dev = sum(4 * math.prod(s.shape) // math.prod(mesh.shape[a] for a in _names(sh.spec))
                    for s, sh in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)))
    got["total"] = got["argument"] + got["output"] - got["alias"] + got["temp"]  # live at the peak, donated state once
    return {"depth": depth, "seconds": seconds, "params": n_params, "state_per_device": state_dev, "qkv": layout, **got}


def _names(spec):
    """The mesh axes a PartitionSpec splits over."""
    return [a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)]


def extrapolate(rows: list, depth: int) -> dict:
    """Every byte count as a + b depth through the two shallowest compiled depths, evaluated at ``depth``."""
    r0, r1 = rows[0], rows[1]
    keys = ("params", "state_per_device") + COLUMNS
    return {k: r0[k] + (r1[k] - r0[k]) * (depth - r0["depth"]) / (r1["depth"] - r0["depth"]) for k in keys}


def gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def render(results: dict, depths: list, batch_size: int) -> str:
    """The BENCHMARKS.md text of ``{layout: [compile_step rows, by depth]}``."""
    first = next(iter(results.values()))
    lines = [f"DiT-XL/2 train step (32x32x4 latents, 1000 classes, learned sigma, global batch {batch_size}, "
             f"AdamW + clipping + EMA as `make_train_step`, float32), compiled for 8 simulated XLA:CPU devices; "
             f"bytes per device from `compiled.memory_analysis()`, GiB. `state / shards`: params + 2 Adam moments + "
             f"EMA (16 bytes per parameter) divided by each tensor's shards under the rule set; `16 P / 8`: if all "
             f"were split 8 ways. `temp` holds activations saved for the backward pass, gradients and XLA's "
             f"scratch; `total` = argument + output - alias + temp (the donated state counted once). DiT attention "
             f"in the \"{first[0]['qkv']}\" qkv layout (`ops.QKVAttention`). Depths {', '.join(map(str, depths))} "
             f"compiled; the {FULL_DEPTH}-block row is "
             f"{'compiled' if FULL_DEPTH in depths else 'extrapolated linearly from the first two'}.", "",
             "| layout | depth | params | compile s | argument | output | alias | temp | generated code | "
             "total | state / shards | 16 P / 8 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    checks, full = [], {}
    for name, rows in results.items():
        for r in rows:
            lines.append(f"| {name} | {r['depth']} | {r['params'] / 1e6:.1f}M | {r['seconds']:.0f} | "
                         + " | ".join(gib(r[f]) for f in COLUMNS)
                         + f" | {gib(r['state_per_device'])} | {gib(16 * r['params'] / 8)} |")
        fit = full[name] = extrapolate(rows, FULL_DEPTH)
        lines.append(f"| {name} | **{FULL_DEPTH} (fit)** | {fit['params'] / 1e6:.1f}M | - | "
                     + " | ".join(f"**{gib(fit[f])}**" for f in COLUMNS)
                     + f" | {gib(fit['state_per_device'])} | {gib(16 * fit['params'] / 8)} |")
        for r in rows[2:]:
            at = extrapolate(rows, r["depth"])
            err = max(abs(at[f] - r[f]) / max(r[f], 1) for f in ("argument", "output", "temp"))
            checks.append(f"- {name}: the linear fit through depths {rows[0]['depth']}, {rows[1]['depth']} predicts "
                          f"depth {r['depth']} within {err:.1%} (argument, output, temp).")
    lines += [""] + checks
    fit = next(iter(full.values()))
    reading = [f"- Reading: {fit['params'] / 1e6:.1f}M parameters (the paper's 675M); the train state is "
               f"16 P = {gib(16 * fit['params'])} GiB in all."]
    for name, f in full.items():
        shards = batch_shards_of(LAYOUTS[name])
        reading.append(f"  {name}: state {gib(f['state_per_device'])} GiB per device "
                       f"(= 16 P / {16 * f['params'] / f['state_per_device']:.1f}), {batch_size // shards} examples per "
                       f"device, temp {gib(f['temp'])} GiB ({f['temp'] / f['state_per_device']:.0f}x the state).")
    reading.append("  The float32 activations kept for the backward pass (no rematerialisation) dominate; the model "
                   "axis halves the attention and MLP activations but not the LayerNorm / residual ones (Megatron without "
                   "sequence parallelism), and "
                   "data x fsdp = 4 batch shards hold twice the examples of fsdp 8.")
    return "\n".join(lines + reading)


def batch_shards_of(axes: dict) -> int:
    return axes["data"] * axes["fsdp"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", default="2,4,28", help="compiled depths (the first two give the linear fit)")
    ap.add_argument("--batch-size", type=int, default=256, help="global batch (the paper's 256)")
    ap.add_argument("--min-size", type=int, default=2**14, help="fsdp_min_size of the rule set")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated among {list(LAYOUTS)}")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    depths = sorted({int(d) for d in args.depths.split(",")})
    if len(depths) < 2 or min(depths) < 1:
        ap.error("--depths needs at least two positive depths for the linear fit")
    layouts = [n.strip() for n in args.layouts.split(",") if n.strip()]
    if not layouts or set(layouts) - set(LAYOUTS):
        ap.error(f"--layouts: unknown {sorted(set(layouts) - set(LAYOUTS)) or args.layouts!r}; known: {list(LAYOUTS)}")
    results = {}
    for name in layouts:
        results[name] = []
        for d in depths:
            results[name].append(compile_step(d, LAYOUTS[name], args.batch_size, args.min_size))
            print(name, results[name][-1], flush=True)
    text = render(results, depths, args.batch_size)
    print(text)
    if not args.no_write:
        ensure_section()
        benchlib.write_section(SECTION, text, "python experiments/perf/dit_memory.py " + " ".join(sys.argv[1:]))


def ensure_section():
    """Add this script's heading and result markers to BENCHMARKS.md after the collectives section, once."""
    begin, end = benchlib.markers(SECTION)
    doc = open(benchlib.BENCHMARKS).read()
    if begin in doc:
        return
    anchor = benchlib.markers("collectives")[1]
    if anchor not in doc:
        raise SystemExit(f"{benchlib.BENCHMARKS} lacks {anchor}, after which this section goes")
    block = ("\n\n## Scale-out: DiT-XL/2 train-step memory per device\n\n"
             "`experiments/perf/dit_memory.py` compiles the DiT-XL/2 train step on abstract arrays (nothing "
             "allocated) for 8 simulated devices and reads XLA's memory analysis per device, beside the "
             "arithmetic of the train state (params + Adam moments + EMA over the shards the rule set "
             "gives each tensor).\n\n```\npython experiments/perf/dit_memory.py     # ~3 min on 2 cores\n```\n\n"
             f"{begin}\n{end}")
    with open(benchlib.BENCHMARKS, "w") as f:
        f.write(doc.replace(anchor, anchor + block, 1))


if __name__ == "__main__":
    from diffjax import xla_cpu

    xla_cpu.tune()  # XLA:CPU flags and glibc malloc options before JAX starts, as diffjax's CLIs do
    main()
