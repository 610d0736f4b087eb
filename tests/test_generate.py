"""python -m diffjax.generate: samples in the data's range and shape, labels beside them, guided or not."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from diffjax.config import load
from diffjax.generate import generate_samples, parse_labels
from diffjax.training.loop import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    """A class-conditional MLP on the 8-mode ring (component = class), trained for a few steps."""
    workdir = str(tmp_path_factory.mktemp("cond"))
    c = load(os.path.join(REPO, "experiments", "configs", "toy2d.py"))
    c.model.width, c.model.depth, c.model.num_classes = 32, 2, 8
    c.training.batch_size, c.training.num_steps, c.training.log_every = 32, 4, 2
    c.sample.num_samples, c.sample.num_steps, c.eval.num_examples = 8, 3, 0
    train_and_evaluate(c, workdir, progress=False)
    return workdir


def _toy_config(**model):
    c = load(os.path.join(REPO, "experiments", "configs", "toy2d.py"))
    c.model.width, c.model.depth = 32, 2
    c.model.update(model)
    c.training.batch_size, c.training.num_steps, c.training.log_every = 32, 4, 2
    c.sample.num_samples, c.sample.num_steps, c.eval.num_examples = 8, 3, 0
    return c


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    """A noise-conditional MLP classifier of the ring's 8 classes (config.task = 'classifier')."""
    workdir = str(tmp_path_factory.mktemp("clf"))
    c = _toy_config()
    c.task = "classifier"
    train_and_evaluate(c, workdir, progress=False)
    return workdir


@pytest.fixture(scope="module")
def unconditional_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uncond"))
    train_and_evaluate(_toy_config(), workdir, progress=False)
    return workdir


def test_classifier_guided_samples(unconditional_run, conditional_run, classifier_run):
    """ADM-G from the CLI's function: an unconditional model guided by the trained classifier (labels
    from the classifier's classes), and a conditional one with both guidances; s = 0 is unguided."""
    kw = dict(num_steps=3, method="ddim", classifier_workdir=classifier_run)
    x, y = generate_samples(unconditional_run, 8, labels="all", classifier_scale=3.0, **kw)
    assert x.shape == (8, 2) and np.all(np.isfinite(x))
    np.testing.assert_array_equal(y, np.arange(8))
    x0, _ = generate_samples(unconditional_run, 8, labels="all", classifier_scale=0.0, **kw)
    np.testing.assert_array_equal(x0, generate_samples(unconditional_run, 8, num_steps=3, method="ddim")[0])
    assert not np.allclose(x, x0)
    xc, _ = generate_samples(conditional_run, 8, labels="all", guidance_scale=1.0, classifier_scale=3.0, **kw)
    assert xc.shape == (8, 2) and np.all(np.isfinite(xc))


def test_classifier_guidance_bad_input(unconditional_run, classifier_run, tmp_path):
    with pytest.raises(ValueError, match="--classifier_scale needs --classifier_workdir"):
        generate_samples(unconditional_run, 2, classifier_scale=1.0)
    with pytest.raises(ValueError, match="holds a diffusion run, not a classifier run"):
        generate_samples(unconditional_run, 2, classifier_workdir=unconditional_run, classifier_scale=1.0)
    with pytest.raises(ValueError, match="holds a classifier run, which draws no samples"):
        generate_samples(classifier_run, 2)
    with pytest.raises(ValueError, match=r"--labels must lie in \[0, 8\)"):
        generate_samples(unconditional_run, 2, labels="9", classifier_workdir=classifier_run, classifier_scale=1.0)
    other = tmp_path / "ve"
    other.mkdir()
    cfg = json.load(open(os.path.join(classifier_run, "config.json")))
    cfg["diffusion"]["schedule"] = "ve"
    json.dump(cfg, open(other / "config.json", "w"))
    with pytest.raises(ValueError, match="trained on another schedule"):
        generate_samples(unconditional_run, 2, classifier_workdir=str(other), classifier_scale=1.0)


def test_guided_samples_with_labels(conditional_run):
    x, y = generate_samples(conditional_run, 10, labels="all", guidance_scale=2.0, num_steps=3, method="ddim",
                            batch_size=4)
    assert x.shape == (10, 2) and x.dtype == np.float32 and np.all(np.isfinite(x))
    np.testing.assert_array_equal(y, [0, 1, 2, 3, 4, 5, 6, 7, 0, 1])
    x1, y1 = generate_samples(conditional_run, 3, labels="5", num_steps=3, method="ddim")
    np.testing.assert_array_equal(y1, [5, 5, 5])
    # the same call twice gives the same samples (seeded), a guided call differs from an unguided one
    x2, _ = generate_samples(conditional_run, 10, labels="all", guidance_scale=2.0, num_steps=3, method="ddim",
                             batch_size=4)
    np.testing.assert_array_equal(x, x2)
    x0, _ = generate_samples(conditional_run, 10, labels="all", num_steps=3, method="ddim", batch_size=4)
    assert not np.allclose(x0, x)


def test_cli_writes_samples_and_labels(conditional_run, tmp_path):
    out = str(tmp_path / "s.npy")
    res = subprocess.run([sys.executable, "-m", "diffjax.generate", "--workdir", conditional_run, "--num_samples", "6",
                          "--labels", "3,1", "--guidance_scale", "1.5", "--num_steps", "3", "--out", out],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert np.load(out).shape == (6, 2)
    np.testing.assert_array_equal(np.load(str(tmp_path / "s_labels.npy")), [3, 1, 3, 1, 3, 1])
    bad = subprocess.run([sys.executable, "-m", "diffjax.generate", "--workdir", conditional_run, "--num_samples", "2",
                          "--labels", "8", "--out", out], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert bad.returncode == 2 and "--labels must lie in [0, 8)" in bad.stderr


@pytest.mark.parametrize("spec, classes, match", [
    ("3", None, "unconditional"),
    ("-1", 10, r"must lie in \[0, 10\)"),
    ("a,b", 10, "comma-separated integers"),
])
def test_bad_labels_are_named(spec, classes, match):
    with pytest.raises(ValueError, match=match):
        parse_labels(spec, classes, 4)


def test_bad_sampler_arguments_are_named(conditional_run):
    with pytest.raises(ValueError, match="--num_steps must be >= 1"):
        generate_samples(conditional_run, 2, num_steps=0)
    with pytest.raises(ValueError, match="--method must be one of"):
        generate_samples(conditional_run, 2, method="magic")


def test_missing_workdir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        generate_samples(str(tmp_path), 2)


def test_data_range_round_trip():
    from diffjax.data import from_data_range, to_data_range

    for bits in (4, 8):
        u = np.arange(2**bits, dtype=np.float32)
        np.testing.assert_array_equal(from_data_range(to_data_range(u, bits), bits), u)
    assert from_data_range(np.array([-3.0, 3.0]), 8).tolist() == [0, 255]  # out-of-range samples clip


def test_config_sample_grid_is_the_default_grid(unconditional_run):
    """config.sample.grid (saved with the run) picks the time grid when the caller names none."""
    from diffjax import load_run
    from diffjax.training.loop import generate

    import jax

    run = load_run(unconditional_run, task="diffusion").run
    key = jax.random.PRNGKey(3)
    draw_ = lambda **o: generate(run, method="dpm_solver++_2m", num_steps=4, num_samples=6, key=key, **o)[0]  # noqa: E731
    assert run.config.sample.grid == "time_uniform"  # base()'s
    uniform, log_snr = draw_(), draw_(grid="logSNR")
    assert not np.allclose(uniform, log_snr)
    np.testing.assert_array_equal(uniform, draw_(grid="time_uniform"))
    run.config.unlock()
    run.config.sample.grid = None  # the method's own: logSNR for dpm_solver++
    np.testing.assert_array_equal(draw_(), log_snr)
    np.testing.assert_array_equal(draw_(grid="time_uniform"), uniform)  # an explicit grid wins
    run.config.sample.grid = "time_uniform"
    other = generate(run, method="dpm_solver++_3m", num_steps=4, num_samples=6, key=key)[0]
    own = generate(run, method="dpm_solver++_3m", num_steps=4, num_samples=6, key=key, grid="logSNR")[0]
    np.testing.assert_array_equal(other, own)  # the config's grid belongs to config.sample.method only


# ---- diffjax.load_run: the same runs from Python -------------------------------------------------------


def test_load_run_samples_as_the_cli_does_and_scores_as_the_trainer_does(unconditional_run):
    """load_run rebuilds the run from the config stored with its checkpoint: EMA params, model_fn, schedule;
    its samples are the CLI's (same seed), and nll_per_dim is the main job's test NLL on the same data."""
    import jax

    import diffjax
    from diffjax.data import eval_batches
    from diffjax.training import loop
    from diffjax.training.builders import build_schedule

    run = diffjax.load_run(unconditional_run)
    assert run.step == 4 and run.task == "diffusion" and run.num_classes is None
    assert run.config.model.name == "mlp" and run.schedule == build_schedule(run.config.diffusion)
    assert all(bool(jax.numpy.array_equal(a, b)) for a, b in
               zip(jax.tree.leaves(run.params), jax.tree.leaves(run.run.state.ema_params)))
    assert run.model_fn(np.zeros((3, 2), np.float32), np.full((3,), 0.5, np.float32)).shape == (3, 2)
    x, nfe = run.sample(8, method="ddim", num_steps=3, key=jax.random.PRNGKey(0), return_nfe=True)
    assert x.shape == (8, 2) and x.dtype == np.float32 and nfe >= 3
    np.testing.assert_array_equal(x, generate_samples(unconditional_run, 8, method="ddim", num_steps=3)[0])
    run.config.eval.update(num_examples=8, batch_size=8)
    key = jax.random.PRNGKey(4)
    data = next(eval_batches("ring", split="test", batch_size=8, num_examples=8))
    nll = run.nll_per_dim(data["x"] if isinstance(data, dict) else data, key=key)
    assert nll["unit"] == "nats/dim" and nll["num_examples"] == 8 and np.isfinite(nll["mean"])
    assert nll["mean"] == loop._test_split_nll(run.run, key)["test_nats_per_dim"]
    with pytest.raises(ValueError, match=r"x must have shape \(N, 2\)"):
        run.nll_per_dim(np.zeros((4, 3), np.float32))
    # log_likelihood: the PF-ODE log-density of the same model per example; the evaluation's nats/dim is
    # -logp / D of the same points (continuous data: no dequantization), up to the different ODE tolerances
    res = run.log_likelihood(data["x"] if isinstance(data, dict) else data, trace="exact", rtol=1e-3, atol=1e-3)
    assert res.logp.shape == (8,) and np.all(np.isfinite(res.logp))
    np.testing.assert_allclose(-float(np.mean(res.logp)) / 2, nll["mean"], rtol=0.05)
    with pytest.raises(ValueError, match=r"x must be finite"):
        run.log_likelihood(np.full((2, 2), np.nan, np.float32))
    with pytest.raises(ValueError, match="labels are needed exactly when"):
        run.sample(2, labels=[0, 1])
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 3"):
        diffjax.load_run(unconditional_run, step=3)


def test_load_run_guided_samples(conditional_run, classifier_run):
    """Classifier-free guidance from Python equals the CLI's; a classifier run loads as one and samples nothing."""
    import jax

    import diffjax

    run = diffjax.load_run(conditional_run)
    assert run.num_classes == 8
    x = run.sample(8, method="ddim", num_steps=3, labels=np.arange(8), guidance_scale=2.0, key=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(x, generate_samples(conditional_run, 8, labels="all", guidance_scale=2.0,
                                                      method="ddim", num_steps=3)[0])
    with pytest.raises(ValueError, match=r"labels must be \(8,\) integers"):
        run.sample(8, labels=np.arange(4))
    classifier = diffjax.load_run(classifier_run, task="classifier")
    with pytest.raises(ValueError, match="holds a classifier run, which draws no samples"):
        classifier.sample(2)
    xc = run.sample(8, method="ddim", num_steps=3, labels=np.arange(8), classifier=classifier, classifier_scale=3.0)
    assert xc.shape == (8, 2) and np.all(np.isfinite(xc))


def test_cli_modules_import_together():
    """Both CLIs define their flags only when run as programs, so one process imports both (and diffjax)."""
    res = subprocess.run([sys.executable, "-c", "import diffjax, diffjax.main, diffjax.generate; "
                          "from absl import flags; assert 'workdir' not in flags.FLAGS; print('ok')"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
