"""Training-recipe ablation on digits: Fréchet distance of 1000 samples after a fixed number of steps.

    python experiments/ablations/ablate_recipe.py --steps 400 --cells v,v_minsnr5 --train-seeds 0,1
    python experiments/ablations/ablate_recipe.py --steps 2100 --cells v_minsnr5,eps [--write-benchmarks]

Each cell is the default digits main job (``experiments/configs/digits.py``) with a few config
overrides (``CELLS``), trained from scratch for ``--steps`` steps per training seed (``config.seed``),
then sampled with the config's sampler (DPM-Solver++ 2M) at ``--nfe`` from the EMA weights, once per
sampling seed. Score: the Fréchet distance to the train split in the independent digits evaluator's
feature space (as ``bench_quality.py``). A fixed step count makes the comparison independent of the
machine's speed and load, so cells may run side by side; training is deterministic given the seed.

Each row records the values of every recipe field (``RECIPE_FIELDS``) its run was trained with, and the
table names a row by the fields where those differ from the digits config as it is now, so a row stays
true when the default moves (the cell's name is only the handle it was run under). Rows accumulate in
``experiments/ablations/results/ablate_recipe.jsonl`` (one per recipe x steps x training seed x grid; a re-run
replaces its row) so that cells can be run in separate invocations; ``--write-benchmarks`` renders every
stored row into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repo root: `experiments.*` imports resolve when run as a script
RESULTS = os.path.join(HERE, "results", "ablate_recipe.jsonl")

_EPS = {"diffusion.prediction": "eps", "diffusion.objective": "eps"}
# cell -> config fields set on top of experiments/configs/digits.py (None switches an optional field
# off; a field the schema lacks, e.g. a model attribute, is added); "diffusers" is the quality peer
CELLS = {
    "v_minsnr5": {},  # the default: v-prediction, v-objective weighted by Min-SNR-5, no residual rescale, cosine
    "v": {"diffusion.min_snr_gamma": None},  # plain v-MSE
    "v_minsnr2": {"diffusion.min_snr_gamma": 2.0},
    "v_minsnr20": {"diffusion.min_snr_gamma": 20.0},
    "eps": {**_EPS, "diffusion.min_snr_gamma": None},  # L_simple (Ho et al.), the diffusers peer's loss
    "eps_minsnr5": _EPS,
    "v_minsnr5_ema999": {"optim.ema_decay": 0.999},
    "v_minsnr5_ema99": {"optim.ema_decay": 0.99},
    "v_minsnr5_lr1e-3": {"optim.learning_rate": 1e-3},
    "skip_rescale": {"model.skip_rescale": True},  # residual sums divided by sqrt(2) (DDPM++)
    "no_zero_init": {"model.zero_init": False},  # residual branches and output conv not zero-initialised
    "groups8": {"model.num_groups": 8},  # GroupNorm groups as the peer (DDPM++ rule: C // 4 up to 32)
    "cosine": {"diffusion.schedule": "vp_cosine"},  # Nichol & Dhariwal's cosine alpha_bar (the default since 2026-11-25)
    "vp_linear": {"diffusion.schedule": "vp_linear"},  # the default until 2026-11-25
    "no_dropout": {"model.dropout": 0.0},
    "diffusers_like": {"model.skip_rescale": False, "model.zero_init": False, "model.num_groups": 8},
    "diffusers": None,  # experiments/benchmarks/peers/diffusers_quality_peer.py for the same number of steps
}


# the digits config as the table in BENCHMARKS.md measured it (before its EMA warm-up, its one-block attention-free
# U-Net and its 900 steps, 2026-12-07); every cell starts from it
MEASURED_BASE = {"optim.ema_warmup": False, "model.num_res_blocks": 2, "model.attn_resolutions": (4,),
                 "training.num_steps": 600}


def cell_config_text(cell: str) -> str:
    """A config file for ``cell``: the digits config as measured (``MEASURED_BASE``) plus the cell's fields."""
    lines = ["from diffjax.config import load", "", "", "def get_config():",
             f"    c = load({os.path.join(ROOT, 'experiments', 'configs', 'digits.py')!r})"]
    for field, value in {**MEASURED_BASE, **CELLS[cell]}.items():
        *parents, name = field.split(".")
        lines.append(f"    c{''.join(f'.{p}' for p in parents)}[{name!r}] = {value!r}")
    return "\n".join(lines + ["    return c", ""])


# the fields a row records; a model attribute the config does not set takes the UNet's default
RECIPE_FIELDS = sorted({f for fields in CELLS.values() if fields for f in fields}
                       | {"model.skip_rescale", "model.zero_init", "model.num_groups"})


def recipe_values(cell: str) -> dict:
    """The value of every ``RECIPE_FIELDS`` entry in ``cell``'s config (as trained)."""
    import dataclasses

    from diffjax import models

    scope = {}
    exec(cell_config_text(cell), scope)
    config = scope["get_config"]()
    unet = {f.name: f.default for f in dataclasses.fields(models.UNet)}
    values = {}
    for field in RECIPE_FIELDS:
        node, (*parents, name) = config, field.split(".")
        for part in parents:
            node = node[part]
        values[field] = node[name] if name in node else unet[name]
    return values


def label(values) -> str:
    """A row's name in the table: its fields that differ from the digits config as it is now."""
    if values is None:
        return "the diffusers peer (DDPM eps-MSE, UNet2DModel)"
    now = recipe_values("v_minsnr5")
    return " ".join(f"`{k}={v}`" for k, v in values.items() if now.get(k) != v) or "(the digits config)"


def cell_config(cell: str, path: str) -> str:
    with open(path, "w") as f:
        f.write(cell_config_text(cell))
    return path


def train_diffjax(cell, steps, train_seed, workdir):
    os.makedirs(workdir, exist_ok=True)
    cmd = [sys.executable, "-m", "diffjax.main", "--config", cell_config(cell, os.path.join(workdir, "cell_config.py")),
           "--workdir", workdir, "--noprogress", f"--config.training.num_steps={steps}",
           f"--config.seed={train_seed}", "--config.eval.num_examples=0",
           "--config.training.checkpoint_every=100000", "--config.training.log_every=50"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return json.load(open(os.path.join(workdir, "metrics.json")))["final_loss"]


def sample_diffjax(workdir, nfe, num_samples, sample_seeds, grid):
    """Samples per sampling seed with the run's sampler on ``grid`` ("config": the run's own), and the grid's name."""
    import jax

    from diffjax import load_run
    from diffjax.samplers import SAMPLERS

    run = load_run(workdir, task="diffusion")
    method = run.config.sample.method
    grid = (run.config.sample.get("grid") or SAMPLERS[method].grid) if grid == "config" else grid
    return [run.sample(num_samples, method=method, num_steps=nfe, key=jax.random.PRNGKey(s), grid=grid)
            for s in sample_seeds], grid


def _trained(workdir, cell, steps):
    """Whether a kept ``workdir`` already holds ``cell``'s recipe trained for exactly ``steps`` steps."""
    try:
        same = json.load(open(os.path.join(workdir, "recipe.json"))) == recipe_values(cell)
        return same and json.load(open(os.path.join(workdir, "metrics.json")))["step"] == steps
    except (OSError, KeyError, ValueError):
        return False


def run_cell(cell, steps, train_seed, nfe, num_samples, sample_seeds, grids, evaluator, ref, keep=None):
    """One row per sampling grid (the diffusers peer: one row, its own DPMSolverMultistep time grid)."""
    from experiments.benchmarks.bench_quality import run_diffusers
    from diffjax import metrics
    from experiments.ablations.guidance_sweep import real_split

    draws = []
    with tempfile.TemporaryDirectory() as scratch:
        workdir = os.path.join(keep, f"{cell}_steps{steps}_seed{train_seed}") if keep else os.path.join(scratch, "run")
        t0 = time.perf_counter()
        if CELLS[cell] is None:
            shutil.rmtree(workdir, ignore_errors=True)
            os.makedirs(workdir)
            xs, info = run_diffusers(float("inf"), workdir, nfe, num_samples, sample_seeds, real_split("train")[0],
                                     seed=train_seed, max_steps=steps)
            final_loss = info["final_loss"]
            draws.append((xs, "diffusers DPMSolverMultistep (t-uniform)"))
        else:
            if keep and _trained(workdir, cell, steps):  # kept from an earlier call: sample it again
                final_loss = json.load(open(os.path.join(workdir, "metrics.json")))["final_loss"]
            else:
                shutil.rmtree(workdir, ignore_errors=True)  # a partial kept run would resume, not retrain
                final_loss = train_diffjax(cell, steps, train_seed, workdir)
                with open(os.path.join(workdir, "recipe.json"), "w") as f:
                    json.dump(recipe_values(cell), f)
            draws += [sample_diffjax(workdir, nfe, num_samples, sample_seeds, g) for g in grids]
        wall = time.perf_counter() - t0
    rows = []
    for xs, grid in draws:
        fds = [metrics.frechet_distance_from_features(evaluator.features(x), ref) for x in xs]
        rows.append(dict(cell=cell, fields=CELLS[cell], recipe=None if CELLS[cell] is None else recipe_values(cell),
                         steps=steps, train_seed=train_seed, nfe=nfe, grid=grid,
                         num_samples=num_samples, sample_seeds=list(sample_seeds), fds=[float(f) for f in fds],
                         fd=float(np.mean(fds)), final_loss=final_loss, wall_s=wall,
                         date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())))
    return rows


# recipe fields recorded only since they were added to RECIPE_FIELDS: what older rows were trained with
BEFORE_RECORDED = {"diffusion.schedule": "vp_linear", "model.dropout": 0.1}


def load_rows():
    if not os.path.exists(RESULTS):
        return []
    with open(RESULTS) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for r in rows:
        for field, value in BEFORE_RECORDED.items():
            if r["recipe"] is not None:
                r["recipe"].setdefault(field, value)
    return rows


def store(row):
    key = lambda r: (json.dumps(r["recipe"], sort_keys=True) if r["recipe"] else r["cell"],  # noqa: E731
                     r["steps"], r["train_seed"], r["nfe"], r["num_samples"], r["grid"])
    rows = [r for r in load_rows() if key(r) != key(row)] + [row]
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def render(rows):
    lines = ["Fréchet distance to the train split (independent digits evaluator, lower is better) of "
             "`num_samples` samples per sampling seed, DPM-Solver++ 2M at the NFE shown, EMA weights; "
             "per training seed: mean over sampling seeds [min, max]. Rows from "
             "`experiments/ablations/results/ablate_recipe.jsonl` (its `date` field says when each was run).", "",
             "| steps | config fields (vs the digits config now) | run as | sampler time grid | FD per training seed | mean over training seeds | final loss | samples x seeds | NFE |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in rows:
        name = label(r["recipe"])
        groups.setdefault((r["steps"], name, r["grid"], r["nfe"], r["num_samples"]), []).append(r)
    for (steps, name, grid, nfe, n), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], np.mean([r["fd"] for r in kv[1]]))):
        rs = sorted(rs, key=lambda r: r["train_seed"])
        per = "; ".join(f"seed {r['train_seed']}: {r['fd']:.1f} [{min(r['fds']):.1f}, {max(r['fds']):.1f}]" for r in rs)
        cells = ", ".join(sorted({r["cell"] for r in rs}))
        lines.append(f"| {steps} | {name} | {cells} | {grid} | {per} | {np.mean([r['fd'] for r in rs]):.1f} | "
                     f"{np.mean([r['final_loss'] for r in rs]):.3f} | {n} x {len(rs[0]['sample_seeds'])} | {nfe} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--cells", default="v_minsnr5,v", help=f"comma-separated, of {sorted(CELLS)}")
    p.add_argument("--train-seeds", default="0")
    p.add_argument("--sample-seeds", default="0,1")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--nfe", type=int, default=20)
    p.add_argument("--grids", default="config",
                   help="time grids to sample each diffjax cell on (comma-separated; 'config': the run's sample.grid)")
    p.add_argument("--keep", help="keep each cell's workdir under this directory; a kept cell already trained for "
                                  "--steps is sampled again, not retrained")
    p.add_argument("--write-benchmarks", action="store_true", help="render every stored row into BENCHMARKS.md")
    args = p.parse_args(argv)
    cells = [c for c in args.cells.split(",") if c]
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        p.error(f"--cells: unknown {unknown}; known: {sorted(CELLS)}")

    from diffjax import evaluators
    from experiments.ablations.guidance_sweep import real_split

    evaluator = evaluators.digits_evaluator()
    ref = evaluator.features(real_split("train")[0])
    seeds = [int(s) for s in args.sample_seeds.split(",")]
    for cell in cells:
        for train_seed in [int(s) for s in args.train_seeds.split(",")]:
            try:
                rows = run_cell(cell, args.steps, train_seed, args.nfe, args.num_samples, seeds,
                                args.grids.split(","), evaluator, ref, keep=args.keep)
            except subprocess.CalledProcessError as e:
                raise SystemExit(f"cell {cell} (seed {train_seed}) failed:\n{(e.stderr or b'').decode()[-3000:]}") from None
            for row in rows:
                store(row)
                print(json.dumps(row), flush=True)
    table = render(load_rows())
    print(table)
    if args.write_benchmarks:
        from experiments.benchmarks.benchlib import write_section

        write_section("recipe", table, "python experiments/ablations/ablate_recipe.py " + " ".join(argv or sys.argv[1:]))


if __name__ == "__main__":
    from diffjax import xla_cpu

    xla_cpu.tune()  # XLA:CPU flags and glibc malloc options before JAX starts, as diffjax's CLIs do
    main()
