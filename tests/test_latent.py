"""End to end: an autoencoder run, a latent-diffusion run on it, sampling as images, the latent NLL, resume.

Slow (two main-job runs with compilation and a likelihood evaluation: ~70 s on 2 idle cores); the math and the
config checks are in tests/test_autoencoder.py.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffjax import autoencoder as ae
from diffjax import data as data_lib
from diffjax.config import load
from diffjax.training import task_autoencoder, task_latent
from diffjax.training.builders import ConfigError

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "experiments", "configs")


def _tiny_training(c, steps=10):
    c.training.update(batch_size=16, num_steps=steps, steps_per_call=5, log_every=5, checkpoint_every=5)
    c.eval.update(num_examples=8, batch_size=8)
    return c


def ae_config():
    c = _tiny_training(load(os.path.join(CONFIGS, "digits_ae.py")))
    c.autoencoder.update(ch=8, latent_channels=2, mid_attn=False)
    return c


def latent_config(ae_workdir):
    c = _tiny_training(load(os.path.join(CONFIGS, "digits_latent_unet.py")))
    c.autoencoder = ae_config().autoencoder
    c.latent.autoencoder_workdir = ae_workdir
    c.model.update(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    c.sample.update(num_samples=4, num_steps=4)
    c.eval.update(rtol=1e-2, atol=1e-2)
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from diffjax.training.loop import train_and_evaluate

    root = tmp_path_factory.mktemp("latent")
    ae_dir, lat_dir = str(root / "ae"), str(root / "latent")
    ae_metrics = train_and_evaluate(ae_config(), ae_dir, progress=False)
    lat_metrics = train_and_evaluate(latent_config(ae_dir), lat_dir, progress=False)
    return dict(ae_dir=ae_dir, lat_dir=lat_dir, ae_metrics=ae_metrics, lat_metrics=lat_metrics)


def test_autoencoder_run_reports_reconstruction(runs):
    m = json.load(open(os.path.join(runs["ae_dir"], "metrics.json")))
    assert m["eval_examples"] == 8
    # PSNR is 10 log10(4 / MSE) of the same numbers
    np.testing.assert_allclose(m["test_recon_psnr"], 10 * np.log10(4.0 / m["test_recon_mse"]), rtol=1e-5)
    assert 0 < m["test_recon_mse"] < 4.0 and m["test_kl_per_latent_dim"] >= 0
    assert "test_bpd" not in m and "sample_nfe" not in m


def test_latent_metrics_are_labelled_latent(runs):
    m = json.load(open(os.path.join(runs["lat_dir"], "metrics.json")))
    assert "test_bpd" not in m and "test_nats_per_dim" not in m
    assert np.isfinite(m["test_latent_bits_per_dim"]) and m["nll_examples"] == 8
    assert m["latent_scale_factor"] > 0


def test_scale_factor_gives_unit_variance_first_batch(runs):
    """The stored factor scales the first training batch's posterior samples to std 1 (LDM's scale_by_std)."""
    import diffjax

    run = diffjax.load_run(runs["lat_dir"])
    extra = run.run.state.extra
    s = float(extra["scale_factor"])
    metrics = json.load(open(os.path.join(runs["lat_dir"], "metrics.json")))
    np.testing.assert_allclose(s, metrics["latent_scale_factor"], rtol=1e-6)
    c = run.config
    codec = ae.make_codec(task_autoencoder.build_autoencoder(c))
    x = next(data_lib.train_batches(c.data.dataset, global_batch_size=c.training.batch_size, seed=c.seed,
                                    dequantize=c.data.dequantize))["x"]
    key = jax.random.fold_in(jax.random.PRNGKey(c.seed), 2**20)
    z = ae.posterior_sample(jax.random.fold_in(key, 0), codec.encode(extra["autoencoder"], x))
    np.testing.assert_allclose(np.std(np.asarray(z) * s), 1.0, rtol=1e-4)


def test_load_run_samples_images(runs):
    import diffjax

    run = diffjax.load_run(runs["lat_dir"])
    x = run.sample(5, num_steps=3)
    assert x.shape == (5, 8, 8, 1) and x.dtype == np.uint8
    with pytest.raises(ValueError, match="latent"):
        run.nll_per_dim(x)


def test_generate_samples_writes_images(runs, tmp_path):
    from diffjax.generate import generate_samples

    x, y = generate_samples(runs["lat_dir"], 3, num_steps=2)
    assert x.shape == (3, 8, 8, 1) and x.dtype == np.uint8 and y is None


def test_generate_cli_writes_npy(runs, tmp_path):
    out = tmp_path / "s.npy"
    subprocess.run([sys.executable, "-m", "diffjax.generate", "--workdir", runs["lat_dir"], "--num_samples", "3",
                    "--num_steps", "2", "--out", str(out)], check=True, cwd=ROOT)
    x = np.load(out)
    assert x.shape == (3, 8, 8, 1) and x.dtype == np.uint8


def test_resume_keeps_scale_factor_without_the_autoencoder(runs, tmp_path):
    """A resume restores the scale factor and autoencoder from the checkpoint: the autoencoder run is not read."""
    import shutil

    from diffjax.training.loop import setup, train

    lat_dir = str(tmp_path / "latent")
    shutil.copytree(runs["lat_dir"], lat_dir)
    before = json.load(open(os.path.join(lat_dir, "metrics.json")))["latent_scale_factor"]
    c = latent_config(str(tmp_path / "no_such_run"))
    c.training.num_steps = 15
    run, summary = train(c, lat_dir, run=setup(c, lat_dir), progress=False)
    assert summary["start_step"] == 10 and summary["step"] == 15
    np.testing.assert_allclose(float(run.state.extra["scale_factor"]), before, rtol=0)


def test_architecture_mismatch_names_field(runs):
    c = latent_config(runs["ae_dir"])
    c.autoencoder.ch = 16
    with pytest.raises(ConfigError, match="config.autoencoder.ch:"):
        task_latent.load_autoencoder(c)
    c = latent_config(runs["lat_dir"])  # not an autoencoder run
    with pytest.raises(ConfigError, match="config.latent.autoencoder_workdir"):
        task_latent.load_autoencoder(c)
