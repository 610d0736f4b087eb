import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffjax
from diffjax.parameterization import PREDICTION_TYPES, convert, from_x0_eps, make_denoiser, to_x0_eps


def _round_trip(schedule, src, dst, tol):
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    dtype = jnp.result_type(float)
    x0 = jax.random.normal(k1, (6, 5), dtype)
    eps = jax.random.normal(k2, (6, 5), dtype)
    t = jnp.array([0.05, 0.2, 0.4, 0.6, 0.8, 0.95], dtype)
    x = schedule.marginal(x0, t, eps)
    pred = from_x0_eps(diffjax.Denoised(x0, eps), src, x, t, schedule)
    back = convert(convert(pred, src, dst, x, t, schedule), dst, src, x, t, schedule)
    chex.assert_trees_all_close(back, pred, rtol=tol, atol=tol)
    d = to_x0_eps(pred, src, x, t, schedule)
    chex.assert_trees_all_close(d.x0, x0, rtol=tol, atol=tol)
    chex.assert_trees_all_close(d.eps, eps, rtol=tol, atol=tol)


@pytest.mark.parametrize("src", PREDICTION_TYPES)
@pytest.mark.parametrize("dst", PREDICTION_TYPES)
def test_round_trips_float32(schedule, src, dst):
    # float32: error ~ ulp x condition number (score = -eps/sigma at sigma ~ 0.2)
    _round_trip(schedule, src, dst, 2e-4)


@pytest.mark.parametrize("src", PREDICTION_TYPES)
@pytest.mark.parametrize("dst", PREDICTION_TYPES)
def test_round_trips_exact_float64(src, dst):
    from conftest import all_schedules

    with jax.enable_x64(True):
        for schedule in all_schedules():
            _round_trip(schedule, src, dst, 1e-10)


def test_definitions():
    s = diffjax.VPLinear()
    x0, eps = jnp.ones((1, 3)), -jnp.ones((1, 3)) * 0.5
    t = jnp.array([0.3])
    x = s.marginal(x0, t, eps)
    a, sig = s.alpha(t)[:, None], s.sigma(t)[:, None]
    d = diffjax.Denoised(x0, eps)
    chex.assert_trees_all_close(from_x0_eps(d, "v", x, t, s), a * eps - sig * x0)
    chex.assert_trees_all_close(from_x0_eps(d, "score", x, t, s), -eps / sig)
    chex.assert_trees_all_close(to_x0_eps(eps, "eps", x, t, s).x0, (x - sig * eps) / a, rtol=1e-6)
    # rectified flow velocity u = -x0 + eps
    rf = diffjax.RectifiedFlow()
    xr = rf.marginal(x0, t, eps)
    chex.assert_trees_all_close(from_x0_eps(d, "flow", xr, t, rf), eps - x0, rtol=1e-6)


def test_make_denoiser_signatures():
    s = diffjax.VE()
    x = jnp.ones((3, 2))
    den2 = make_denoiser(lambda x, t: jnp.zeros_like(x), s, "eps")
    den3 = make_denoiser(lambda x, t, c: jnp.zeros_like(x) + c, s, "eps")
    chex.assert_trees_all_close(den2(x, 0.5).x0, x)
    chex.assert_trees_all_close(den3(x, 0.5, 0.0).x0, x)
    seen = {}

    def spy(x, t):
        seen["t"] = t
        return jnp.zeros_like(x)

    make_denoiser(spy, s)(x, 0.5)
    assert seen["t"].shape == (3,)
    with pytest.raises(ValueError, match="cond"):
        den2(x, 0.5, jnp.ones(3))
    with pytest.raises(ValueError, match="shape"):
        make_denoiser(lambda x, t: x[:, :1], s)(x, 0.5)


def test_unknown_prediction():
    with pytest.raises(ValueError, match="prediction"):
        make_denoiser(lambda x, t: x, diffjax.VE(), "noise")
    with pytest.raises(ValueError, match="prediction"):
        convert(jnp.ones((1, 1)), "eps", "velocity", jnp.ones((1, 1)), 0.5, diffjax.VE())
