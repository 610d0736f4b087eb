"""python -m diffjax.generate: samples in the data's range and shape, labels beside them, guided or not."""

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
