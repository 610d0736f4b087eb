"""``diffjax.sample(..., save_at=...)``: the states and x0 predictions at chosen grid times; the plotting helpers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffjax
from diffjax.parameterization import make_denoiser
from diffjax.samplers.trajectory import Trajectory, plot_nfe_error, plot_trajectory, trajectory_image
from diffjax.testing.gmm import ring_mixture

KEY = jax.random.PRNGKey(0)
VP = diffjax.VPLinear()
MF = ring_mixture().model_fn(VP)
X_T = VP.prior_sample(KEY, (16, 2))
TS = jnp.array([1.0, 0.7, 0.45, 0.25, 0.1, 0.0])  # 5 intervals, the last to sigma = 0


def test_segmented_trajectory_is_the_run():
    """A Markov method (DDIM) saved at grid indices: x_T, the run on the truncated grid, and the sample itself
    (equal to the call without save_at); x0 is E[x_0 | x_t] at each saved state, the sample at sigma = 0."""
    x, traj, nfe = diffjax.sample(MF, VP, X_T, method="ddim", num_steps=5, grid=TS, save_at=[0, 2, -1],
                                  return_nfe=True)
    assert isinstance(traj, Trajectory) and nfe == 5
    assert traj.x.shape == (3, 16, 2) and traj.x0.shape == (3, 16, 2)
    np.testing.assert_array_equal(traj.t, TS[jnp.array([0, 2, 5])])
    np.testing.assert_array_equal(traj.x[0], X_T)
    chex.assert_trees_all_close(traj.x[1], diffjax.sample(MF, VP, X_T, method="ddim", num_steps=2, grid=TS[:3]),
                                atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(x, diffjax.sample(MF, VP, X_T, method="ddim", num_steps=5, grid=TS), atol=1e-6)
    chex.assert_trees_all_equal(traj.x[-1], x)
    chex.assert_trees_all_equal(traj.x0[-1], x)
    den = make_denoiser(MF, VP)
    chex.assert_trees_all_close(traj.x0[1], den(traj.x[1], TS[2]).x0, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_solver_saved_trajectory():
    """A method that saves from inside its solve (edm_euler; tests/test_unipc.py checks unipc's saved states against
    diffusers' loop): the state at index 3 is the run on TS[:4]; save_at='all' returns every grid time, the last
    the sample; one evaluation per interval."""
    x, traj, nfe = diffjax.sample(MF, VP, X_T, method="edm_euler", num_steps=5, grid=TS, save_at="all",
                                  return_nfe=True)
    assert traj.x.shape == (6, 16, 2) and nfe == 5
    chex.assert_trees_all_equal(traj.x[-1], x)
    part = diffjax.sample(MF, VP, X_T, method="edm_euler", num_steps=3, grid=TS[:4])
    chex.assert_trees_all_close(traj.x[3], part, atol=1e-5, rtol=1e-5)


def test_save_at_bad_input():
    for bad, match in (("every", "save_at must be 'all'"), ([0, 6], r"indices must lie in \[-6, 5\]"),
                       ([0.5], "integer grid indices")):
        with pytest.raises(ValueError, match=match):
            diffjax.sample(MF, VP, X_T, method="ddim", num_steps=5, grid=TS, save_at=bad)
    with pytest.raises(ValueError, match="save_at is not available for method 'dpm_solver\\+\\+_2m'"):
        diffjax.sample(MF, VP, X_T, method="dpm_solver++_2m", num_steps=5, grid=TS, save_at=[1])


def test_plot_helpers(tmp_path):
    """The pictures: a scatter per saved time for 2-D data, an image grid (rows = examples, columns = times),
    an NFE-error plot."""
    traj = Trajectory(jnp.array([1.0, 0.5, 0.0]), jnp.ones((3, 16, 2)), jnp.zeros((3, 16, 2)))
    plot_trajectory(traj, str(tmp_path / "traj.png"))
    imgs = Trajectory(jnp.array([1.0, 0.0]), jnp.zeros((2, 5, 4, 4, 1)), jnp.linspace(-1, 1, 160).reshape(2, 5, 4, 4, 1))
    pic = trajectory_image(imgs, "x0", num_examples=3)
    assert pic.shape == (3 * 5 + 1, 2 * 5 + 1, 3) and pic.dtype == np.uint8
    plot_nfe_error({"a": ([5, 10, 20], [0.3, 0.1, 0.02]), "b": ([5, 10], [0.4, 0.2])}, str(tmp_path / "nfe.png"))
    assert (tmp_path / "traj.png").stat().st_size > 0 and (tmp_path / "nfe.png").stat().st_size > 0
    with pytest.raises(ValueError, match="2 NFE values but 3 errors"):
        plot_nfe_error({"a": ([5, 10], [0.3, 0.1, 0.02])}, str(tmp_path / "bad.png"))
