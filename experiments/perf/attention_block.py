"""The U-Net's self-attention block, forward + backward: diffjax's ``AttnBlock`` vs the fused-qkv form it replaced vs diffusers.

    python experiments/perf/attention_block.py                      # ~2 min
    python experiments/perf/attention_block.py --write-benchmarks   # also the "attention-block" block of BENCHMARKS.md

Three contenders at the attention shapes of ``bench_train.py`` (one head, 64 channels):
  * diffjax ``AttnBlock`` (``diffjax/models/unet.py``): GroupNorm, three (C, C) projections sliced
    from the "qkv" parameters, ``spatial_attention`` (two batched matmuls, softmax), output Dense,
    residual / sqrt(2);
  * the form it replaced, in the same process: one ``nn.Dense(3 C)``, its output reshaped to
    (B, T, 3, d) and split, ``jax.nn.dot_product_attention``; the same parameters;
  * diffusers' ``Attention`` as ``UNet2DModel`` builds it (GroupNorm, to_q/to_k/to_v, SDPA, to_out,
    residual), eager PyTorch, 2 threads.
Each: ``jit(vjp)`` (JAX) or forward + ``backward`` (torch) with respect to input and parameters,
median of R repeats of N calls; the three interleaved per repeat. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repo root: `experiments.*` imports resolve when run as a script
# (batch, height, width, channels): size B's attention at 16x16 and its middle block at 8x8, size A's at 4x4
SHAPES = [(32, 16, 16, 64), (32, 8, 8, 64), (128, 4, 4, 64)]


def fused_qkv_block():
    """The AttnBlock of diffjax before this change (one fused qkv Dense, jax.nn.dot_product_attention)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from diffjax.models import unet

    class FusedQKVAttnBlock(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            b, h, w, c = x.shape
            y = unet._norm(c, None, "norm")(x, train).reshape(b, h * w, c)
            qkv = nn.Dense(3 * c, kernel_init=unet.default_init(), name="qkv")(y)
            q, k, v = jnp.split(qkv.reshape(b, h * w, 3, c), 3, axis=2)
            a = jax.nn.dot_product_attention(q, k, v).reshape(b, h * w, c)
            out = x + nn.Dense(c, kernel_init=unet._ZERO, name="out")(a).reshape(b, h, w, c)
            return out / math.sqrt(2.0)

    return FusedQKVAttnBlock()


def jax_contenders(shape):
    import jax
    import numpy as np

    from diffjax.models.unet import AttnBlock

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    g = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    params = AttnBlock().init(jax.random.PRNGKey(0), x)  # both blocks take this parameter tree
    # away from the zero-initialised output layer, so that every gradient is nonzero and compared
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(2)
    params = jax.tree.unflatten(tree, [v + 0.1 * rng.standard_normal(v.shape).astype(np.float32) for v in leaves])
    out = {}
    for name, block in (("diffjax AttnBlock", AttnBlock()), ("fused qkv + jax.nn.dot_product_attention", fused_qkv_block())):
        f = jax.jit(lambda p, x, g, block=block: jax.vjp(lambda p, x: block.apply(p, x, train=True), p, x)[1](g))
        out[name] = (lambda f=f: jax.block_until_ready(f(params, x, g)))
    ref = [np.asarray(a) for a in jax.tree.leaves(jax.jit(lambda p, x, g: jax.vjp(
        lambda p, x: fused_qkv_block().apply(p, x, train=True), p, x)[1](g))(params, x, g))]
    new = [np.asarray(a) for a in jax.tree.leaves(jax.jit(lambda p, x, g: jax.vjp(
        lambda p, x: AttnBlock().apply(p, x, train=True), p, x)[1](g))(params, x, g))]
    err = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30)) for a, b in zip(new, ref))
    return out, err


def torch_contender(shape):
    import numpy as np
    import torch
    from diffusers.models.attention_processor import Attention

    torch.set_num_threads(2)
    b, h, w, c = shape
    block = Attention(c, heads=1, dim_head=c, rescale_output_factor=math.sqrt(2.0), eps=1e-6, norm_num_groups=16,
                      residual_connection=True, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True)
    x = torch.tensor(np.random.default_rng(0).standard_normal((b, c, h, w)).astype(np.float32), requires_grad=True)
    g = torch.tensor(np.random.default_rng(1).standard_normal((b, c, h, w)).astype(np.float32))

    def step():
        block.zero_grad(set_to_none=True)
        x.grad = None
        block(x).backward(g)

    return step


def time_all(fns: dict, calls: int, repeats: int) -> dict:
    for f in fns.values():
        f()
        f()
    times = {n: [] for n in fns}
    names = list(fns)
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
            t0 = time.perf_counter()
            for _ in range(calls):
                fns[n]()
            times[n].append((time.perf_counter() - t0) / calls * 1e3)
    return {n: statistics.median(t) for n, t in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--write-benchmarks", action="store_true")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1; got {args.repeats}")
    from diffjax import xla_cpu

    xla_cpu.tune()  # XLA:CPU flags and glibc malloc options before JAX starts, as diffjax's CLIs do

    from experiments.benchmarks.bench_train import cpu_name
    from experiments.benchmarks.benchlib import write_section

    t0 = time.time()
    rows = ["| (B, H, W, C) | tokens | diffjax AttnBlock ms | fused qkv + dot_product_attention ms | diffusers Attention (torch) ms "
            "| speed-up over the fused form | max rel. diff of the gradients |", "|---|---|---|---|---|---|---|"]
    for shape in SHAPES:
        fns, err = jax_contenders(shape)
        fns["diffusers Attention (torch)"] = torch_contender(shape)
        calls = max(1, int(2e6 / (shape[0] * (shape[1] * shape[2]) ** 2)))  # ~2M logits per timed block
        t = time_all(fns, calls, args.repeats)
        new, old, pt = t["diffjax AttnBlock"], t["fused qkv + jax.nn.dot_product_attention"], t["diffusers Attention (torch)"]
        rows.append(f"| {shape} | {shape[1] * shape[2]} | {new:.2f} | {old:.2f} | {pt:.2f} | {old / new:.2f}x | {err:.1e} |")
        print(rows[-1], flush=True)
    text = ("Forward + backward (input and parameter gradients) of one attention block, one head; median of "
            f"{args.repeats} interleaved repeats.\n\n" + "\n".join(rows)
            + f"\n\nMachine: {cpu_name()}, {os.cpu_count()} cores; load average after {os.getloadavg()[0]:.2f}; "
            f"wall {time.time() - t0:.0f} s.")
    print(text)
    if args.write_benchmarks:
        write_section("attention-block", text, "python experiments/perf/attention_block.py")


if __name__ == "__main__":
    main()
