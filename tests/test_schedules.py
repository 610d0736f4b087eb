import chex
import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffjax
from diffjax.schedules import check_time
from diffjax.sde import forward_sde_terms

T_INTERIOR = jnp.array([1e-4, 1e-3, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99])


VP_SCHEDULES = [diffjax.VPLinear(), diffjax.VPCosine(), diffjax.DiscreteDDPM.linear(), diffjax.DiscreteDDPM.cosine()]


@pytest.mark.parametrize("schedule", VP_SCHEDULES, ids=["vp_linear", "vp_cosine", "ddpm_linear", "ddpm_cosine"])
def test_variance_preserving(schedule):
    """alpha^2 + sigma^2 = 1 (only the VP family has it; sub-VP, VE and RF do not)."""
    t = jnp.linspace(0.0, 1.0, 101)
    chex.assert_trees_all_close(schedule.alpha(t) ** 2 + schedule.sigma2(t), jnp.ones_like(t), atol=2e-7)


def test_log_snr_inverse(schedule):
    lam = schedule.log_snr(T_INTERIOR)
    assert np.all(np.diff(np.asarray(lam)) < 0), "log-SNR must decrease"
    chex.assert_trees_all_close(schedule.t_from_log_snr(lam), T_INTERIOR, atol=2e-6, rtol=1e-5)


def test_log_snr_inverse_at_ends(schedule):
    lam = schedule.log_snr(jnp.array([0.0, 1.0]))
    assert not np.any(np.isnan(np.asarray(lam)))
    chex.assert_trees_all_close(schedule.t_from_log_snr(lam), jnp.array([0.0, 1.0]), atol=1e-5)
    # out-of-range log-SNR maps to the ends
    chex.assert_trees_all_close(schedule.t_from_log_snr(jnp.array([jnp.inf, -jnp.inf])),
                                jnp.array([0.0, 1.0]), atol=1e-5)


def test_log_snr_definition(schedule):
    t = T_INTERIOR
    chex.assert_trees_all_close(schedule.log_snr(t), jnp.log(schedule.alpha(t) / schedule.sigma(t)), rtol=1e-5, atol=1e-5)


def _closed_forms(s, t):
    t = np.asarray(t, np.float64)
    if isinstance(s, (diffjax.VPLinear, diffjax.SubVP)):
        beta = s.beta_min + t * (s.beta_max - s.beta_min)
        if isinstance(s, diffjax.VPLinear):
            return -0.5 * beta, beta
        # score_sde subVPSDE: g^2 = beta(t) (1 - exp(-2 int_0^t beta))
        integral = s.beta_min * t + 0.5 * t**2 * (s.beta_max - s.beta_min)
        return -0.5 * beta, beta * (1 - np.exp(-2 * integral))
    if isinstance(s, diffjax.VE):
        sigma = s.sigma_min * (s.sigma_max / s.sigma_min) ** t
        return 0 * t, 2 * sigma**2 * np.log(s.sigma_max / s.sigma_min)
    if isinstance(s, diffjax.VPCosine):
        a = np.pi / 2 / (1 + s.s)
        f = -a / np.tan(a * (1 - t))
        return f, -2 * f
    if isinstance(s, diffjax.RectifiedFlow):
        return -1 / (1 - t), 2 * t / (1 - t)
    # DiscreteDDPM: on segment n, d log alpha/dt = N/2 log(1 - beta_n); VP so g^2 = -2 f
    n = np.asarray(s.num_timesteps)
    idx = np.ceil(t * n).astype(int) - 1
    f = 0.5 * n * np.log1p(-np.asarray(s.betas, np.float64)[idx])
    return f, -2 * f


def test_f_g2_closed_forms(schedule):
    t = T_INTERIOR
    if isinstance(schedule, diffjax.DiscreteDDPM):  # avoid the knots, where the slope jumps
        t = (jnp.floor(t * schedule.num_timesteps) + 0.5) / schedule.num_timesteps
    f, g2 = _closed_forms(schedule, t)
    chex.assert_trees_all_close(schedule.f(t), f, rtol=2e-4, atol=1e-6)
    chex.assert_trees_all_close(schedule.g2(t), g2, rtol=2e-4, atol=1e-6)


def test_finite_at_ends(schedule):
    t = jnp.array([0.0, 1.0])
    for name in ("alpha", "sigma", "sigma2", "log_alpha"):
        v = np.asarray(getattr(schedule, name)(t))
        assert not np.any(np.isnan(v)), name
    singular_at_1 = isinstance(schedule, (diffjax.VPCosine, diffjax.RectifiedFlow))
    for name in ("alpha", "sigma", "sigma2"):
        assert np.all(np.isfinite(np.asarray(getattr(schedule, name)(t)))), name
    f, g2 = np.asarray(schedule.f(t)), np.asarray(schedule.g2(t))
    assert not np.any(np.isnan(f)) and not np.any(np.isnan(g2))
    if singular_at_1:
        # alpha(1) = 0: f(1) = -inf and g^2(1) = +inf exactly; finite at 0 and just below 1.
        assert np.isfinite(f[0]) and np.isfinite(g2[0])
        assert f[1] == -np.inf and g2[1] == np.inf
        assert np.all(np.isfinite(np.asarray(schedule.g2(schedule.t_max))))
    else:
        assert np.all(np.isfinite(f)) and np.all(np.isfinite(g2))
    lam = np.asarray(schedule.log_snr(t))
    assert lam[0] == np.inf or np.isfinite(lam[0])
    x0 = jnp.ones((2, 3))
    xt = schedule.marginal(x0, t, jnp.ones((2, 3)))
    assert np.all(np.isfinite(np.asarray(xt)))
    assert np.all(np.isfinite(np.asarray(schedule.prior_logp(schedule.prior_sample(jax.random.PRNGKey(0), (4, 3))))))


def test_posterior_consistency(schedule):
    """Posterior mean/var: the Gaussian conditioning of q(x_s|x0), q(x_t|x_s)."""
    s, t = jnp.array([0.2, 0.0, 0.5]), jnp.array([0.3, 0.4, 0.9])
    a_s, a_t = schedule.alpha(s), schedule.alpha(t)
    s2_s, s2_t = schedule.sigma2(s), schedule.sigma2(t)
    a_ts, s2_ts = schedule.transition(s, t)
    chex.assert_trees_all_close(a_ts, a_t / a_s, rtol=1e-5)
    chex.assert_trees_all_close(s2_ts, s2_t - a_ts**2 * s2_s, rtol=1e-4, atol=1e-7)
    c_xt, c_x0, var = schedule.posterior(s, t)
    chex.assert_trees_all_close(c_xt, a_ts * s2_s / s2_t, rtol=1e-4, atol=1e-7)
    chex.assert_trees_all_close(c_x0, a_s * s2_ts / s2_t, rtol=1e-4, atol=1e-7)
    chex.assert_trees_all_close(var, s2_ts * s2_s / s2_t, rtol=1e-4, atol=1e-7)


def test_discrete_tables_match_ho():
    sched = diffjax.DiscreteDDPM.linear()
    b = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - b)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    chex.assert_trees_all_close(sched.alphas_cumprod, abar, rtol=1e-6)
    chex.assert_trees_all_close(sched.posterior_variance, (1 - abar_prev) / (1 - abar) * b, rtol=1e-4)
    chex.assert_trees_all_close(sched.posterior_mean_coef1, np.sqrt(abar_prev) * b / (1 - abar), rtol=1e-4)
    chex.assert_trees_all_close(sched.posterior_mean_coef2, np.sqrt(1 - b) * (1 - abar_prev) / (1 - abar), rtol=1e-4)
    # knots of the continuous view are the chain
    n = jnp.arange(1, 1001)
    chex.assert_trees_all_close(sched.alpha(sched.time(n)) ** 2, abar, rtol=1e-6)
    chex.assert_trees_all_close(sched.index(sched.time(n)), n.astype(jnp.float32), rtol=1e-6)


def test_discrete_cosine_matches_nichol():
    sched = diffjax.DiscreteDDPM.cosine(1000)
    steps = np.arange(1001) / 1000
    f = np.cos((steps + 0.008) / 1.008 * np.pi / 2) ** 2
    betas = np.minimum(1 - f[1:] / f[:-1], 0.999)
    chex.assert_trees_all_close(sched.betas, betas, rtol=1e-6)


@pytest.mark.parametrize("s_, t_", [(0.0, 0.5), (0.05, 0.9)])
def test_forward_sde_matches_marginal(schedule, s_, t_):
    """Euler–Maruyama on dx = f x dt + g dw (diffrax) from a point mass at s reproduces q(x_t|x_s)."""
    n_paths, n_steps, x_s = 4000, 400, 1.5
    key = jax.random.PRNGKey(0)

    def simulate(k):
        path = diffrax.VirtualBrownianTree(s_, t_, tol=1e-4, shape=(), key=k)
        sol = diffrax.diffeqsolve(forward_sde_terms(schedule, path), diffrax.Euler(), s_, t_,
                                  (t_ - s_) / n_steps, jnp.asarray(x_s), max_steps=n_steps + 1)
        return sol.ys[-1]

    xt = jax.jit(jax.vmap(simulate))(jax.random.split(key, n_paths))
    a_ts, s2_ts = schedule.transition(s_, t_)
    mean, var = float(a_ts) * x_s, float(s2_ts)
    se_mean = np.sqrt(var / n_paths)
    se_var = var * np.sqrt(2.0 / n_paths)
    # Monte-Carlo error (5 standard errors) plus O(dt) Euler–Maruyama bias
    assert abs(float(jnp.mean(xt)) - mean) < 5 * se_mean + 0.01 * abs(mean) + 1e-3
    assert abs(float(jnp.var(xt)) - var) < 5 * se_var + 0.01 * var


def test_pytree_jit_vmap():
    scheds = jax.tree.map(lambda *a: jnp.stack(a), diffjax.VPLinear(0.1, 20.0), diffjax.VPLinear(0.2, 10.0))
    out = jax.jit(jax.vmap(lambda s: s.log_snr(0.5)))(scheds)
    chex.assert_trees_all_close(out, jnp.stack([diffjax.VPLinear(0.1, 20.0).log_snr(0.5),
                                                diffjax.VPLinear(0.2, 10.0).log_snr(0.5)]))


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: diffjax.DiscreteDDPM(np.array([0.1, -0.01])), "betas"),
        (lambda: diffjax.DiscreteDDPM(np.array([0.1, 1.0])), "betas"),
        (lambda: diffjax.VPLinear(beta_min=20.0, beta_max=0.1), "beta_min"),
        (lambda: diffjax.SubVP(beta_min=-1.0, beta_max=0.1), "beta_min"),
        (lambda: diffjax.VE(sigma_min=50.0, sigma_max=0.01), "sigma_min"),
        (lambda: diffjax.VE(sigma_min=1.0, sigma_max=1.0), "sigma_min"),
        (lambda: check_time(1.5), "t"),
        (lambda: check_time(jnp.array([-0.1, 0.5]), "t_start"), "t_start"),
        (lambda: check_time(np.array([0.5, 2.0]), "time grid"), "time grid"),
    ],
)
def test_bad_arguments(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_public_methods_are_jit_cheap():
    """Public schedule methods stage no host-side work: under jit they trace to the same program as
    the primitives (the checks live in ``check_time``, run by the entry points)."""
    s = diffjax.VPLinear()
    public = jax.make_jaxpr(lambda t: (s.alpha(t), s.sigma(t), s.log_snr(t), s.f(t), s.g2(t)))(jnp.float32(0.5))
    private = jax.make_jaxpr(lambda t: (s._alpha(t), s._sigma(t), s._log_snr(t), s._f(t), s._g2(t)))(jnp.float32(0.5))
    assert str(public) == str(private)
    t = jnp.linspace(0.0, 1.0, 5)
    assert check_time(t) is t
