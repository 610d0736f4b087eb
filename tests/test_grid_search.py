"""Optimised time grids (``diffjax.samplers.grid_search``) on the Gaussian-mixture oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffjax
from diffjax.samplers.grid_search import grid_error, load_grid, optimise_grid, save_grid
from diffjax.testing.gmm import ring_mixture

NUM_STEPS = 5  # ddim: 4 intervals to t_min and the step to sigma = 0, NFE 5


def _karras(sched, num_steps, rho=7.0):
    """EDM eq. 5 in s = sigma / alpha from t = 1 to t_min (num_steps - 1 intervals), then t = 0."""
    s_max, s_min = (float(sched.sigma(t) / sched.alpha(t)) for t in (1.0, sched.t_min))
    i = np.arange(num_steps) / (num_steps - 1)
    s = (s_max ** (1 / rho) + i * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    ts = np.array(sched.t_from_log_snr(-jnp.log(jnp.asarray(s))))
    ts[0], ts[-1] = 1.0, sched.t_min
    return np.concatenate([ts, [0.0]])


@pytest.fixture(scope="module")
def problem():
    sched = diffjax.DiscreteDDPM.linear()
    model_fn = ring_mixture().model_fn(sched, "eps")
    x_train = sched.prior_sample(jax.random.PRNGKey(0), (256, 2))
    x_test = sched.prior_sample(jax.random.PRNGKey(1), (256, 2))

    def exact(x_T):  # DPM-Solver-3 on 300 logSNR steps: the PF-ODE endpoint to ~1e-6 (O(h^3))
        return diffjax.sample(model_fn, sched, x_T, method="dpm_solver_3", num_steps=300, t_end=0.0)

    ref_train, ref_test = exact(x_train), exact(x_test)
    ts, info = optimise_grid(model_fn, sched, x_train, method="ddim", num_steps=NUM_STEPS, reference=ref_train,
                             sweeps=4)
    return dict(sched=sched, model_fn=model_fn, x_train=x_train, x_test=x_test, ref_train=ref_train,
                ref_test=ref_test, ts=ts, info=info)


def test_optimised_grid_beats_named_grids_on_held_out_x_T(problem):
    sched, ts = problem["sched"], problem["ts"]
    assert ts.shape == (NUM_STEPS + 1,) and ts[0] == 1.0 and ts[-1] == 0.0 and np.all(np.diff(ts) < 0)
    assert problem["info"]["nfe"] == NUM_STEPS
    err = dict(optimised=grid_error(problem["model_fn"], sched, problem["x_test"], problem["ref_test"], ts,
                                    method="ddim"),
               karras=grid_error(problem["model_fn"], sched, problem["x_test"], problem["ref_test"],
                                 _karras(sched, NUM_STEPS), method="ddim"))
    for name in ("time_uniform", "logSNR"):
        x = diffjax.sample(problem["model_fn"], sched, problem["x_test"], method="ddim", num_steps=NUM_STEPS,
                           t_end=0.0, grid=name)
        err[name] = float(jnp.sqrt(jnp.mean((x - problem["ref_test"]) ** 2)))
    best_named = min(v for k, v in err.items() if k != "optimised")
    # fitted on other x_T, the grid must still cut the best named grid's error by >= 20 %
    assert err["optimised"] < 0.8 * best_named, err


def test_search_never_worsens_and_reports_what_sample_measures(problem):
    info = problem["info"]
    assert info["rms"] <= info["rms_init"]
    # the search's loss is the error diffjax.sample makes on the training x_T with the stored grid
    rms = grid_error(problem["model_fn"], problem["sched"], problem["x_train"], problem["ref_train"],
                     problem["ts"], method="ddim")
    assert rms == pytest.approx(info["rms"], rel=1e-3)


def test_save_load_roundtrip(problem, tmp_path):
    path = str(tmp_path / "grid.npz")
    save_grid(path, problem["ts"], **problem["info"])
    ts, meta = load_grid(path, with_metadata=True)
    np.testing.assert_array_equal(ts, np.asarray(problem["ts"], np.float64))
    assert meta["method"] == "ddim" and meta["nfe"] == NUM_STEPS and meta["schedule"].startswith("DiscreteDDPM")
    x = diffjax.sample(problem["model_fn"], problem["sched"], problem["x_train"], method="ddim",
                       num_steps=NUM_STEPS, grid=load_grid(path))
    assert np.all(np.isfinite(np.asarray(x)))
    with pytest.raises(ValueError, match="npz"):
        save_grid(str(tmp_path / "grid.json"), problem["ts"])
    with pytest.raises(ValueError, match="decreasing"):
        save_grid(path, problem["ts"][::-1])


def test_bad_arguments_raise(problem):
    args = (problem["model_fn"], problem["sched"], problem["x_train"][:4])
    for kwargs, field in ((dict(method="nope", num_steps=3), "method"),
                          (dict(method="ddim", num_steps=1), "num_steps"),
                          (dict(method="ddim", num_steps=3, candidates=4), "candidates"),
                          (dict(method="ddim", num_steps=3, eta=-1.0, bogus=1), "bogus"),
                          (dict(method="dpm_adaptive", num_steps=3), "own steps"),
                          (dict(method="ddim", num_steps=3, reference=jnp.zeros((3, 2))), "reference")):
        with pytest.raises(ValueError, match=field):
            optimise_grid(*args, **kwargs)


def test_several_starts_and_a_stored_grid_refined_past_its_last_time(problem):
    sched, x_train, ref = problem["sched"], problem["x_train"], problem["ref_train"]
    stored = np.array([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])  # e.g. a trailing grid; its last time before 0 is 0.2
    kw = dict(method="ddim", num_steps=NUM_STEPS, reference=ref, sweeps=2)
    ts_one, info_one = optimise_grid(problem["model_fn"], sched, x_train, init=stored, **kw)
    # the free last point may move anywhere in (previous time, t_min], not only above the start's
    assert ts_one[-2] < 0.2, ts_one
    ts, info = optimise_grid(problem["model_fn"], sched, x_train, init=(stored, "logSNR"), **kw)
    assert info["inits"] == [stored.tolist(), "logSNR"] and len(info["rms_searched"]) == 2
    # each start is searched as on its own; the lowest training error wins
    assert info["rms_searched"][0] == pytest.approx(info_one["rms"], rel=1e-6)
    assert info["rms"] == min(info["rms_searched"]) <= info_one["rms"]
    with pytest.raises(ValueError, match="init"):
        optimise_grid(problem["model_fn"], sched, x_train, init=(), **kw)
