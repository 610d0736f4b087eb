import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.testing.gmm import GaussianMixture, random_mixture, ring_mixture

GMM = random_mixture(jax.random.PRNGKey(3), dim=6, num_components=3)
T = jnp.array([0.0, 0.01, 0.2, 0.5, 0.8, 1.0])


def _t_for(schedule):
    return jnp.minimum(T, schedule.t_max)


def test_score_is_grad_log_prob(schedule):
    x, _ = GMM.sample(jax.random.PRNGKey(0), T.shape[0])
    t = _t_for(schedule)
    grad = jax.vmap(jax.grad(lambda xi, ti: GMM.log_prob_t(xi[None], schedule, ti)[0]))(x, t)
    chex.assert_trees_all_close(GMM.score(x, schedule, t), grad, rtol=1e-4, atol=1e-4)
    # class-conditional too
    labels = jnp.arange(T.shape[0]) % GMM.num_components
    grad_c = jax.vmap(jax.grad(lambda xi, ti, c: GMM.log_prob_t(xi[None], schedule, ti, c[None])[0]))(x, t, labels)
    chex.assert_trees_all_close(GMM.score(x, schedule, t, labels), grad_c, rtol=1e-4, atol=1e-4)


def test_denoiser_consistent_and_finite(schedule):
    x, _ = GMM.sample(jax.random.PRNGKey(1), T.shape[0])
    t = _t_for(schedule)
    d = GMM.denoise(x, schedule, t)
    assert np.all(np.isfinite(np.asarray(d.x0))) and np.all(np.isfinite(np.asarray(d.eps)))
    xt = schedule.marginal(d.x0, t, d.eps)
    chex.assert_trees_all_close(xt, x, rtol=1e-4, atol=1e-4)
    for pred in ("eps", "x0", "v", "score", "flow"):
        out = GMM.model_fn(schedule, pred)(x[1:-1], t[1:-1])
        assert np.all(np.isfinite(np.asarray(out))), pred


def test_noised_density_normalised_1d():
    """p_t integrates to one (1-D grid quadrature) for a VP and a VE time."""
    import diffjax

    g = GaussianMixture(jnp.array([0.3, 0.7]), jnp.array([[-1.0], [2.0]]), jnp.array([[0.1], [0.3]]))
    grid = jnp.linspace(-200, 200, 400001)[:, None]
    for s, t in ((diffjax.VPLinear(), 0.5), (diffjax.VE(), 0.7)):
        p = jnp.exp(g.log_prob_t(grid, s, t))
        assert abs(float(jnp.sum(p)) * (400.0 / 400000) - 1.0) < 1e-3


def test_tweedie_by_monte_carlo():
    """E[x0 | x_t] from the oracle equals a self-normalised importance estimate."""
    import diffjax

    s = diffjax.VPLinear()
    g = ring_mixture()
    x0, _ = g.sample(jax.random.PRNGKey(2), 200000)
    xt = jnp.array([[0.5, -0.3]])
    t = 0.4
    a, s2 = float(s.alpha(t)), float(s.sigma2(t))
    logw = -0.5 * jnp.sum((xt - a * x0) ** 2, -1) / s2
    w = jax.nn.softmax(logw)
    mc = jnp.sum(w[:, None] * x0, 0)
    chex.assert_trees_all_close(g.denoise(xt, s, t).x0[0], mc, atol=0.03)


def test_samples_match_moments():
    x, labels = GMM.sample(jax.random.PRNGKey(5), 100000)
    mean = jnp.sum(GMM.weights[:, None] * GMM.means, 0)
    chex.assert_trees_all_close(jnp.mean(x, 0), mean, atol=0.03)
    x1, _ = GMM.sample(jax.random.PRNGKey(6), 1000, labels=jnp.ones(1000, jnp.int32))
    chex.assert_trees_all_close(jnp.mean(x1, 0), GMM.means[1], atol=0.1)


def test_bad_shapes():
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(jnp.ones(2), jnp.zeros((3, 2)), jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="variances"):
        GaussianMixture(jnp.ones(3), jnp.zeros((3, 2)), -jnp.ones((3, 2)))
    import diffjax

    with pytest.raises(ValueError, match="x must have shape"):
        GMM.score(jnp.zeros((2, 5)), diffjax.VE(), 0.5)
