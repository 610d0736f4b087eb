"""EDM's Heun sampler and its stochastic form (Karras et al. 2022 Alg. 1 / 2) against their published loops."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffjax
from diffjax.parameterization import make_denoiser
from diffjax.samplers import ddim_step
from diffjax.samplers.dpm_solver import denoiser_term
from diffjax.samplers.edm import EDMSolver
from diffjax.testing.gmm import random_mixture, ring_mixture
from diffjax.timesteps import karras

KEY = jax.random.PRNGKey(0)
N = 6  # intervals, the last one to sigma = 0


def _np_denoiser(g):
    """D(y; s) = E[x0 | x0 + s eps = y] of the mixture, in numpy (the VE view of every schedule)."""
    mu, var, w = (np.asarray(a, np.float64) for a in (g.means, g.variances, g.weights))

    def denoise(y, s):
        v = var[None] + s**2
        diff = y[:, None, :] - mu[None]
        logp = np.log(w)[None] - 0.5 * np.sum(diff**2 / v + np.log(v), -1)
        r = np.exp(logp - logp.max(-1, keepdims=True))
        r /= r.sum(-1, keepdims=True)
        return np.sum(r[..., None] * (mu[None] + var[None] / v * diff), 1)

    return denoise


def _k_diffusion_heun(model, x, sigmas, eps, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """k-diffusion's ``sample_heun`` (EDM Alg. 2; Alg. 1 when s_churn = 0) with the noise eps[i] of step i."""
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps[i] * s_noise * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
        d = (x - model(x, sigma_hat)) / sigma_hat
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt  # Euler step
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, sigmas[i + 1])) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


@pytest.fixture(scope="module")
def heun_runs():
    """diffjax's edm_heun on a VP schedule and k-diffusion's loop on sigma = sigma/alpha of the same grid (float64)."""
    with jax.enable_x64(True):
        sched = diffjax.VPLinear()
        g = ring_mixture()
        ts = jnp.concatenate([karras(sched, 1.0, sched.t_min, N - 1), jnp.zeros(1)])
        sigmas = np.concatenate([np.exp(-np.asarray(sched.log_snr(ts[:-1]))), [0.0]])
        x_T = sched.prior_sample(KEY, (64, 2), jnp.float64)
        y_T = np.asarray(x_T) / float(sched.alpha(ts[0]))
        mf = g.model_fn(sched, "eps")
        churn = dict(S_churn=5.0, S_tmin=0.0, S_tmax=10.0, S_noise=1.003)
        ckey = jax.random.PRNGKey(3)
        eps = [np.asarray(jax.random.normal(jax.random.fold_in(ckey, i), x_T.shape, jnp.float64)) for i in range(N)]
        calls = {"n": 0}

        def counting(x, t):
            jax.debug.callback(lambda: calls.__setitem__("n", calls["n"] + 1))
            return mf(x, t)

        out = {
            "det": diffjax.sample(counting, sched, x_T, method="edm_heun", num_steps=N, grid=ts, return_nfe=True),
            "churn": diffjax.sample(mf, sched, x_T, method="edm_heun", num_steps=N, grid=ts, key=ckey, **churn),
            "ref_det": _k_diffusion_heun(_np_denoiser(g), y_T, sigmas, eps),
            "ref_churn": _k_diffusion_heun(_np_denoiser(g), y_T, sigmas, eps, 5.0, 0.0, 10.0, 1.003),
            "sigmas": sigmas,
        }
        jax.effects_barrier()
        out["calls"] = calls["n"]
    return out


def test_edm_heun_is_k_diffusion_sample_heun(heun_runs):
    """EDM Alg. 1 on the Karras grid == k-diffusion's sample_heun to round-off; 2N - 1 evaluations (counted)."""
    x, nfe = heun_runs["det"]
    ref = heun_runs["ref_det"]
    assert nfe == 2 * N - 1 == heun_runs["calls"]
    chex.assert_trees_all_close(np.asarray(x), ref, rtol=0, atol=1e-9 * max(1.0, np.max(np.abs(ref))))


def test_edm_churn_is_algorithm_2(heun_runs):
    """S_churn > 0: Alg. 2 (k-diffusion's churn, the last step's included) with the same noise, to round-off."""
    x, ref = np.asarray(heun_runs["churn"]), heun_runs["ref_churn"]
    chex.assert_trees_all_close(x, ref, rtol=0, atol=1e-9 * max(1.0, np.max(np.abs(ref))))
    assert np.max(np.abs(x - heun_runs["ref_det"])) > 1e-3  # the churn moved the sample by far more than round-off


def test_zero_churn_is_deterministic():
    """A key with S_churn = 0 (or every s outside [S_tmin, S_tmax]) takes Alg. 1's step."""
    sched = diffjax.VPLinear()
    term = denoiser_term(make_denoiser(ring_mixture().model_fn(sched), sched), sched)
    x = sched.prior_sample(KEY, (8, 2))
    l0, l1 = sched.log_snr(0.7), sched.log_snr(0.5)
    solvers = [EDMSolver(sched)] + [EDMSolver(sched, True, jax.random.PRNGKey(1), N, **churn)
                                    for churn in (dict(S_churn=0.0), dict(S_churn=5.0, S_tmax=1e-3))]
    det, *churned = jax.jit(lambda x: [s.step(term, l0, l1, x, None, jnp.array(0), False)[0] for s in solvers])(x)
    for c in churned:  # equal up to float32 round-off (XLA fuses the two programs differently)
        chex.assert_trees_all_close(c, det, rtol=2e-6, atol=2e-6)


def _gaussian_flow(mu, var, y_a, s_a, s):
    """The exact PF-ODE flow of N(mu, var) in the VE view: y(s) = mu + (y_a - mu) sqrt((var + s^2) / (var + s_a^2))."""
    return mu + (y_a - mu) * jnp.sqrt((var + s**2) / (var + s_a**2))


@pytest.mark.parametrize("heun, local_order", [(True, 3.0), (False, 2.0)])
def test_edm_step_local_order(heun, local_order):
    """One step in lambda from the exact state of a Gaussian's flow: local error O(h^3) (Heun), O(h^2) (Euler)."""
    with jax.enable_x64(True):
        sched = diffjax.VPLinear()
        g = diffjax.testing.gmm.GaussianMixture(np.ones(1), np.array([[0.7, -0.4]]), np.array([[0.09, 0.25]]))
        term = denoiser_term(make_denoiser(g.model_fn(sched), sched), sched)
        y_a = jax.random.normal(KEY, (16, 2), jnp.float64) * 3.0
        lam_s = jnp.asarray(-1.0)

        @jax.jit
        def err(h):
            s_s, s_t = jnp.exp(-lam_s), jnp.exp(-(lam_s + h))
            a = lambda lam: sched.alpha(sched.t_from_log_snr(lam))
            x_s = a(lam_s) * _gaussian_flow(g.means[0], g.variances[0], y_a, s_s, s_s)
            x_t = EDMSolver(sched, heun).step(term, lam_s, lam_s + h, x_s, None, jnp.array(0), False)[0]
            exact = a(lam_s + h) * _gaussian_flow(g.means[0], g.variances[0], y_a, s_s, s_t)
            return jnp.sqrt(jnp.mean((x_t - exact) ** 2))

        errs = np.array([float(err(h)) for h in (0.2, 0.1, 0.05)])
    orders = np.log2(errs[:-1] / errs[1:])
    assert np.all(np.abs(orders - local_order) < 0.25), (errs, orders)


def test_edm_euler_is_ddim():
    """Euler in s = sigma / alpha on the eps prediction is DDIM (eta = 0): y_t = x0 + s_t eps."""
    sched = diffjax.VPLinear()
    den = make_denoiser(ring_mixture().model_fn(sched), sched)
    x = sched.prior_sample(KEY, (32, 2)) * sched.sigma(0.7)

    @jax.jit
    def both(s_, t_):
        l0, l1 = sched.log_snr(s_), sched.log_snr(t_)
        euler = EDMSolver(sched, False).step(denoiser_term(den, sched), l0, l1, x, None, jnp.array(0), False)[0]
        return euler, ddim_step(sched, den(x, s_), t_, s_)

    for s_, t_ in ((0.7, 0.5), (0.3, 0.05)):
        chex.assert_trees_all_close(*both(s_, t_), atol=2e-5, rtol=1e-5)


def test_edm_bad_input():
    sched = diffjax.VPLinear()
    mf = ring_mixture().model_fn(sched)
    x_T = sched.prior_sample(KEY, (4, 2))
    with pytest.raises(ValueError, match="needs key"):
        diffjax.sample(mf, sched, x_T, method="edm_heun", num_steps=3, S_churn=1.0)
    for bad, match in (({"S_churn": -1.0}, "S_churn"), ({"S_noise": -0.5}, "S_noise"),
                       ({"S_tmin": 2.0, "S_tmax": 1.0}, "S_tmin must be <= S_tmax"), ({"churn": 1.0}, "unknown option")):
        with pytest.raises(ValueError, match=match):
            diffjax.sample(mf, sched, x_T, method="edm_heun", num_steps=3, key=KEY, **bad)


@pytest.mark.slow
def test_edm_global_orders():
    """On a 3-D mixture, Karras grid, to t = 1e-2: Heun converges at order 2, Euler at order 1."""
    with jax.enable_x64(True):
        sched = diffjax.VPLinear()
        g = random_mixture(jax.random.PRNGKey(7), dim=3, num_components=3, std_range=(0.3, 0.6))
        mf = g.model_fn(sched, "eps")
        x_T = sched.prior_sample(KEY, (64, 3), jnp.float64)
        ref = diffjax.sample(mf, sched, x_T, method="pf_ode", num_steps=1, t_end=1e-2, rtol=1e-11, atol=1e-11,
                             max_steps=100000)
        for method, expected in (("edm_heun", 2.0), ("edm_euler", 1.0)):
            errs = np.array([float(jnp.sqrt(jnp.mean((diffjax.sample(mf, sched, x_T, method=method, num_steps=n,
                                                                        t_end=1e-2) - ref) ** 2)))
                             for n in (16, 32, 64)])
            orders = np.log2(errs[:-1] / errs[1:])
            assert np.all(np.abs(orders - expected) < 0.35), (method, errs, orders)
