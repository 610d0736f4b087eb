import json
import os
import time
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.config import base
from diffjax.metrics import sliced_wasserstein
from diffjax.training import Checkpointer, NonFiniteError, all_finite
from diffjax.training import loop as loop_lib
from diffjax.training.builders import ConfigError, validate_config
from diffjax.training.loop import generate, setup, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy_config(num_steps=300):
    import ml_collections
    from ml_collections import config_dict

    c = base()
    c.data.dataset = "ring"
    c.data.dequantize = False
    c.model = ml_collections.ConfigDict({"name": "mlp", "width": 64, "depth": 2, "dropout": 0.0,
                                         "num_classes": config_dict.placeholder(int)})
    c.training.batch_size = 256
    c.training.num_steps = num_steps
    c.training.log_every = 50
    c.training.checkpoint_every = 100
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 20
    c.optim.ema_decay = 0.99
    return c


def tiny_digits_config(num_steps=6):
    c = base()
    c.model.ch = 8
    c.model.ch_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (4,)
    c.model.dropout = 0.1  # exercises the per-step dropout key on resume
    c.training.batch_size = 16
    c.training.num_steps = num_steps
    c.training.log_every = 2
    c.training.checkpoint_every = 2
    c.sample.num_steps = 4
    c.sample.num_samples = 8
    c.eval.num_examples = 8
    c.eval.batch_size = 8
    return c


def _params_equal(a, b):
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_toy_training_drives_loss_down_and_samples_to_the_data(tmp_path):
    """600 steps of an MLP on the ring mixture: the loss falls and samples (ancestral, ODE) approach exact ones."""
    c = toy_config(600)
    c.model.width, c.model.depth = 128, 3
    run0 = setup(c, None)
    key = jax.random.PRNGKey(5)
    from diffjax.data.toy import ring

    ref, _ = ring().sample(jax.random.PRNGKey(6), 2000)
    x_init, _ = generate(run0, method="ddpm", num_steps=100, num_samples=2000, key=key)
    run, summary = train(c, str(tmp_path), run=run0, progress=False)
    x, _ = generate(run, method="ddpm", num_steps=100, num_samples=2000, key=key)
    x_ode, _ = generate(run, method="dpm_solver++_2m", num_steps=20, num_samples=2000, key=key)
    with open(tmp_path / "loss_history.csv") as f:
        losses = np.array([float(line.split(",")[1]) for line in f.readlines()[1:]])
    assert losses.shape == (600,)
    # the excess over the Bayes-optimal loss (the exact oracle's, same objective) shrinks
    from diffjax.losses import make_loss

    oracle = ring().model_fn(run.schedule, c.diffusion.prediction)
    bayes_fn = make_loss(lambda p, x_, t, cond: oracle(x_, t, None), run.schedule, prediction=c.diffusion.prediction,
                         objective=c.diffusion.objective, min_snr_gamma=c.diffusion.min_snr_gamma, antithetic=True)
    bayes = float(bayes_fn({}, {"x": ring().sample(jax.random.PRNGKey(8), 50_000)[0]}, key)[0])
    assert losses[-100:].mean() - bayes < 0.5 * (losses[:50].mean() - bayes), (losses[:50].mean(), losses[-100:].mean(), bayes)
    sw_init = float(sliced_wasserstein(x_init, ref, key))
    sw = float(sliced_wasserstein(x, ref, key))
    floor = float(sliced_wasserstein(ring().sample(jax.random.PRNGKey(7), 2000)[0], ref, key))
    assert sw < 0.5 * sw_init and sw < 4 * floor, (sw, sw_init, floor)
    # v-prediction (the default) keeps the deterministic sampler's tail trajectories on the data
    sw_ode = float(sliced_wasserstein(x_ode, ref, key))
    assert sw_ode < 4 * floor and float(jnp.max(jnp.abs(x_ode))) < 5.0, sw_ode
    assert summary["steps"] == 600 and np.isfinite(summary["final_loss"])


def test_checkpoint_round_trip_and_refuses_non_finite(tmp_path):
    run = setup(toy_config(10), None)
    ckpt = Checkpointer(str(tmp_path / "ck"), max_to_keep=2)
    state = run.state.replace(step=jnp.asarray(7, jnp.int32))
    ckpt.save(state)
    restored = ckpt.restore(run.state)
    assert int(restored.step) == 7
    assert _params_equal(restored, state)
    bad = state.replace(step=jnp.asarray(8, jnp.int32),
                        params=jax.tree.map(lambda p: p * jnp.nan, state.params))
    with pytest.raises(NonFiniteError, match="step 8"):
        ckpt.save(bad)
    assert ckpt.all_steps() == [7]
    # read-only (diffjax.load_run on a run that may still be training): restores, saves nothing, and leaves
    # an unfinished save of the training job in place
    unfinished = tmp_path / "ck" / "9.orbax-checkpoint-tmp-1234"
    unfinished.mkdir()
    reader = Checkpointer(str(tmp_path / "ck"), read_only=True)
    assert reader.all_steps() == [7] and int(reader.restore(run.state).step) == 7 and unfinished.exists()
    with pytest.raises(ValueError, match="read-only"):
        reader.save(state.replace(step=jnp.asarray(9, jnp.int32)))


def test_all_finite_finds_one_bad_entry_in_any_floating_leaf():
    tree = {"w": jnp.ones((3, 4)), "b": jnp.zeros(5, jnp.bfloat16), "count": jnp.asarray(2**31 - 1, jnp.int32),
            "key": jax.random.key(0), "nested": [jnp.ones(2), jnp.arange(4.0)]}
    assert bool(all_finite(tree))
    for path, bad in ((("w",), jnp.nan), (("b",), -jnp.inf), (("nested", 1), jnp.inf)):
        leaf = tree[path[0]] if len(path) == 1 else tree[path[0]][path[1]]
        poisoned = leaf.at[(-1,) * leaf.ndim].set(bad)
        t = dict(tree, nested=list(tree["nested"]))
        if len(path) == 1:
            t[path[0]] = poisoned
        else:
            t[path[0]][path[1]] = poisoned
        assert not bool(all_finite(t)), path
    assert bool(all_finite({"count": jnp.asarray(3)})) and bool(all_finite({}))


@pytest.mark.parametrize("steps_per_call", [1, 2])
def test_resume_is_bitwise_identical(tmp_path, steps_per_call):
    """Stop after 2 steps, resume in a new run, reach 6: parameters equal an uninterrupted 6-step run."""
    c = tiny_digits_config(6)
    c.training.steps_per_call = steps_per_call
    full, _ = train(c, str(tmp_path / "full"), progress=False)
    _, first = train(c, str(tmp_path / "resumed"), progress=False, stop_after=2)
    assert first["step"] == 2
    resumed, second = train(c, str(tmp_path / "resumed"), progress=False)
    assert second["start_step"] == 2 and second["step"] == 6
    assert _params_equal(full.state.params, resumed.state.params)
    assert _params_equal(full.state.ema_params, resumed.state.ema_params)
    assert _params_equal(full.state.opt_state, resumed.state.opt_state)


def test_non_finite_loss_is_reported_and_never_checkpointed(tmp_path, monkeypatch):
    c = toy_config(6)
    c.training.log_every = 2
    c.training.checkpoint_every = 2
    train(c, str(tmp_path), progress=False, stop_after=2)
    real = loop_lib.build_loss

    def poisoned(config, schedule, module):
        loss_fn = real(config, schedule, module)
        return lambda p, b, k: jax.tree.map(lambda v: v * jnp.nan, loss_fn(p, b, k))

    monkeypatch.setattr(loop_lib, "build_loss", poisoned)
    with pytest.raises(NonFiniteError, match="step 3"):
        train(c, str(tmp_path), progress=False)
    assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [2]


@pytest.mark.parametrize("field, value, match", [
    ("model.name", "transformer9000", "config.model.name"),
    ("optim.learning_rate", -1e-3, "config.optim.learning_rate"),
    ("data.dataset", "imagenet_9", "config.data.dataset"),
    ("training.batch_size", 12, "not divisible by the batch shards"),
    ("sample.method", "magic", "config.sample.method"),
    ("training.steps_per_call", 0, "config.training.steps_per_call"),
    ("diffusion.min_snr_gamma", -5.0, "config.diffusion.min_snr_gamma"),
    ("sample.grid", "uniform", "config.sample.grid"),
    ("sample.grid", "ddim_trailing", "sub-sequence of a discrete DDPM chain"),
    ("sample.grid", "karras:rho=seven", "config.sample.grid: grid 'karras:rho=seven': rho must be a float"),
    ("model.dtype", "float16", "config.model.dtype"),
    ("model.kernels", "cuda", "config.model.kernels"),
    ("training.sample_every", -1, "config.training.sample_every"),
    ("training.eval_every", 3, "config.training.eval_every: 3 must be a multiple of training.steps_per_call=2"),
])
def test_invalid_config_fields_are_named(field, value, match):
    c = base()
    section, name = field.split(".")
    c[section][name] = value
    if field == "training.eval_every":
        c.training.steps_per_call = 2
    with pytest.raises(ConfigError, match=match):
        validate_config(c, num_devices=8)


def test_grid_names_with_options_and_aliases_validate():
    """config.sample.grid accepts what diffjax.sample accepts: options after ':' and the diffusers aliases."""
    for grid in ("karras:rho=5", "log_sigma", "linspace", None):
        c = base()
        c.sample.grid = grid
        validate_config(c, num_devices=8)


def test_none_overrides_switch_off_optional_fields_only():
    """``--config.<field>=none`` sets an optional field to None (ml_collections alone would parse float("none"))."""
    from diffjax.config import apply_none_overrides, split_none_overrides

    argv, paths = split_none_overrides(["prog", "--config.diffusion.min_snr_gamma=None", "--config.seed=1",
                                        "--config.model.num_classes=none", "--workdir=none"])
    assert argv == ["prog", "--config.seed=1", "--workdir=none"]
    assert paths == ["diffusion.min_snr_gamma", "model.num_classes"]
    c = base()
    c.model.num_classes = 10
    c.lock()
    apply_none_overrides(c, paths)
    assert c.diffusion.min_snr_gamma is None and c.model.num_classes is None
    for path, match in [("model.ch", "config.model.ch is not optional"), ("model.nope", "config.model.nope does not"),
                        ("nope.x", "config.nope does not")]:
        with pytest.raises(ValueError, match=match):
            apply_none_overrides(c, [path])


def test_main_job_writes_its_files_and_resumes(tmp_path):
    """The CLI end to end on a tiny digits model: files, metrics.json keys, the persistent compilation cache
    (written by the first run), and resume on rerun."""
    workdir, cache = str(tmp_path / "run"), tmp_path / "jax_cache"
    args = [sys.executable, "-m", "diffjax.main", "--workdir", workdir, "--noprogress", f"--compilation_cache_dir={cache}",
            "--config.model.ch=8", "--config.model.num_res_blocks=1", "--config.model.dropout=0.0",
            "--config.training.batch_size=16", "--config.diffusion.min_snr_gamma=None",
            "--config.training.log_every=2", "--config.training.checkpoint_every=2",
            "--config.sample.num_steps=4", "--config.sample.num_samples=8",
            "--config.eval.num_examples=8", "--config.eval.batch_size=8"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # first call: train 4 steps, sample, no NLL (one fewer compile); second call resumes to 6 and evaluates
    subprocess.run(args + ["--config.training.num_steps=4", "--config.eval.num_examples=0"], check=True,
                   cwd=REPO, env=env, capture_output=True, timeout=600)
    with open(os.path.join(workdir, "metrics.json")) as f:
        m = json.load(f)
    assert m["step"] == 4 and "final_loss" in m and "steps_per_sec" in m
    assert len(list(cache.iterdir())) > 3, "the CLI did not write its compiled programs to --compilation_cache_dir"
    for name in ("samples.png", "loss_curve.png", "loss_history.csv", "tensorboard", "checkpoints"):
        assert os.path.exists(os.path.join(workdir, name)), name
    subprocess.run(args + ["--config.training.num_steps=6"], check=True, cwd=REPO, env=env,
                   capture_output=True, timeout=600)
    with open(os.path.join(workdir, "metrics.json")) as f:
        m2 = json.load(f)
    assert m2["start_step"] == 4 and m2["step"] == 6
    for k in ("final_loss", "steps_per_sec", "test_bpd"):
        assert k in m2
    assert 0 < m2["test_bpd"] < 20


SHARDED_CONFIGS = {
    # MLP on the ring toy: Dense kernels get split by fsdp and model; compiles in seconds
    "mlp": """
        from diffjax.config import load
        c = load("REPO/experiments/configs/toy2d.py")
        c.model.width = 64; c.model.depth = 2; c.model.dropout = 0.1  # masks drawn on the sharded batch
        c.training.batch_size = 32; c.training.num_steps = 3; c.training.log_every = 1
        DATA = "ring"
    """,
    # the digits U-Net: conv kernels, GroupNorm, attention
    "unet": """
        from diffjax.config import base
        c = base()
        c.model.ch = 8; c.model.num_res_blocks = 1; c.model.dropout = 0.0
        c.training.batch_size = 16; c.training.num_steps = 3; c.training.log_every = 1
        DATA = "digits"
    """,
}


@pytest.mark.parametrize("model", ["mlp", pytest.param("unet", marks=pytest.mark.slow)])
def test_sharded_step_matches_single_device(tmp_path, model):
    """Three steps on 1 device and on 8 simulated devices (data parallel, FSDP, data x fsdp x model) agree;
    a checkpoint restores across meshes; sampling and the NLL split over the batch agree with 1 device."""
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from diffjax.config import base
        from diffjax.training.loop import setup, train
        CONFIG
        c.training.fsdp_min_size = 1024
        meshes = {"1 device": (1, dict(data=1)), "data 8": (8, dict(data=8)), "fsdp 8": (8, dict(data=1, fsdp=8)),
                  "data 2 fsdp 2 model 2": (8, dict(data=2, fsdp=2, model=2))}
        out = {}
        for name, (n, mesh) in meshes.items():
            c.training.num_devices = n; c.training.mesh.update({"data": 1, "fsdp": 1, "model": 1, **mesh})
            run, _ = train(c, f"{WORKDIR}/{name.replace(' ', '_')}", progress=False)
            out[name] = jax.tree.map(np.asarray, run.state.params)
            specs = {str(x.sharding.spec) for x in jax.tree.leaves(run.state.params)}
            print(name, sorted(specs))
        ref = jax.tree.leaves(out["1 device"])
        for name in list(meshes)[1:]:
            err = max(float(np.max(np.abs(a - b))) for a, b in zip(ref, jax.tree.leaves(out[name])))
            print(name, "max |diff|", err)
            assert err < 1e-4, (name, err)

        # checkpoints move between meshes: the 1-device checkpoint restored onto fsdp 8, and back
        from diffjax.training.loop import generate, setup
        from diffjax.data import eval_batches
        from diffjax.likelihood import evaluate_nll
        c.training.num_devices = 8; c.training.mesh.update({"data": 1, "fsdp": 8, "model": 1})
        run8 = setup(c, f"{WORKDIR}/1_device")
        assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(run8.state.params))
        c.training.num_devices = 1; c.training.mesh.update({"data": 1, "fsdp": 1, "model": 1})
        run1 = setup(c, f"{WORKDIR}/1_device")
        for a, b in zip(jax.tree.leaves(jax.device_get(run1.state)), jax.tree.leaves(jax.device_get(run8.state))):
            np.testing.assert_array_equal(a, b)
        # sampling and the test NLL split over the batch (12 samples: padded to 16 on 8 devices)
        key = jax.random.PRNGKey(3)
        x1, _ = generate(run1, method="ddim", num_steps=3, num_samples=12, key=key)
        x8, _ = generate(run8, method="ddim", num_steps=3, num_samples=12, key=key)
        assert x8.shape == (12, *run1.spec.shape), x8.shape
        print("sample max |diff|", float(np.max(np.abs(x1 - x8))))
        np.testing.assert_allclose(x8, x1, atol=1e-4)
        nll = [evaluate_nll(jax.tree_util.Partial(r.apply_eval, r.state.ema_params), r.schedule,
                            (b["x"] if isinstance(b, dict) else b for b in eval_batches(DATA, split="test", batch_size=16, num_examples=16)),
                            key=key, discrete=r.spec.num_bits is not None, num_bits=r.spec.num_bits or 8, prediction="v",
                            trace="hutchinson", rtol=1e-3, atol=1e-3,
                            mesh=r.mesh)["mean"] for r in (run1, run8)]
        print("bpd", nll)
        assert abs(nll[0] - nll[1]) < 1e-3 * abs(nll[0]), nll
        print("OK")
    """)
    config = textwrap.dedent(SHARDED_CONFIGS[model]).strip()
    script = script.replace("CONFIG", config).replace("WORKDIR", "'" + str(tmp_path) + "'").replace("REPO", REPO)
    # XLA's default collective timeout (40 s) is kept: a deadlocked rendezvous fails fast
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr[-3000:]
    assert "'fsdp'" in res.stdout and "'model'" in res.stdout  # parameters really were split


def test_time_budget_waits_for_dispatched_steps():
    """``max_train_seconds`` reads the clock after the dispatched steps finish, not when they were queued."""
    from types import SimpleNamespace

    from diffjax.training.loop import _TimeBudget

    class Pending:  # a dispatched step that finishes 0.3 s from now (what jax.block_until_ready waits on)
        def block_until_ready(self):
            time.sleep(0.3)
            return self

    budget = _TimeBudget(0.2, every=50)
    assert not budget.spent(1, SimpleNamespace(step=np.int32(1)))  # nothing pending: 0.2 s not yet spent
    assert budget.spent(2, SimpleNamespace(step=Pending())) and budget.stopped


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(REPO, "experiments", "configs"))
                                        if f.endswith(".py")))
def test_every_experiment_config_validates(name):
    """Each shipped config passes validation as written (e.g. steps_per_call divides its step counts)."""
    from diffjax.config import load

    validate_config(load(os.path.join(REPO, "experiments", "configs", name)), num_devices=1)


def test_ablate_recipe_rows_name_what_was_trained(tmp_path, monkeypatch):
    """The recipe table names a row by its trained values against the digits config now, and a re-run of the
    same recipe (under any cell name) replaces the row instead of adding one."""
    from experiments.ablations import ablate_recipe

    monkeypatch.setattr(ablate_recipe, "RESULTS", str(tmp_path / "rows.jsonl"))
    now = ablate_recipe.recipe_values("v_minsnr5")
    assert ablate_recipe.label(now) == "(the digits config)"
    flipped = dict(now, **{"model.skip_rescale": not now["model.skip_rescale"]})
    assert ablate_recipe.label(flipped) == f"`model.skip_rescale={not now['model.skip_rescale']}`"
    eps = ablate_recipe.recipe_values("eps")
    assert eps["diffusion.objective"] == "eps" and eps["diffusion.min_snr_gamma"] is None
    row = dict(cell="v_minsnr5", fields={}, recipe=now, steps=10, train_seed=0, nfe=20, num_samples=8, grid="logSNR",
               sample_seeds=[0], fds=[1.0], fd=1.0, final_loss=0.1, wall_s=1.0, date="")
    ablate_recipe.store(row)
    ablate_recipe.store(dict(row, cell="renamed", fd=2.0, fds=[2.0]))  # same recipe: replaces
    ablate_recipe.store(dict(row, recipe=flipped, fd=3.0, fds=[3.0]))  # another recipe: a second row
    rows = ablate_recipe.load_rows()
    assert sorted(r["fd"] for r in rows) == [2.0, 3.0]
    table = ablate_recipe.render(rows)
    assert "| 10 | (the digits config) | renamed | logSNR | seed 0: 2.0" in table


# ---- gradient accumulation, EMA warm-up, log line, restart after the last step, evaluation during training --


def _tiny_toy_run(**training):
    c = toy_config(4)
    c.model.width = 16
    c.training.batch_size = 16
    c.training.update(training)
    return c, setup(c, None)


def test_grad_accumulation_equals_the_full_batch_update():
    """k micro-batches give the full batch's update (a loss that draws nothing), fused or not; with the diffusion
    loss micro-batch i uses rows i, i + k, ... and the key fold_in(step_key, i)."""
    from diffjax.training import make_train_step
    from diffjax.training.builders import build_loss, build_optimizer
    from diffjax.training.step import split_micro_batches

    c, run = _tiny_toy_run()
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 2))

    def regression(params, batch, key):  # no randomness: the batch mean splits exactly into micro-batch means
        pred = run.apply_eval(params, batch["x"], jnp.full((batch["x"].shape[0],), 0.5))
        return jnp.mean((pred - batch["x"]) ** 2), None

    opt = build_optimizer(c)
    steps = {(k, s): make_train_step(regression, opt, ema_decay=0.9, grad_accum_steps=k, steps_per_call=s,
                                     donate=False) for k, s in ((1, 1), (4, 1), (4, 2))}
    full, m_full = steps[1, 1](run.state, {"x": x[0]})
    accum, m_accum = steps[4, 1](run.state, {"x": x[0]})
    chex.assert_trees_all_close(accum.params, full.params, atol=1e-6)
    chex.assert_trees_all_close(accum.ema_params, full.ema_params, atol=1e-6)
    np.testing.assert_allclose(m_accum["loss"], m_full["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_accum["grad_norm"], m_full["grad_norm"], rtol=1e-5)
    two_full, _ = steps[1, 1](full, {"x": x[1]})
    two_accum, _ = steps[4, 2](run.state, {"x": x})  # fused with steps_per_call
    chex.assert_trees_all_close(two_accum.params, two_full.params, atol=1e-6)

    loss_fn = build_loss(c, run.schedule, run.module)  # the diffusion loss: noise and times from the key
    _, m = make_train_step(loss_fn, opt, ema_decay=0.9, grad_accum_steps=4, donate=False)(run.state, {"x": x[0]})
    step_key = jax.random.fold_in(run.state.key, run.state.step)
    micro = split_micro_batches(x[0], 4)
    np.testing.assert_array_equal(micro[1], x[0][1::4])
    micro_loss = jax.jit(lambda mb, k: loss_fn(run.state.params, {"x": mb}, k)[0])
    expected = np.mean([micro_loss(micro[i], jax.random.fold_in(step_key, i)) for i in range(4)])
    np.testing.assert_allclose(m["loss"][0], expected, rtol=1e-5)
    with pytest.raises(ValueError, match="grad_accum_steps must be an integer >= 1"):
        make_train_step(regression, opt, ema_decay=0.9, grad_accum_steps=0)
    bad = base()
    bad.training.grad_accum_steps = 3
    with pytest.raises(ConfigError, match="config.training.grad_accum_steps"):
        validate_config(bad, num_devices=1)


def test_ema_warmup_decay_schedule():
    """min(decay, (1 + n) / (10 + n)) after n updates with warm-up; the constant decay without; one step's EMA."""
    from diffjax.training import make_train_step
    from diffjax.training.builders import build_optimizer
    from diffjax.training.state import ema_decay_at

    n = jnp.arange(0, 1000)  # (1 + n) / (10 + n) reaches 0.99 at n = 890
    warm = ema_decay_at(n, 0.99, warmup=True)
    np.testing.assert_allclose(warm[:3], [1 / 10, 2 / 11, 3 / 12], rtol=1e-6)
    np.testing.assert_allclose(warm, np.minimum(0.99, (1 + np.arange(1000)) / (10 + np.arange(1000))), rtol=1e-6)
    assert float(warm[-1]) == pytest.approx(0.99) and bool(jnp.all(jnp.diff(warm) >= 0))
    np.testing.assert_allclose(ema_decay_at(n, 0.99), 0.99)
    c, run = _tiny_toy_run()

    def loss(params, batch, key):
        return sum(jnp.sum(p**2) for p in jax.tree.leaves(params)), None

    new, _ = make_train_step(loss, build_optimizer(c), ema_decay=0.99, ema_warmup=True, donate=False)(
        run.state, {"x": jnp.zeros((16, 2))})
    # step 0: decay 0.1, so the EMA moves 90% of the way to the new parameters
    chex.assert_trees_all_close(new.ema_params, jax.tree.map(lambda e, p: 0.1 * e + 0.9 * p, run.state.ema_params,
                                                             new.params), atol=1e-6)
    import ml_collections

    d = base().to_dict()
    d["optim"]["ema_warmup"] = "yes"  # as a hand-edited config.json could hold it (ConfigDict fields are typed)
    bad = ml_collections.ConfigDict(d)
    with pytest.raises(ConfigError, match="config.optim.ema_warmup"):
        validate_config(bad, num_devices=1)


def test_log_lines_evaluation_during_training_and_restart_after_the_last_step(tmp_path, capsys):
    """Without the bar a line per log_every steps; sample_every / eval_every write grids and eval_history.csv;
    a run started again after its last step reports that step's loss (not null) and trains nothing."""
    c = toy_config(4)
    c.model.width = 16
    c.training.update(batch_size=16, log_every=2, checkpoint_every=2, sample_every=2, eval_every=4)
    c.sample.update(num_samples=8, num_steps=2, method="ddim")
    c.eval.update(num_examples=8, batch_size=8, trace="exact")
    run, first = train(c, str(tmp_path), progress=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 2", "step 4"], lines
    assert "steps/s" in lines[0] and "loss" in lines[0]
    assert os.path.exists(tmp_path / "samples" / "step_2.png") and os.path.exists(tmp_path / "samples" / "step_4.png")
    with open(tmp_path / "eval_history.csv") as f:
        rows = f.read().splitlines()
    assert rows[0].startswith("step,") and "test_nats_per_dim" in rows[0] and len(rows) == 2 and rows[1][0] == "4"
    again, second = train(c, str(tmp_path), progress=False)
    assert second["steps"] == 0 and second["step"] == 4
    assert np.isfinite(first["final_loss"]) and second["final_loss"] == first["final_loss"]
    with open(tmp_path / "checkpoints" / "config_4.json") as f:
        assert json.load(f)["training"]["eval_every"] == 4  # the config is stored with each checkpoint


def test_bfloat16_compute_keeps_float32_parameters_and_optimizer_state(tmp_path):
    """config.model.dtype / kernels reach the module; bfloat16 compute trains with float32 params, moments, EMA."""
    c = toy_config(2)
    c.model.update(width=16, dtype="bfloat16", kernels="xla")
    c.training.update(batch_size=16, log_every=2, checkpoint_every=2)
    run, summary = train(c, str(tmp_path), progress=False)
    assert run.module.dtype == "bfloat16" and run.module.kernels == "xla"
    floats = [x for x in jax.tree.leaves(run.state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    assert np.isfinite(summary["final_loss"])
