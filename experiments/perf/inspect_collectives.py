"""The collectives in the compiled, sharded train step, read from its HLO; written into BENCHMARKS.md.

    python experiments/perf/inspect_collectives.py                  # 8 simulated CPU devices: U-Net and DiT
    python experiments/perf/inspect_collectives.py --models dit     # the digits DiT only

For each mesh layout (data parallel, FSDP, data x fsdp x model) the script compiles the real train
step (``diffjax.training.loop.setup`` + ``make_train_step``: loss, Adam, clipping, EMA) for 8
devices, lists every collective in the optimised HLO (kind, count, element type, bytes, the mesh
axes its device groups span, the jaxpr op it came from) and the bytes one device sends per step
under the usual ring algorithms:

* all-reduce of N bytes over n devices: 2 (n - 1) / n * N;
* reduce-scatter with an N-byte input, all-gather with an N-byte output: (n - 1) / n * N;
* all-to-all / collective-permute: reported, expected 0 (they would mean resharding).

The claims it checks. U-Net (``config.base()``): data parallel = one gradient all-reduce of all
parameters per step (XLA may split it into a few ops; their total must be the parameter bytes) plus
scalars (loss, norms); FSDP = reduce-scatter of the gradients + all-gather of the parameters, no
full all-reduce of them. DiT (``experiments/configs/digits_dit.py``), per block, attributed by op
name: with ``model`` > 1 the Megatron all-reduces over ``model`` (forward: after ``proj``, ``fc2``
and ``adaLN_modulation``; backward: at the inputs of ``qkv`` and ``fc1``), with ``fsdp`` > 1 the
all-gathers of the block's kernels over ``fsdp``, and no all-gather, all-to-all or
collective-permute of token activations.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import re  # noqa: E402
from collections import defaultdict  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo root: `experiments.*` imports resolve when run as a script
from diffjax.config import base  # noqa: E402
from diffjax.models import count_params  # noqa: E402
from diffjax.sharding import MESH_AXES, batch_sharding, path_name  # noqa: E402
from diffjax.training.loop import _train_step_for, setup  # noqa: E402
from experiments.benchmarks import benchlib  # noqa: E402

KINDS = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}
OP = re.compile(r"=\s*(?P<type>.+?)\s+(?P<kind>" + "|".join(KINDS) + r")(?P<start>-start)?\(")
SHAPE = re.compile(r"\b(" + "|".join(BYTES) + r")\[([\d,]*)\]")

LAYOUTS = {
    "data 8 (data parallel)": {"data": 8, "fsdp": 1, "model": 1},
    "fsdp 8 (ZeRO-3)": {"data": 1, "fsdp": 8, "model": 1},
    "data 2 x fsdp 4": {"data": 2, "fsdp": 4, "model": 1},
    "data 2 x fsdp 2 x model 2": {"data": 2, "fsdp": 2, "model": 2},
}


def _iota(dims, perm):
    """Device ids of an iota tile assignment ``[dims]T(perm)``: arange, reshaped to dims, transposed by perm."""
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    return ids.transpose(perm) if perm else ids


def _ints(text):
    return [int(v) for v in text.split(",") if v] if text else []


def replica_groups(line: str, n_devices: int) -> list:
    """The device groups of a collective, from any of XLA's printed forms: ``mesh[...] {axes}`` (with optional
    ``device_ids``), iota ``[g,k]<=[dims]T(perm)``, explicit ``{{0,1},{2,3}}``, or ``source_target_pairs``."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))? \{([^}]*)\}", line)
    if m:
        named = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        names, sizes = [a for a, _ in named], [int(v) for _, v in named]
        ids = (_iota(_ints(m.group(2)), _ints(m.group(3))) if m.group(2) else np.arange(int(np.prod(sizes)))).reshape(sizes)
        vary = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(4))]
        fixed = [i for i in range(len(sizes)) if i not in vary]
        return ids.transpose(fixed + vary).reshape(-1, int(np.prod([sizes[i] for i in vary]))).tolist()
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if m:
        return _iota(_ints(m.group(3)), _ints(m.group(4))).reshape(int(m.group(1)), int(m.group(2))).tolist()
    m = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", line)
    if m and m.group(1) != "{}":
        return [_ints(g) for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    m = re.search(r"source_target_pairs=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", line)
    if m:
        return [_ints(g) for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    return [list(range(n_devices))]


def group_axes(groups: list, mesh_dims: tuple) -> tuple:
    """The mesh axes (``MESH_AXES`` order) along which the devices of the first group differ (device id = mesh position)."""
    coords = np.array([np.unravel_index(d, mesh_dims) for d in groups[0]])
    return tuple(a for i, a in enumerate(MESH_AXES) if len(set(coords[:, i])) > 1)


def group_size(line: str, n_devices: int) -> int:
    """Devices per replica group of a collective."""
    return len(replica_groups(line, n_devices)[0])


def collectives(hlo: str, n_devices: int, mesh_dims: tuple = None):
    """Every collective op of the optimised HLO: kind, result bytes, group size, element types, result shapes,
    the mesh axes its groups span (given ``mesh_dims``) and the jaxpr op name it came from."""
    ops = []
    for line in hlo.splitlines():
        m = OP.search(line)
        if not m or "-done" in line.split("=")[0]:
            continue
        shapes = SHAPE.findall(m.group("type"))
        if m.group("start") and len(shapes) > 1:  # async start returns (operands, outputs): count outputs
            shapes = shapes[len(shapes) // 2:]
        nbytes = sum(BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d] or [1])) for t, dims in shapes)
        groups = replica_groups(line, n_devices)
        name = re.search(r'op_name="([^"]*)"', line)
        ops.append({"kind": m.group("kind"), "bytes": nbytes, "group": len(groups[0]),
                    "types": sorted({t for t, _ in shapes}), "elements": [dims for _, dims in shapes],
                    "axes": group_axes(groups, mesh_dims) if mesh_dims else None,
                    "op_name": name.group(1) if name else ""})
    return ops


def sent_per_device(op) -> float:
    n, b = op["group"], op["bytes"]
    if op["kind"] == "all-reduce":
        return 2 * (n - 1) / n * b
    if op["kind"] == "reduce-scatter":
        return (n - 1) * b  # the result is 1/n of the input: N = n * result bytes
    if op["kind"] == "all-gather":
        return (n - 1) / n * b
    return b


def analyse(name: str, mesh: dict, config):
    c = config.copy_and_resolve_references()
    c.training.mesh.update(mesh)
    run = setup(c)
    step = _train_step_for(run)
    x = jax.ShapeDtypeStruct((c.training.batch_size, *run.spec.shape), np.float32, sharding=batch_sharding(run.mesh))
    batch = {"x": x}
    compiled = step.lower(run.state, batch).compile()
    hlo = compiled.as_text()
    ops = collectives(hlo, run.mesh.size, tuple(run.mesh.shape[a] for a in MESH_AXES))
    param_bytes = 4 * count_params(run.state.params)
    pairs = list(zip(jax.tree.leaves(run.state.params), jax.tree.leaves(run.shardings.params)))
    split = [p for p, s in pairs if any(a is not None for a in s.spec)]
    return {"name": name, "mesh": mesh, "ops": ops, "param_bytes": param_bytes, "sharded_leaves": len(split),
            "leaves": len(pairs), "sharded_bytes_frac": 4 * sum(p.size for p in split) / param_bytes,
            "batch_local": c.training.batch_size // (mesh["data"] * mesh["fsdp"]),
            "param_dims": {d for p in jax.tree.leaves(run.state.params) for d in p.shape},
            "specs": {path_name(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(run.shardings.params)},
            "shapes": {path_name(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(run.state.params)}}


def summarise(res) -> list[str]:
    by_kind = defaultdict(list)
    for op in res["ops"]:
        by_kind[op["kind"]].append(op)
    rows = []
    for kind in KINDS:
        ops = by_kind.get(kind, [])
        if not ops:
            continue
        big = [o for o in ops if o["bytes"] >= 1024]
        small = [o for o in ops if o["bytes"] < 1024]
        groups = sorted({o["group"] for o in ops})
        rows.append(f"| {res['name']} | {kind} | {len(ops)} ({len(big)} >= 1 KiB, {len(small)} small) | "
                    f"{sum(o['bytes'] for o in ops) / 2**20:.3f} | {', '.join(map(str, groups))} | "
                    f"{sum(sent_per_device(o) for o in ops) / 2**20:.3f} |")
    return rows


def verdict(res) -> str:
    ops, P, m = res["ops"], res["param_bytes"], res["mesh"]

    def total(*kinds):
        return sum(o["bytes"] for o in ops if o["kind"] in kinds and o["bytes"] >= 1024)

    reshard = sum(1 for o in ops if o["kind"] in ("all-to-all", "collective-permute"))
    ar, rs, ag = total("all-reduce"), total("reduce-scatter"), total("all-gather")
    sent = sum(sent_per_device(o) for o in ops) / 2**20
    mib = lambda b: f"{b / 2**20:.3f} MiB"  # noqa: E731
    head = f"- **{res['name']}** (sent per device per step {sent:.2f} MiB): "
    if m["fsdp"] == 1 and m["model"] == 1:
        ok = abs(ar - P) / P < 0.01 and rs == 0 and ag == 0 and reshard == 0
        n_ar = sum(1 for o in ops if o["kind"] == "all-reduce" and o["bytes"] >= 1024)
        return head + (f"{n_ar} gradient all-reduce of {mib(ar)} = all parameters ({mib(P)}), no tensor "
                       f"all-gather, no resharding: {'as expected' if ok else 'NOT as expected'}.")
    if m["model"] == 1:
        ok = reshard == 0 and ag > 0
        return head + (f"parameters all-gathered where used ({mib(ag)}: forward and backward), gradients reduced "
                       f"by all-reduce {mib(ar)} + dynamic-slice, reduce-scatter {mib(rs)}; "
                       f"{res['sharded_leaves']} of {res['leaves']} parameter tensors sharded (those >= "
                       f"fsdp_min_size, {res['sharded_bytes_frac']:.0%} of the bytes); no resharding: "
                       f"{'as expected' if ok else 'NOT as expected'}. XLA:CPU has no reduce-scatter creator "
                       f"pass (the GPU pipeline has one), so on CPU the gradient term is an all-reduce; "
                       f"as a reduce-scatter it would send half of it.")
    return head + (f"{reshard} all-to-all / collective-permute ops: resharding. Splitting conv output channels "
                   f"over `model` leaves activations channel-sharded, and GroupNorm (groups of channels), the "
                   f"spatial attention and the skip concatenations need them whole, so XLA moves them. "
                   f"Tensor parallelism of this naive kind does not fit a small conv U-Net (keep model=1); it "
                   f"is for wide Dense layers (DiT).")


BLOCK = re.compile(r"/(block\d+)/(\w+)")


def block_ops(res, block: str):
    """The collectives whose op name lies inside ``block`` (e.g. "block1"): (phase, module, kind, axes, shapes) each,
    gradient reductions (all-reduces of weights over the batch axes, combined across blocks by XLA) left out."""
    out = []
    for o in res["ops"]:
        m = BLOCK.search(o["op_name"])
        if not m or m.group(1) != block:
            continue
        if o["kind"] == "all-reduce" and "model" not in o["axes"] and not any(is_activation(res, e) for e in o["elements"]):
            continue
        phase = "backward" if "transpose(" in o["op_name"] else "forward"
        out.append((phase, m.group(2), o["kind"], o["axes"], tuple(o["elements"])))
    return sorted(out, key=str)


def is_activation(res, shape: str) -> bool:
    """A result whose leading dimension is the per-device batch (chosen to be no parameter dimension)."""
    dims = [int(d) for d in shape.split(",") if d]
    return bool(dims) and dims[0] == res["batch_local"]


def is_tokens(res, shape: str, tokens: int) -> bool:
    """A token activation: (per-device batch, T, ...)."""
    dims = [int(d) for d in shape.split(",") if d]
    return len(dims) >= 3 and dims[0] == res["batch_local"] and dims[1] == tokens


def dit_expectation(res, depth: int, tokens: int):
    """Per block, the expected (Megatron + FSDP) vs found collectives of a DiT step; returns (table row, details, ok)."""
    sig = {b: block_ops(res, f"block{b}") for b in range(depth)}
    mid = 1 if depth > 2 else 0
    ref = sig[mid]
    alike = sum(1 for b in range(depth) if sig[b] == ref)

    def count(phase, kinds, axes=None, what="tokens"):
        test = {"tokens": lambda e: is_tokens(res, e, tokens),
                "example": lambda e: is_activation(res, e) and not is_tokens(res, e, tokens),
                "weight": lambda e: not is_activation(res, e)}[what]
        return sum(sum(1 for e in shapes if test(e)) for ph, mod, k, ax, shapes in ref
                   if (phase is None or ph == phase) and k in kinds and (axes is None or ax == axes))

    tp = res["mesh"]["model"] > 1
    exp_fwd = exp_bwd = 2 if tp else 0  # forward: after proj, fc2; backward: at the inputs of qkv, fc1
    fwd = count("forward", ("all-reduce",), ("model",))
    bwd = count("backward", ("all-reduce",), ("model",))
    moved = count(None, ("all-gather", "all-to-all", "collective-permute"))
    kernels = [n for n, sp in res["specs"].items() if n.startswith(f"params/block{mid}/") and n.endswith("/kernel")
               and "fsdp" in str(sp)]
    gathers = count("forward", ("all-gather",), None, "weight")
    example = count(None, ("all-gather", "all-reduce", "all-to-all", "collective-permute"), None, "example")
    ok = fwd == exp_fwd and bwd == exp_bwd and moved == 0 and gathers == len(kernels)
    row = (f"| {res['name']} | {exp_fwd} / {fwd} | {exp_bwd} / {bwd} | 0 / {moved} | "
           f"{len(kernels)} / {gathers} | {example} | {alike} of {depth} | {'yes' if ok else 'NO'} |")
    detail = [f"  - {ph} `{mod}`: {k} over {'+'.join(ax) or '-'} of {', '.join('[' + x + ']' for x in sh)}"
              for ph, mod, k, ax, sh in ref]
    return row, detail, ok


def dit_config():
    from diffjax.config import load

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    c = load(os.path.join(root, "experiments", "configs", "digits_dit.py"))
    c.training.steps_per_call = 1
    return c


def unet_lines(config, results) -> list:
    P = results[0]["param_bytes"]
    lines = [f"Model: `config.base()` digits U-Net, {P // 4:,} parameters ({P / 2**20:.3f} MiB in f32), global "
             f"batch {config.training.batch_size}, one step (`steps_per_call=1`), 8 simulated CPU devices, "
             f"`fsdp_min_size={config.training.fsdp_min_size}`.", "",
             "| layout | collective | ops | MiB (result) | group sizes | MiB sent per device (ring) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines += summarise(r)
    return lines + ["", "Verdicts:"] + [verdict(r) for r in results]


def dit_lines(config, results) -> list:
    P, mc = results[0]["param_bytes"], config.model
    lines = [f"Model: `experiments/configs/digits_dit.py` DiT ({mc.depth} blocks, width {mc.hidden_size}, "
             f"{mc.num_heads} heads, {(8 // mc.patch_size) ** 2} tokens), {P // 4:,} parameters, global batch "
             f"{config.training.batch_size}, one step, 8 simulated CPU devices, `fsdp_min_size="
             f"{config.training.fsdp_min_size}`; rule set `diffjax.sharding.TRANSFORMER_RULES`; attention in the "
             f"\"{'split' if len(results[0]['shapes']['params/block0/qkv/kernel']) == 3 else 'fused'}\" qkv layout "
             f"(`ops.QKVAttention`).", "",
             "| layout | collective | ops | MiB (result) | group sizes | MiB sent per device (ring) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines += summarise(r)
    lines += ["", "Per block (block 1; ops attributed by their jaxpr op name; gradient reductions over the batch axes, "
              "which XLA combines across blocks, are in the table above), expected / found. Token activations are "
              "(B / shards, T, ...) tensors. Megatron with `model` = 2: the forward pass all-reduces over `model` the "
              "outputs of the row-parallel `proj` and `fc2`, the backward pass the input gradients of the "
              "column-parallel `qkv` and `fc1`; no token activation is gathered or moved. FSDP: each kernel of the "
              "block that the rule set splits over `fsdp` is all-gathered once in the forward pass (XLA keeps it "
              "for the backward pass). Per-example tensors (B / shards, k): the conditioning c and the adaLN "
              "modulation, which XLA may move instead of a weight.", "",
              "| layout | fwd token all-reduces over model | bwd token all-reduces over model | token activations "
              "gathered / moved | fsdp-split kernels gathered | per-example collectives | blocks alike | "
              "as expected |", "|---|---|---|---|---|---|---|---|"]
    details = []
    tokens = (8 // mc.patch_size) ** 2
    for r in results:
        row, detail, _ = dit_expectation(r, mc.depth, tokens)
        lines.append(row)
        details += [f"- {r['name']}:"] + detail
    return lines + ["", "Collectives of that block:"] + details


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    ap.add_argument("--models", default="unet,dit", help="which of unet, dit to compile")
    args = ap.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - {"unet", "dit"}:
        ap.error(f"--models must name unet and/or dit; got {args.models!r}")
    parts = []
    if "unet" in models:
        config = base()
        parts += ["**U-Net**", ""] + unet_lines(config, [analyse(n, m, config) for n, m in LAYOUTS.items()])
    if "dit" in models:
        config = dit_config()
        results = [analyse(n, m, config) for n, m in LAYOUTS.items()]
        bad = results[0]["param_dims"] & {r["batch_local"] for r in results}
        if bad:
            raise SystemExit(f"a per-device batch {sorted(bad)} equals a parameter dimension: pick another batch size")
        parts += ([""] if parts else []) + ["**DiT**", ""] + dit_lines(config, results)
    text = "\n".join(parts)
    print(text)
    if not args.no_write:
        benchlib.write_section("collectives", text, "python experiments/perf/inspect_collectives.py "
                               + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    from diffjax import xla_cpu

    xla_cpu.tune()  # XLA:CPU flags and glibc malloc options before JAX starts, as diffjax's CLIs do
    main()
