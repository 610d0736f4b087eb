"""The digits main job with and without the EMA warm-up: Fréchet distance (3 draws of 1000) and test bits/dim.

    python experiments/ablations/ema_warmup_main_job.py --on runs/ema_on --off runs/ema_off

Trains each workdir that has no metrics.json yet with ``digits.py`` (``--config.optim.ema_warmup=True`` / ``False``;
training seed 0, so the two runs share every train step and differ only in their EMA weights), then scores both
with the run's default sampler in the digits evaluator (bench_dit's ``score_run``). Measured 2026-12-07 (the
"off" run was /work/runs/teacher): FD 9.06 [8.74, 9.61] with, 11.49 [10.35, 12.21] without (floor 10.65); test
5.70 +- 0.02 vs 5.90 +- 0.02 bits/dim (experiments/configs/digits.py, README "The main job").
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo root


# digits.py's U-Net and step count when this was measured (before 2026-12-07)
MEASURED_UNET = ("--config.model.num_res_blocks=2", "--config.model.attn_resolutions=(4,)", "--config.training.num_steps=600")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--on", required=True, help="workdir of the run with the warm-up")
    ap.add_argument("--off", required=True, help="workdir of the run without it")
    args = ap.parse_args()
    from diffjax import evaluators, xla_cpu
    from experiments.ablations.guidance_sweep import real_split
    from experiments.benchmarks.bench_dit import score_run

    xla_cpu.tune()
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "digits.py")
    for workdir, warmup in ((args.on, True), (args.off, False)):
        if not os.path.exists(os.path.join(workdir, "metrics.json")):
            subprocess.run([sys.executable, "-m", "diffjax.main", "--config", config, "--workdir", workdir,
                            "--noprogress", f"--config.optim.ema_warmup={warmup}", *MEASURED_UNET], check=True)
    ev = evaluators.digits_evaluator()
    ref = ev.features(real_split("train")[0])
    for name, workdir in (("warm-up on", args.on), ("warm-up off", args.off)):
        m = json.load(open(os.path.join(workdir, "metrics.json")))
        r = score_run(workdir, [0, 1, 2], 1000, ev, ref)
        print(f"{name}: FD {r['fd']:.2f} [{r['fd_min']:.2f}, {r['fd_max']:.2f}], test {m['test_bpd']:.2f} "
              f"+- {m['test_bpd_stderr']:.2f} bits/dim, {m['step']} steps", flush=True)


if __name__ == "__main__":
    main()
