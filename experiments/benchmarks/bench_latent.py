"""Latent diffusion on digits: the autoencoder's reconstruction, latent vs pixel diffusion quality and speed.

    flock /tmp/cpu.lock python experiments/benchmarks/bench_latent.py --root runs/bench_latent --train
    flock /tmp/cpu.lock python experiments/benchmarks/bench_latent.py --root runs/bench_latent [--write-benchmarks]

``--train`` trains, one after the other with the main job (runs complete under ``--root`` are reused):
``ae`` (``experiments/configs/digits_ae.py``: KL-f2, 4x4x2 latents) and ``latent_unet``
(``digits_latent_unet.py``: the digits U-Net recipe on those latents, as many steps as the pixel baseline).
The evaluation then measures, in one process:

* the autoencoder: test reconstruction MSE / PSNR / KL per latent dim (its metrics.json) and the Fréchet
  distance of the reconstructions (posterior means, quantized) of the 297 test images;
* sample quality: ``--num-samples`` samples per draw, ``--sample-seeds`` draws, each run's default sampler,
  for the latent run and the pixel baseline ``--pixel-workdir`` (the default digits run);
* speed, interleaved so that both see the same load: train steps/s (the runs' jitted steps on one fixed batch,
  ``--rounds`` alternating rounds of ``--calls`` calls) and seconds per 1000 samples (alternating).

Score: the Fréchet distance between the digits evaluator's features (``diffjax.evaluators``) and the train
split's. Floor: the 297 real test images' distance (finite-sample bias alone), quoted beside each number.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(HERE, "results")
CONFIGS = os.path.join(ROOT, "experiments", "configs")


def train_run(root, name, config, flags=()):
    """Train ``config`` into ``root/name`` unless its metrics.json exists; returns the metrics and seconds."""
    workdir = os.path.join(root, name)
    path = os.path.join(workdir, "metrics.json")
    if not os.path.exists(path):
        cmd = [sys.executable, "-m", "diffjax.main", "--config", os.path.join(CONFIGS, config), "--workdir", workdir,
               "--noprogress", *flags]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    return json.load(open(path))


def reconstructions(workdir, x_uint8):
    """Posterior-mean reconstructions of n-bit images by the autoencoder run in ``workdir``, as n-bit images."""
    import diffjax
    from diffjax import autoencoder as ae
    from diffjax.data import from_data_range
    from diffjax.training.task_autoencoder import image_inputs

    run = diffjax.load_run(workdir, task="autoencoder")
    codec = ae.make_codec(run.run.module)
    rec = jax.jit(lambda p, x: codec.decode(p, codec.encode(p, x).mean))(run.params, image_inputs(run.config, x_uint8))
    return from_data_range(np.asarray(rec), run.spec.num_bits)


def fd_draws(run, evaluator, ref, n, seeds):
    from diffjax import metrics

    fds = [metrics.frechet_distance_from_features(evaluator.features(run.sample(n, key=jax.random.PRNGKey(s))), ref)
           for s in seeds]
    return dict(fd=float(np.mean(fds)), fd_min=float(min(fds)), fd_max=float(max(fds)))


def time_training(configs, calls, rounds):
    """ms per train step of each config's jitted step on one fixed batch, rounds alternating between configs."""
    from diffjax.training.loop import _train_step_for, setup, train_batches
    from diffjax.training.step import global_batch

    steps = {}
    for name, c in configs.items():
        run = setup(c, None)
        k = c.training.steps_per_call
        chunk = [next(train_batches(c, 0)) for _ in range(k)]
        host = chunk[0] if k == 1 else jax.tree.map(lambda *xs: np.stack(xs), *chunk)
        fn, batch = _train_step_for(run), global_batch(host, run.mesh, stacked=k > 1)
        state, _ = fn(run.state, batch)  # compile
        jax.block_until_ready(state.step)
        steps[name] = [fn, state, batch, k, []]
    for _ in range(rounds):
        for name, entry in steps.items():
            fn, state, batch, k, times = entry
            t0 = time.perf_counter()
            for _ in range(calls):
                state, _ = fn(state, batch)
            jax.block_until_ready(state.step)
            times.append((time.perf_counter() - t0) / (calls * k))
            entry[1] = state
    return {name: dict(ms_per_step=1e3 * float(np.median(e[4])), ms_min=1e3 * min(e[4]), ms_max=1e3 * max(e[4]))
            for name, e in steps.items()}


def step_flops(configs, runs):
    """XLA's cost analysis (load-independent): GFLOP per train step (forward + backward + update) and per model
    evaluation on 1000 examples (a latent run's decoder added once per 1000 samples)."""
    import jax.numpy as jnp

    from diffjax.training.loop import _train_step_for, setup, train_batches
    from diffjax.training.step import global_batch

    out = {}
    for name, c in configs.items():
        run = setup(c, None)
        k = c.training.steps_per_call
        host = jax.tree.map(lambda *xs: np.stack(xs), *[next(train_batches(c, 0))] * k) if k > 1 else \
            next(train_batches(c, 0))
        compiled = _train_step_for(run).lower(run.state, global_batch(host, run.mesh, stacked=k > 1)).compile()
        train = compiled.cost_analysis()["flops"] / k
        x = jnp.zeros((1000, *run.sample_shape))
        t = jnp.full((1000,), 0.5)
        fwd = jax.jit(lambda p, x, t: run.apply_eval(p, x, t)).lower(run.state.ema_params, x, t).compile()
        decode = 0.0
        if run.decode is not None:
            decode = jax.jit(run.decode).lower(run.state.extra, x).compile().cost_analysis()["flops"]
        out[name] = dict(train_gflop=train / 1e9, eval_gflop_1000=fwd.cost_analysis()["flops"] / 1e9,
                         decode_gflop_1000=decode / 1e9)
    return out


def time_sampling(runs, n, rounds):
    """Seconds per ``n`` samples (default sampler) of each run, after a compiling draw, rounds alternating."""
    times = {name: [] for name in runs}
    for run in runs.values():
        run.sample(n, key=jax.random.PRNGKey(99))
    for r in range(rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run.sample(n, key=jax.random.PRNGKey(100 + r))
            times[name].append(time.perf_counter() - t0)
    return {name: dict(s_per_1000=float(np.median(t)) * 1000 / n, s_min=min(t) * 1000 / n, s_max=max(t) * 1000 / n)
            for name, t in times.items()}


def render(res) -> str:
    a, floor = res["ae"], res["floor"]
    lat, pix = res["latent"], res["pixel"]
    tr, sp, fl = res.get("train_timing"), res.get("sample_timing"), res["flops"]
    lines = [
        f"Autoencoder (`digits_ae.py`: KL-f2, latents 4x4x2 = 32 numbers per 64-pixel image, "
        f"{a['num_params']:,} parameters, {a['step']} steps, {a['train_seconds']:.0f} s): test reconstruction MSE "
        f"{a['test_recon_mse']:.4f} (images in [-1, 1]), PSNR {a['test_recon_psnr']:.1f} dB, L1 "
        f"{a['test_recon_l1']:.4f}, KL {a['test_kl_per_latent_dim']:.2f} nats per latent dim; Fréchet distance of "
        f"the 297 test reconstructions **{res['recon_fd']:.2f}** against the real test images' floor "
        f"{floor:.2f}.",
        "",
        f"Sample quality: Fréchet distance (digits evaluator, vs the train split) of {res['num_samples']} samples, "
        f"mean over sampling seeds {res['seeds']} (min-max), each run's default sampler "
        f"({res['sampler']}); floor (297 real test images) {floor:.2f}. Compute per step from XLA's cost "
        f"analysis of the compiled programs (independent of the machine's load): GFLOP per train step (forward, "
        f"backward, update; batch 128) and per 1000 samples (NFE x one network evaluation on 1000 inputs, plus "
        f"the decoder for the latent run). "
        + (f"Wall clock measured interleaved in one locked process (load average {res['loadavg']}): train ms/step "
           f"= median over {res['rounds']} alternating rounds of {res['calls']} calls on one fixed batch; sampling "
           f"seconds per 1000 samples, median of alternating rounds." if tr else
           "Wall-clock speed: not measured in this run (`--no-timing`; without it the script times both runs "
           "interleaved, under `flock /tmp/cpu.lock`)."),
        "",
        "| run | space | parameters (denoiser) | train steps | FD (min-max) | floor | GFLOP / train step | "
        "GFLOP / 1000 samples | train ms/step | s per 1000 samples | test NLL |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, label, space, nll in (("latent", "latent U-Net (`digits_latent_unet.py`)", "4x4x2 latents",
                                     f"{lat['test_latent_bits_per_dim']:.3f} bits per latent dim"),
                                    ("pixel", f"pixel U-Net (`digits.py`, {res['pixel_workdir']})", "8x8x1 pixels",
                                     f"{pix['test_bpd']:.3f} bits/dim")):
        m, q, f = res[name], res[f"{name}_fd"], fl[name]
        sample_gflop = m["sample_nfe"] * f["eval_gflop_1000"] + f["decode_gflop_1000"]
        train_ms = f"{tr[name]['ms_per_step']:.1f} ({tr[name]['ms_min']:.1f}-{tr[name]['ms_max']:.1f})" if tr else "-"
        sample_s = f"{sp[name]['s_per_1000']:.2f} ({sp[name]['s_min']:.2f}-{sp[name]['s_max']:.2f})" if sp else "-"
        lines.append(f"| {label} | {space} | {m['num_params']:,} | {m['step']} | **{q['fd']:.2f}** "
                     f"({q['fd_min']:.2f}-{q['fd_max']:.2f}) | {floor:.2f} | {f['train_gflop']:.2f} | "
                     f"{sample_gflop:.1f} | {train_ms} | {sample_s} | {nll} |")
    train_ratio = fl["pixel"]["train_gflop"] / fl["latent"]["train_gflop"]
    sample_ratio = (pix["sample_nfe"] * fl["pixel"]["eval_gflop_1000"]) / (
        lat["sample_nfe"] * fl["latent"]["eval_gflop_1000"] + fl["latent"]["decode_gflop_1000"])
    lines += ["", f"The latent run's sampling time includes decoding; its quality is bounded by the autoencoder's "
                  f"reconstruction FD. The test NLLs are in different spaces (bits per latent dimension of the "
                  f"autoencoder's posterior mean vs bits per pixel) and do not compare. Latent scale factor "
                  f"{lat['latent_scale_factor']:.4f} (1 / std of the first batch's posterior samples). Compute "
                  f"ratio pixel / latent: {train_ratio:.1f}x per train step, {sample_ratio:.1f}x per 1000 samples."]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/bench_latent")
    p.add_argument("--train", action="store_true", help="train the autoencoder and latent runs and stop")
    p.add_argument("--pixel-workdir", default="/work/runs/teacher", help="the pixel baseline (digits.py run)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--sample-seeds", default="0,1,2")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--write-benchmarks", action="store_true")
    p.add_argument("--no-timing", action="store_true",
                   help="skip the wall-clock timings (quality and XLA FLOP counts only, robust to load)")
    p.add_argument("--from-results", action="store_true",
                   help="render results/bench_latent.json (a previous evaluation) instead of measuring")
    args = p.parse_args(argv)
    if args.from_results:
        res = json.load(open(os.path.join(RESULTS, "bench_latent.json")))
        return _report(res, args, argv)
    from diffjax import xla_cpu

    xla_cpu.tune()
    root = os.path.abspath(args.root)
    pixel_steps = json.load(open(os.path.join(args.pixel_workdir, "metrics.json")))["step"]
    if args.train:
        train_run(root, "ae", "digits_ae.py")
        train_run(root, "latent_unet", "digits_latent_unet.py",
                  [f"--config.latent.autoencoder_workdir={os.path.join(root, 'ae')}",
                   f"--config.training.num_steps={pixel_steps}"])
        return
    import diffjax
    from diffjax import evaluators, metrics
    from diffjax.runs import load_config
    from experiments.ablations.guidance_sweep import real_split

    seeds = [int(s) for s in args.sample_seeds.split(",")]
    evaluator = evaluators.digits_evaluator()
    ref = evaluator.features(real_split("train")[0])
    test_x = real_split("test")[0]
    floor = metrics.frechet_distance_from_features(evaluator.features(test_x), ref)
    ae_dir, lat_dir = os.path.join(root, "ae"), os.path.join(root, "latent_unet")
    command = "python experiments/benchmarks/bench_latent.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res = dict(command=command, floor=float(floor), num_samples=args.num_samples, seeds=seeds, calls=args.calls,
               rounds=args.rounds, pixel_workdir=args.pixel_workdir)
    res["ae"] = json.load(open(os.path.join(ae_dir, "metrics.json")))
    res["latent"] = json.load(open(os.path.join(lat_dir, "metrics.json")))
    res["pixel"] = json.load(open(os.path.join(args.pixel_workdir, "metrics.json")))
    res["recon_fd"] = float(metrics.frechet_distance_from_features(evaluator.features(reconstructions(ae_dir, test_x)),
                                                                   ref))
    runs = {"latent": diffjax.load_run(lat_dir), "pixel": diffjax.load_run(args.pixel_workdir)}
    res["sampler"] = ", ".join(f"{n}: {r.config.sample.method} {r.default_num_steps} steps" for n, r in runs.items())
    for name, run in runs.items():
        res[f"{name}_fd"] = fd_draws(run, evaluator, ref, args.num_samples, seeds)
        print(name, res[f"{name}_fd"], flush=True)
    configs = {"latent": load_config(lat_dir), "pixel": load_config(args.pixel_workdir)}
    res["flops"] = step_flops(configs, runs)
    if not args.no_timing:
        res["loadavg_before"] = open("/proc/loadavg").read().split()[:3]
        res["sample_timing"] = time_sampling(runs, 1000, args.rounds)
        res["train_timing"] = time_training(configs, args.calls, args.rounds)
        res["loadavg"] = " / ".join(open("/proc/loadavg").read().split()[:3])
    print(json.dumps({k: v for k, v in res.items() if k not in ("ae", "latent", "pixel")}, indent=1), flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    json.dump(res, open(os.path.join(RESULTS, "bench_latent.json"), "w"), indent=1)
    _report(res, args, argv)


def _report(res, args, argv):
    text = render(res)
    print(text)
    if args.write_benchmarks:
        from experiments.benchmarks import benchlib

        benchlib.write_section("latent", text, res["command"])


if __name__ == "__main__":
    main()
