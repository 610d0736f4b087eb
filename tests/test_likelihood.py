"""Likelihood against the closed-form oracle."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffjax
from diffjax.likelihood import bits_per_dim, ddpm_vlb, discretized_gaussian_log_likelihood, log_likelihood
from diffjax.testing.gmm import GaussianMixture, random_mixture

D = 8
GMM = random_mixture(jax.random.PRNGKey(1), dim=D, num_components=3)
SCHEDULES = {"vp": diffjax.VPLinear(), "ve": diffjax.VE()}
MODEL = {k: GMM.model_fn(s) for k, s in SCHEDULES.items()}
PRIOR = {k: (lambda z, s=s: GMM.log_prob_t(z, s, s.t_max)) for k, s in SCHEDULES.items()}


def _points(s, n=32, seed=2):
    x, _ = GMM.sample(jax.random.PRNGKey(seed), n)
    return s.marginal(x, s.t_min, jax.random.normal(jax.random.PRNGKey(seed + 1), x.shape))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_exact_trace_matches_oracle(name):
    s = SCHEDULES[name]
    x = _points(s)
    exact = GMM.log_prob_t(x, s, s.t_min)
    # with the oracle's exact p_T the only error is the ODE solve and the trace
    r = log_likelihood(MODEL[name], s, x, prior_logp=PRIOR[name])
    assert float(jnp.mean(jnp.abs(r.logp - exact))) / D <= 1e-3 * 0.1
    # with the default Gaussian prior, the difference is exactly the prior mismatch at z
    r0 = log_likelihood(MODEL[name], s, x)
    chex.assert_trees_all_close(r0.logp - r.logp, s.prior_logp(r.z, s.t_max) - PRIOR[name](r.z), atol=1e-4)
    assert float(jnp.mean(jnp.abs(r0.logp - exact))) / D <= 5e-3
    assert int(r.nfe) > 0 and r.z.shape == x.shape


def test_batch_error_control():
    """error_control="batch" (k-diffusion's norm) still meets a tight tolerance on the oracle and
    takes no more steps than the default per-example control; at a loose tolerance the default's
    worst point is at least as accurate."""
    s, name = SCHEDULES["ve"], "ve"
    x = _points(s, n=64)
    exact = GMM.log_prob_t(x, s, s.t_min)
    runs = {(ec, tol): log_likelihood(MODEL[name], s, x, prior_logp=PRIOR[name], rtol=tol, atol=tol,
                                      error_control=ec)
            for ec in ("per_example", "batch") for tol in (1e-5, 1e-2)}
    tight = runs["batch", 1e-5]
    assert float(jnp.mean(jnp.abs(tight.logp - exact))) / D <= 1e-4
    for tol in (1e-5, 1e-2):
        assert int(runs["batch", tol].nfe) <= int(runs["per_example", tol].nfe)
    worst = {ec: float(jnp.max(jnp.abs(runs[ec, 1e-2].logp - exact))) for ec in ("per_example", "batch")}
    assert worst["per_example"] <= worst["batch"], worst


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_scaled_coordinates(name):
    """coordinates="scaled" (y = x / alpha, s = sigma / alpha) gives the same log p as the schedule's
    own time at a tight tolerance, and a smaller error at a loose one."""
    s = SCHEDULES[name]
    x = _points(s)
    exact = GMM.log_prob_t(x, s, s.t_min)
    err = {}
    for coords in ("schedule", "scaled"):
        for tol in (1e-5, 1e-2):
            r = log_likelihood(MODEL[name], s, x, prior_logp=PRIOR[name], rtol=tol, atol=tol,
                               coordinates=coords, error_control="batch")
            err[coords, tol] = float(jnp.mean(jnp.abs(r.logp - exact))) / D
    assert err["scaled", 1e-5] <= 1e-4, err
    assert err["scaled", 1e-2] < err["schedule", 1e-2], err


def test_hutchinson_unbiased():
    s, name = SCHEDULES["vp"], "vp"
    x = _points(s, n=4)
    exact = log_likelihood(MODEL[name], s, x, prior_logp=PRIOR[name]).logp
    for probe in ("rademacher", "gaussian"):
        draws = jnp.stack([
            log_likelihood(MODEL[name], s, x, trace="hutchinson", probe=probe, key=jax.random.PRNGKey(i),
                           num_probes=8, prior_logp=PRIOR[name]).logp
            for i in range(24)
        ])
        mean, se = jnp.mean(draws, 0), jnp.std(draws, 0, ddof=1) / np.sqrt(draws.shape[0])
        assert np.all(np.abs(np.asarray(mean - exact)) <= 3 * np.asarray(se) + 1e-3), (mean, exact, se)
        assert float(jnp.max(se)) > 0  # the estimator is random


def test_batch_invariance():
    s = SCHEDULES["vp"]
    x = _points(s, n=8)
    full = log_likelihood(MODEL["vp"], s, x).logp
    parts = jnp.concatenate([log_likelihood(MODEL["vp"], s, x[i:i + 2]).logp for i in range(0, 8, 2)])
    # the adaptive step sequence depends on the batch through the error norm: tolerance-level agreement
    chex.assert_trees_all_close(full, parts, atol=2e-3)


def test_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        s = diffjax.VPLinear()
        g = GaussianMixture(GMM.weights, GMM.means[:, :3], GMM.variances[:, :3])
        mf = g.model_fn(s)
        x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3)))

        def f(x):
            return jnp.sum(log_likelihood(mf, s, x, rtol=1e-10, atol=1e-10).logp)

        grad = jax.grad(f)(x)
        assert np.all(np.isfinite(np.asarray(grad)))
        h = 1e-5
        fd = np.zeros((2, 3))
        for i in range(2):
            for j in range(3):
                e = jnp.zeros((2, 3)).at[i, j].set(h)
                fd[i, j] = (f(x + e) - f(x - e)) / (2 * h)
        chex.assert_trees_all_close(grad, fd, rtol=1e-4, atol=1e-5)


def test_bits_per_dim_offset_and_dequantization():
    """A model with a known density: bpd equals the closed form of the dequantized bound."""
    # an oracle that is a single wide Gaussian in the model space [-1, 1]
    g = GaussianMixture(jnp.ones(1), jnp.zeros((1, 4)), jnp.full((1, 4), 0.25))
    s = diffjax.VPLinear()
    u = jax.random.randint(jax.random.PRNGKey(0), (16, 4), 0, 256)
    prior = lambda z: g.log_prob_t(z, s, s.t_max)
    bpd, nfe = bits_per_dim(g.model_fn(s), s, u, key=jax.random.PRNGKey(1), num_samples=2,
                            t_eps=1e-4, prior_logp=prior)
    # closed form with the same dequantization draws
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    from diffjax.likelihood import dequantize

    logps = [g.log_prob_t(dequantize(keys[2 * i], u), s, 1e-4) for i in range(2)]
    expected = -(logps[0] + logps[1]) / 2 / (4 * np.log(2)) + 7.0  # log2(256 / 2)
    chex.assert_trees_all_close(bpd, expected, atol=1e-3)
    assert nfe > 0


def test_ddpm_vlb_bounds_the_ode_nll():
    sched = diffjax.DiscreteDDPM.linear()
    g = GaussianMixture(GMM.weights, GMM.means / 4, GMM.variances / 16)
    x, _ = g.sample(jax.random.PRNGKey(5), 64)
    bpd, terms = ddpm_vlb(g.model_fn(sched), sched, x, key=jax.random.PRNGKey(6), decoder="gaussian")
    assert np.all(np.isfinite(np.asarray(bpd)))
    nll_vlb = float(jnp.mean(terms["total"]))
    ode = log_likelihood(g.model_fn(sched), sched, x, t_eps=sched.t_min, prior_logp=None)
    # the data entropy lower-bounds the VLB in expectation; the ODE NLL estimates it
    exact = -float(jnp.mean(g.log_prob(x)))
    assert nll_vlb >= -float(jnp.mean(ode.logp)) - 0.05 * D
    assert nll_vlb >= exact - 3 * float(jnp.std(g.log_prob(x))) / 8


def test_ddpm_vlb_discretized_decoder():
    sched = diffjax.DiscreteDDPM.linear(100, 1e-3, 0.2)
    u = jax.random.randint(jax.random.PRNGKey(0), (8, 4), 0, 256)
    x = u.astype(jnp.float32) / 127.5 - 1.0
    g = GaussianMixture(jnp.ones(1), jnp.zeros((1, 4)), jnp.full((1, 4), 0.33))
    bpd, terms = ddpm_vlb(g.model_fn(sched), sched, x, key=jax.random.PRNGKey(1))
    assert np.all(np.isfinite(np.asarray(bpd))) and np.all(np.asarray(bpd) > 0)
    # the discretized decoder sums to one over the 256 bins
    bins = (jnp.arange(256.0) / 127.5 - 1.0)[:, None]
    lp = discretized_gaussian_log_likelihood(bins, jnp.full_like(bins, 0.1), jnp.full_like(bins, np.log(0.3)))
    assert abs(float(jnp.sum(jnp.exp(lp))) - 1.0) < 1e-4


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: log_likelihood(MODEL["vp"], SCHEDULES["vp"], jnp.ones((4, D), jnp.int32)), "dtype"),
        (lambda: log_likelihood(MODEL["vp"], SCHEDULES["vp"], jnp.ones((D,))), "rank"),
        (lambda: log_likelihood(MODEL["vp"], SCHEDULES["vp"], jnp.ones((4, D)), rtol=0.0), "rtol"),
        (lambda: log_likelihood(MODEL["vp"], SCHEDULES["vp"], jnp.ones((4, D)), atol=-1e-5), "atol"),
        (lambda: log_likelihood(MODEL["vp"], SCHEDULES["vp"], jnp.ones((4, D)), trace="hutch"), "trace"),
        (lambda: log_likelihood(MODEL["vp"], SCHEDULES["vp"], jnp.ones((4, D)), trace="hutchinson"), "key"),
        (lambda: log_likelihood(MODEL["vp"], SCHEDULES["vp"], jnp.ones((4, D)), t_eps=0.0), "t_eps"),
        (lambda: log_likelihood(MODEL["vp"], SCHEDULES["vp"], jnp.ones((4, D)), error_control="max"), "error_control"),
        (lambda: log_likelihood(MODEL["vp"], SCHEDULES["vp"], jnp.ones((4, D)), coordinates="sigma"), "coordinates"),
        (lambda: log_likelihood(MODEL["vp"], SCHEDULES["vp"], jnp.ones((4, D)).at[1, 2].set(jnp.nan)),
         "x must be finite"),
        (lambda: log_likelihood(MODEL["vp"], SCHEDULES["vp"], jnp.full((4, D), jnp.inf)), "x must be finite"),
        (lambda: log_likelihood(MODEL["vp"], SCHEDULES["vp"], jnp.ones((4, D)), t_end=1.5), "t_end"),
        (lambda: bits_per_dim(MODEL["vp"], SCHEDULES["vp"], jnp.full((2, D), 256), key=jax.random.PRNGKey(0)), r"\[0, 255\]"),
        (lambda: bits_per_dim(MODEL["vp"], SCHEDULES["vp"], jnp.full((2, D), -1), key=jax.random.PRNGKey(0)), r"\[0, 255\]"),
        (lambda: ddpm_vlb(MODEL["vp"], SCHEDULES["vp"], jnp.ones((2, D)), key=jax.random.PRNGKey(0)), "DiscreteDDPM"),
        (lambda: ddpm_vlb(MODEL["vp"], diffjax.DiscreteDDPM.linear(10), 3 * jnp.ones((2, D)), key=jax.random.PRNGKey(0)), "data_range"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_top_level_log_likelihood_takes_a_denoiser():
    """``diffjax.log_likelihood`` is the same function; a Denoiser brings its schedule and prediction
    type (the v-model's density equals the eps-model's), and a mismatched one is refused."""
    assert diffjax.log_likelihood is log_likelihood
    s = SCHEDULES["vp"]
    x = _points(s, n=4)
    ref = log_likelihood(MODEL["vp"], s, x)
    den = diffjax.make_denoiser(GMM.model_fn(s, "v"), s, "v")
    r = diffjax.log_likelihood(den, None, x)
    chex.assert_trees_all_close(r.logp, ref.logp, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="prediction"):
        diffjax.log_likelihood(den, s, x, prediction="eps")
    with pytest.raises(ValueError, match="schedule"):
        diffjax.log_likelihood(den, SCHEDULES["ve"], x)
