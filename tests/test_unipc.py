"""UniPC (Zhao et al. 2023): UniP-1 is DDIM; the corrector raises the order by one, for bh1 and bh2."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffjax
from diffjax.parameterization import make_denoiser
from diffjax.samplers import ddim_step
from diffjax.samplers.dpm_solver import denoiser_term
from diffjax.samplers.unipc import UniPCMultistep
from diffjax.testing.gmm import GaussianMixture, random_mixture, ring_mixture

KEY = jax.random.PRNGKey(0)


def test_unip1_is_ddim():
    """UniPC order 1 without the corrector, over several steps of a grid, is DDIM (eta = 0) step by step."""
    sched = diffjax.VPLinear()
    den = make_denoiser(ring_mixture().model_fn(sched), sched)
    term = denoiser_term(den, sched)
    ts = jnp.array([0.9, 0.6, 0.35, 0.2, 0.05])
    lams = sched.log_snr(ts)
    x_T = sched.prior_sample(KEY, (32, 2)) * sched.sigma(0.9)

    @jax.jit
    def both(x_T):
        solver = UniPCMultistep(sched, 1, corrector=False, num_intervals=4)
        x, d, state = x_T, x_T, solver.init(term, lams[0], lams[1], x_T, None)
        for i in range(4):
            x, _, _, state, _ = solver.step(term, lams[i], lams[i + 1], x, None, state, False)
            d = ddim_step(sched, den(d, ts[i]), ts[i + 1], ts[i])
        return x, d

    chex.assert_trees_all_close(*both(x_T), atol=3e-5, rtol=1e-5)


def _flow(g, sched, y_a, s_a, lam):
    """The exact PF-ODE state of the Gaussian ``g`` at log-SNR lam: x = alpha y with
    y(s) = mu + (y_a - mu) sqrt((var + s^2) / (var + s_a^2)), s = exp(-lam)."""
    s = jnp.exp(-lam)
    y = g.means[0] + (y_a - g.means[0]) * jnp.sqrt((g.variances[0] + s**2) / (g.variances[0] + s_a**2))
    return sched.alpha(sched.t_from_log_snr(lam)) * y


CONFIGS = [(p, v, True) for p in (1, 2, 3) for v in ("bh1", "bh2")] + [(2, "bh2", False), (3, "bh1", False)]


def test_local_orders_predictor_and_corrector():
    """From the exact states and model outputs at lambda_0 - k h of a Gaussian's flow: UniP-p has local error
    O(h^(p+1)) and UniC-p, fed the model at the predicted point, O(h^(p+2)) (order p+1), bh1 and bh2, x0 and eps."""
    with jax.enable_x64(True):
        sched = diffjax.VPLinear()
        g = GaussianMixture(np.ones(1), np.array([[0.7, -0.4]]), np.array([[0.09, 0.25]]))
        term = denoiser_term(make_denoiser(g.model_fn(sched), sched), sched)
        y_a = jax.random.normal(KEY, (16, 2), jnp.float64) * 3.0
        lam0 = jnp.asarray(-0.5)
        exact = lambda lam: _flow(g, sched, y_a, jnp.exp(-lam0), lam)

        @jax.jit
        def errors(h):
            lams = [lam0 - k * h for k in range(3)]  # lambda_0, lambda_-1, lambda_-2
            lam_t = lam0 + h
            out = []
            for p, variant, x0_form in CONFIGS:
                sol = UniPCMultistep(sched, p, variant, x0_form)
                ms = [sol._model(term, lam, exact(lam), None) for lam in lams]
                x_p = sol._predict(exact(lam0), lam0, lam_t, ms[0], ms[1:], lams[1:], p)
                m_t = sol._model(term, lam_t, x_p, None)
                x_c = sol._correct(exact(lam0), lam0, lam_t, m_t, ms, lams, p)
                out.append([jnp.sqrt(jnp.mean((x - exact(lam_t)) ** 2)) for x in (x_p, x_c)])
            return jnp.asarray(out)

        hs = (0.2, 0.1, 0.05)
        errs = np.stack([np.asarray(errors(h)) for h in hs])  # (h, config, predictor / corrector)
    orders = np.log2(errs[:-1] / errs[1:])[-1]  # the finest pair
    for (p, variant, x0_form), (o_pred, o_corr) in zip(CONFIGS, orders):
        assert abs(o_pred - (p + 1)) < 0.3, (p, variant, x0_form, errs, orders)
        assert abs(o_corr - (p + 2)) < 0.3, (p, variant, x0_form, errs, orders)


@pytest.mark.slow
def test_unipc_through_sample():
    """One evaluation per step to t = 0 (the last step is UniP-1 to sigma = 0, as diffusers), close to the exact ODE
    endpoint and closer than DDIM at 10 steps; warm-up and lower_order_final follow the grid."""
    sched = diffjax.VPLinear()
    mf = ring_mixture().model_fn(sched)
    x_T = sched.prior_sample(KEY, (256, 2))
    ref = diffjax.sample(mf, sched, x_T, method="pf_ode", num_steps=1, t_end=0.0, rtol=1e-6, atol=1e-6)
    x, nfe = diffjax.sample(mf, sched, x_T, method="unipc", num_steps=10, t_end=0.0, return_nfe=True)
    d = diffjax.sample(mf, sched, x_T, method="ddim", num_steps=10, t_end=0.0, grid="logSNR")
    err, err_ddim = (float(jnp.sqrt(jnp.mean((a - ref) ** 2))) for a in (x, d))
    assert nfe == 10
    assert err < 0.6 * err_ddim and err < 0.08, (err, err_ddim)


def test_unipc_bad_input():
    sched = diffjax.VPLinear()
    mf = ring_mixture().model_fn(sched)
    x_T = sched.prior_sample(KEY, (4, 2))
    for bad, match in (({"order": 4}, "order must be 1, 2 or 3"), ({"variant": "bh3"}, "variant must be one of"),
                       ({"rho": 1}, "unknown option")):
        with pytest.raises(ValueError, match=match):
            diffjax.sample(mf, sched, x_T, method="unipc", num_steps=3, **bad)


@pytest.mark.slow
@pytest.mark.parametrize("order, variant, steps", [(1, "bh2", (16, 32, 64)), (2, "bh1", (32, 64, 128)),
                                                   (2, "bh2", (32, 64, 128)), (3, "bh2", (32, 64, 128))])
def test_unipc_global_orders(order, variant, steps):
    """On a 3-D mixture, logSNR grid to t = 1e-2, no lowered final orders: UniPC-k converges at order k + 1."""
    with jax.enable_x64(True):
        sched = diffjax.VPLinear()
        g = random_mixture(jax.random.PRNGKey(7), dim=3, num_components=3, std_range=(0.3, 0.6))
        mf = g.model_fn(sched, "eps")
        x_T = sched.prior_sample(KEY, (64, 3), jnp.float64)
        ref = diffjax.sample(mf, sched, x_T, method="pf_ode", num_steps=1, t_end=1e-2, rtol=1e-12, atol=1e-12,
                             max_steps=100000)
        errs = np.array([float(jnp.sqrt(jnp.mean((diffjax.sample(
            mf, sched, x_T, method="unipc", num_steps=n, t_end=1e-2, order=order, variant=variant,
            lower_order_final=False) - ref) ** 2))) for n in steps])
    orders = np.log2(errs[:-1] / errs[1:])
    assert abs(orders[-1] - (order + 1)) < 0.4 and np.all(orders > order + 0.4), (errs, orders)


def _diffusers_unipc(model, x, alphas, sigmas, order, variant):
    """diffusers' UniPCMultistepScheduler.step loop (x0 form, lower_order_final, final sigma = 0) in numpy:
    ``model(x, i)`` is the x0 prediction at grid point i; alphas / sigmas of the grid, the last sigma 0.
    Returns the ``prev_sample`` of every step (the last one the sample)."""
    n = len(sigmas) - 1
    lam = np.log(alphas[:-1]) - np.log(sigmas[:-1])

    def coeffs(rks, hh, k):
        b_h = hh if variant == "bh1" else np.expm1(hh)
        h_phi_k, fact, rows, b = np.expm1(hh) / hh - 1, 1, [], []
        for i in range(1, k + 1):
            rows.append(np.asarray(rks) ** (i - 1))
            b.append(h_phi_k * fact / b_h)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        return np.stack(rows), np.asarray(b), b_h

    def uni_p(x, i, k, outs, idx):  # from grid point i to i + 1 with outputs outs[-1] at idx[-1] = i
        m0 = outs[-1]
        if sigmas[i + 1] == 0:
            return m0  # order 1 to sigma = 0: x_t = (0 / sigma_s) x + (1 - 0) m0
        h = lam[i + 1] - lam[i]
        rks = [(lam[idx[-(j + 1)]] - lam[i]) / h for j in range(1, k)]
        d1s = [(outs[-(j + 1)] - m0) / rk for j, rk in zip(range(1, k), rks)]
        r, b, b_h = coeffs(rks + [1.0], -h, k)
        rhos = [0.5] if k == 2 else (np.linalg.solve(r[:-1, :-1], b[:-1]) if k == 3 else [])
        res = sum((rho * d for rho, d in zip(rhos, d1s)), np.zeros_like(x))
        return sigmas[i + 1] / sigmas[i] * x - alphas[i + 1] * np.expm1(-h) * m0 - alphas[i + 1] * b_h * res

    def uni_c(m_t, x_prev, i, k, outs, idx):  # correct the state at point i from i - 1
        m0 = outs[-1]
        h = lam[i] - lam[i - 1]
        rks = [(lam[idx[-(j + 1)]] - lam[i - 1]) / h for j in range(1, k)]
        d1s = [(outs[-(j + 1)] - m0) / rk for j, rk in zip(range(1, k), rks)]
        r, b, b_h = coeffs(rks + [1.0], -h, k)
        rhos = [0.5] if k == 1 else np.linalg.solve(r, b)
        res = sum((rho * d for rho, d in zip(rhos[:-1], d1s)), np.zeros_like(x_prev)) + rhos[-1] * (m_t - m0)
        return sigmas[i] / sigmas[i - 1] * x_prev - alphas[i] * np.expm1(-h) * m0 - alphas[i] * b_h * res

    outs, idx, last, this_order, lower, states = [], [], None, None, 0, []
    for i in range(n):
        m = model(x, i)
        if i > 0:
            x = uni_c(m, last, i, this_order, outs, idx)
        outs, idx = (outs + [m])[-order:], (idx + [i])[-order:]
        this_order = min(order, n - i, lower + 1)
        last = x
        x = uni_p(x, i, this_order, outs, idx)
        lower = min(lower + 1, order)
        states.append(x)
    return np.stack(states)


@pytest.mark.parametrize("order, variant", [(3, "bh2"), pytest.param(2, "bh1", marks=pytest.mark.slow),
                                            pytest.param(2, "bh2", marks=pytest.mark.slow),
                                            pytest.param(1, "bh2", marks=pytest.mark.slow)])
def test_unipc_is_diffusers_unipc(order, variant):
    """diffjax's unipc to t = 0 == diffusers' UniPCMultistepScheduler loop (warm-up, corrector, lower_order_final,
    the order-1 step to sigma = 0) written out in numpy, on the same grid, to round-off (float64), at every step
    (save_at="all"); 6 evaluations (counted) for 6 intervals."""
    with jax.enable_x64(True):
        sched = diffjax.VPLinear()
        g = ring_mixture()
        ts = jnp.concatenate([diffjax.timesteps.logsnr_uniform(sched, 1.0, sched.t_min, 5), jnp.zeros(1)])
        x_T = sched.prior_sample(KEY, (64, 2), jnp.float64)
        calls = {"n": 0}

        def counting(x, t):
            jax.debug.callback(lambda: calls.__setitem__("n", calls["n"] + 1))
            return g.model_fn(sched)(x, t)

        x, traj, nfe = diffjax.sample(counting, sched, x_T, method="unipc", num_steps=6, grid=ts, order=order,
                                      variant=variant, return_nfe=True, save_at="all")
        jax.effects_barrier()
        # one evaluation per interval, the step to sigma = 0 included; the trajectory's x0 costs one per saved
        # state with sigma > 0, outside nfe
        assert nfe == 6 and calls["n"] == nfe + 6
        alphas, sigmas = np.asarray(sched.alpha(ts)), np.asarray(sched.sigma(ts))
        den = make_denoiser(g.model_fn(sched), sched)
        ref = _diffusers_unipc(lambda y, i: np.asarray(den(jnp.asarray(y), ts[i]).x0), np.asarray(x_T), alphas,
                               sigmas, order, variant)
    # the trajectory (saved inside the solve) is diffusers' prev_sample after every step
    chex.assert_trees_all_close(np.asarray(traj.x[1:]), ref, rtol=0, atol=1e-9 * max(1.0, np.max(np.abs(ref))))
    chex.assert_trees_all_equal(traj.x[-1], x)
    chex.assert_trees_all_equal(traj.x[0], x_T)


# ---- adaptive UniPC: UniP-p then UniC-p at the predicted point, UniC - UniP as the error estimate ----------


@pytest.fixture(scope="module")
def adaptive_problem():
    sched = diffjax.VPLinear()
    mf = ring_mixture().model_fn(sched, "eps")
    x_T = sched.prior_sample(KEY, (256, 2))
    ref = diffjax.sample(mf, sched, x_T, method="dpm_solver_3", num_steps=600, t_end=1e-3, grid="logSNR")
    return dict(sched=sched, mf=mf, x_T=x_T, ref=ref)


def _rms(a, b):
    return float(jnp.sqrt(jnp.mean((a - b) ** 2)))


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_adaptive_reaches_tolerance_and_nfe_falls_with_rtol(adaptive_problem, order):
    """RMS(x - x_exact) <= 2 tol (1 + RMS(x_exact)) (twice one accepted step's bound, as for the multistep
    dpm_adaptive: the errors of 20-80 steps add up; measured 0.2-1.4 of one step's bound), and strictly fewer
    evaluations and larger errors as the tolerance loosens. At tol = 0.1 the controller's first steps outgrow
    the estimate (order 2: 7 NFE, 2.5x the bound), so the claim starts at 0.03."""
    p = adaptive_problem
    scale = float(jnp.sqrt(jnp.mean(p["ref"] ** 2)))
    errs, nfes = [], []
    for tol in (3e-2, 1e-3, 1e-4):
        x, nfe = diffjax.sample(p["mf"], p["sched"], p["x_T"], method="unipc_adaptive", num_steps=1, t_end=1e-3,
                                order=order, rtol=tol, atol=tol, return_nfe=True)
        errs.append(_rms(x, p["ref"]))
        nfes.append(int(nfe))
        assert errs[-1] <= 2.0 * tol * (1.0 + scale), (order, tol, errs, nfes)
    assert nfes[0] < nfes[1] < nfes[2], nfes
    assert errs[0] > errs[1] > errs[2], errs


@pytest.mark.parametrize("order", [pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(3, marks=pytest.mark.slow)])
def test_unipc_adaptive_step_is_unic_of_unip(order):
    """On fixed steps (diffrax.StepTo) the solver's state after each step is UniC-p applied to UniP-p's point with
    the evaluation there, so it converges at order p + 1 (the corrected UniPC's), measured in float64."""
    import diffrax
    from diffjax.samplers.unipc import UniPCAdaptive

    with jax.enable_x64(True):
        sched = diffjax.VPLinear()
        g = random_mixture(jax.random.PRNGKey(7), dim=3, num_components=3, std_range=(0.3, 0.6))
        den = make_denoiser(g.model_fn(sched, "eps"), sched, "eps")
        x_T = sched.prior_sample(KEY, (64, 3), jnp.float64)
        lam0, lam1 = sched.log_snr(1.0), sched.log_snr(1e-2)
        ref = diffjax.sample(den, None, x_T, method="pf_ode", num_steps=1, t_end=1e-2, rtol=1e-12, atol=1e-12,
                             max_steps=100000)

        def solve(n):
            lams = jnp.linspace(lam0, lam1, n + 1)
            sol = diffrax.diffeqsolve(denoiser_term(den, sched), UniPCAdaptive(sched, order), t0=lam0, t1=lam1,
                                      dt0=None, y0=x_T, stepsize_controller=diffrax.StepTo(lams), max_steps=n)
            return sol.ys[-1]

        steps = (16, 32, 64) if order == 1 else (32, 64, 128)
        errs = np.array([_rms(solve(n), ref) for n in steps])
    orders = np.log2(errs[:-1] / errs[1:])
    assert abs(orders[-1] - (order + 1)) < 0.4 and np.all(orders > order + 0.4), (errs, orders)


def test_unipc_adaptive_bad_options():
    sched = diffjax.VPLinear()
    mf = ring_mixture().model_fn(sched)
    x_T = sched.prior_sample(KEY, (4, 2))
    for bad, match in (({"order": 4}, "order must be 1, 2 or 3"), ({"variant": "bh3"}, "variant must be one of"),
                       ({"rtol": 0.0}, "rtol must be positive"), ({"max_steps": 0}, "max_steps"),
                       ({"multistep": True}, "unknown option")):
        with pytest.raises(ValueError, match=match):
            diffjax.sample(mf, sched, x_T, method="unipc_adaptive", num_steps=1, **bad)
