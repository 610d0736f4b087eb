"""PyTorch + diffusers peer of diffjax's train step (for experiments/benchmarks/bench_train.py).

The network is diffusers' ``UNet2DModel`` laid out like diffjax's ``UNet`` (``unet_config``): the
same channels per level, ``num_res_blocks`` resnets per level down and one more up, BigGAN-style
resnet down/upsampling (diffjax ``resblock_updown=True``), one-head self-attention after every resnet
of the levels in ``attn_resolutions`` and in the middle block, time embedding of width 4 ch on
``ch`` sinusoidal features of 1000 t, GroupNorm eps 1e-6, dropout in every resnet. Left different
(cost-neutral or nearly): 8 GroupNorm groups everywhere (diffjax: min(32, C // 4) per norm), no
1/sqrt(2) skip rescale, and no 1x1 skip conv in the up/down resnets (diffjax, like score_sde's
ResnetBlockBigGANpp, has one there: the 1.1% parameter difference at size B).

The train step is what a researcher writes in eager PyTorch, with diffjax's default settings:
t uniform on [t_eps, 1] (antithetic pairs), eps ~ N(0, I), x_t = alpha(t) x0 + sigma(t) eps on the
VP-linear schedule (beta_min, beta_max), eps-MSE (or v-MSE) loss, ``torch.optim.Adam`` with a linear warm-up
(``LambdaLR``), ``clip_grad_norm_`` and an EMA of the weights by ``torch._foreach_lerp_``.

Two ways to run it:
  python experiments/benchmarks/bench_train.py --dump-specs /tmp/specs.json     # specs + host data, then standalone:
  python experiments/benchmarks/peers/diffusers_train_peer.py --spec /tmp/specs.json [--steps 10 --repeats 3]
  python experiments/benchmarks/peers/diffusers_train_peer.py --serve   # JSON lines on stdin/stdout, driven by
                                                           # bench_train.py to interleave contenders
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import diffusers
from diffusers import UNet2DModel

REPLY = "@@peer "  # reply lines start with this (bench_train.TorchPeer); any other stdout line is ignored


def unet_config(spec: dict) -> dict:
    """UNet2DModel kwargs mirroring diffjax's UNet fields in ``spec`` (see the module docstring)."""
    ch, mult = spec["ch"], tuple(spec["ch_mult"])
    res = [spec["resolution"] // 2**i for i in range(len(mult))]
    attn = [i for i, r in enumerate(res) if r in tuple(spec["attn_resolutions"])]
    attn_ch = {ch * mult[i] for i in attn} | {ch * mult[-1]}  # attention levels and the middle block
    if len(attn_ch) != 1:
        raise ValueError(f"one attention head everywhere needs equal channels at every attention; got {attn_ch}")
    down = tuple("AttnDownBlock2D" if i in attn else "ResnetDownsampleBlock2D" for i in range(len(mult)))
    up = tuple("AttnUpBlock2D" if i in attn else "ResnetUpsampleBlock2D" for i in reversed(range(len(mult))))
    return dict(sample_size=spec["resolution"], in_channels=spec["channels"], out_channels=spec["channels"],
                block_out_channels=tuple(ch * m for m in mult), layers_per_block=spec["num_res_blocks"],
                down_block_types=down, up_block_types=up, downsample_type="resnet", upsample_type="resnet",
                attention_head_dim=attn_ch.pop(), norm_num_groups=spec.get("torch_num_groups", 8),
                norm_eps=1e-6, dropout=spec["dropout"], time_embedding_type="positional",
                flip_sin_to_cos=True, freq_shift=0)


class Trainer:
    def __init__(self, spec: dict):
        torch.manual_seed(spec["seed"])
        self.spec = spec
        self.config = unet_config(spec)
        self.model = UNet2DModel(**self.config).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.n_params = sum(p.numel() for p in self.params)
        self.ema = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.Adam(self.params, lr=spec["learning_rate"], betas=(spec["b1"], spec["b2"]),
                                    eps=spec["eps"])
        warm = spec["warmup_steps"]
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, s / warm) if warm else 1.0)
        # the driver's host arrays (pool, batch, H, W, C); NCHW copies made once (torch's native layout)
        host = np.load(spec["data_path"])
        self.data = [torch.from_numpy(np.ascontiguousarray(b.transpose(0, 3, 1, 2))) for b in host]
        self.i = 0

    def loss(self, x0):
        """eps- (or v-) MSE at x_t = alpha x0 + sigma eps, VP-linear schedule, uniform t (antithetic pairs)."""
        s = self.spec
        n = x0.shape[0]
        if s["antithetic"]:
            t = s["t_eps"] + (1.0 - s["t_eps"]) * torch.rand((n + 1) // 2)
            t = torch.cat([t, s["t_eps"] + 1.0 - t])[:n]
        else:
            t = s["t_eps"] + (1.0 - s["t_eps"]) * torch.rand(n)
        log_alpha = -0.25 * t**2 * (s["beta_max"] - s["beta_min"]) - 0.5 * t * s["beta_min"]
        alpha = torch.exp(log_alpha)[:, None, None, None]
        sigma = torch.sqrt(-torch.expm1(2.0 * log_alpha))[:, None, None, None]
        eps = torch.randn_like(x0)
        x_t = alpha * x0 + sigma * eps
        pred = self.model(x_t, t * 1000.0).sample  # diffusers' timestep units: 1000 t
        target = eps if s["objective"] == "eps" else alpha * eps - sigma * x0  # v (Salimans & Ho 2022)
        return F.mse_loss(pred, target)

    def _next(self):
        x0 = self.data[self.i % len(self.data)]
        self.i += 1
        return x0

    def step(self):
        loss = self.loss(self._next())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.spec["grad_clip"])
        self.opt.step()
        self.lr_sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1.0 - self.spec["ema_decay"])
        return loss, grad_norm

    def bare(self):
        """Forward + backward of the same loss only (no optimizer, no clipping, no EMA)."""
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(self._next())
        loss.backward()
        return loss

    def run(self, what: str, n: int) -> tuple:
        """(wall, process CPU) seconds per step over n back-to-back steps."""
        fn = self.step if what == "step" else self.bare
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            out = fn()
        float((out[0] if isinstance(out, tuple) else out).detach())  # eager CPU: already done; read it anyway
        return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


# aten ops by kind, for step_floor.py: the convolutions and matrix products (forward and backward),
# the fused attention kernels (their matmuls and softmax), dropout's mask draws; the rest is everything else
OP_KINDS = {
    "conv": ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_slow_conv2d_forward",
             "aten::_slow_conv2d_backward"),
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "dropout_masks": ("aten::bernoulli_",),
}


def profile_bare(trainer, n: int) -> dict:
    """Per step: wall of n bare forward + backward steps under ``torch.profiler`` and the self CPU time per op kind.

    With intra-op threads an op's self time on the calling thread is its wall time (the pool's work
    is inside it), so the kinds' times are comparable with the wall.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            out = trainer.bare()
        float(out.detach())
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    kinds = {k: sum(e.self_cpu_time_total for e in events if e.key in ops) / 1e6 / n for k, ops in OP_KINDS.items()}
    counts = {k: sum(e.count for e in events if e.key in ops) / n for k, ops in OP_KINDS.items()}
    return dict(per_step_s=wall / n, kinds_s=kinds, counts=counts)


def versions() -> dict:
    return dict(torch=torch.__version__, diffusers=diffusers.__version__, torch_threads=torch.get_num_threads(),
                torch_interop_threads=torch.get_num_interop_threads())


def gemm_gflops(n: int, repeats: int) -> list:
    """GFLOP/s of an n x n x n f32 matmul per timed call (torch's BLAS, its threads): the machine's attainable rate."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return rates


def serve():
    """JSON-lines loop: {"cmd": "setup", "name", "spec"} | {"cmd": "run", "name", "what", "n"} |
    {"cmd": "profile", "name", "n"} | {"cmd": "gemm", "n", "repeats"} | {"cmd": "quit"}."""
    trainers = {}

    def reply(obj):
        sys.stdout.write(REPLY + json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply(dict(ready=True, **versions()))
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["cmd"] == "quit":
                reply({"bye": True})
                return
            if msg["cmd"] == "setup":
                t0 = time.perf_counter()
                tr = trainers[msg["name"]] = Trainer(msg["spec"])
                warm = [tr.run("step", 1)[0] for _ in range(msg.get("warmup", 3))]
                warm += [tr.run("bare", 1)[0] for _ in range(msg.get("warmup", 3))]
                adam = {k: tr.opt.defaults.get(k) for k in ("foreach", "fused")}
                reply(dict(n_params=tr.n_params, config=_jsonable(tr.config), setup_s=time.perf_counter() - t0,
                           warmup_s=warm, adam_flags=adam))
            elif msg["cmd"] == "run":
                wall, cpu = trainers[msg["name"]].run(msg["what"], int(msg["n"]))
                reply({"per_step_s": wall, "cpu_per_step_s": cpu})
            elif msg["cmd"] == "profile":
                reply(profile_bare(trainers[msg["name"]], int(msg["n"])))
            elif msg["cmd"] == "gemm":
                reply({"gflops": gemm_gflops(int(msg["n"]), int(msg["repeats"]))})
            else:
                reply({"error": f"unknown cmd {msg['cmd']!r}"})
        except Exception as e:  # the driver reports it
            reply({"error": f"{type(e).__name__}: {e}"})


def _jsonable(d):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--spec", help="standalone: the JSON specs file bench_train.py --dump-specs writes")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.serve:
        serve()
        return
    if not args.spec:
        ap.error("standalone mode needs --spec (python experiments/benchmarks/bench_train.py --dump-specs writes them)")
    for name, spec in json.load(open(args.spec)).items():
        tr = Trainer(spec)
        for _ in range(3):
            tr.run("step", 1)
        times = {w: [tr.run(w, args.steps)[0] for _ in range(args.repeats)] for w in ("bare", "step")}
        med = {w: statistics.median(v) for w, v in times.items()}
        print(json.dumps(dict(name=name, n_params=tr.n_params, per_step_s=times,
                              step_over_bare=med["step"] / med["bare"], **versions())))


if __name__ == "__main__":
    main()
