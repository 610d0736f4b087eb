import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffjax
from diffjax.losses import drop_condition, make_loss, sample_times
from diffjax.testing.gmm import ring_mixture

RING = ring_mixture()
KEY = jax.random.PRNGKey(0)


def _oracle_model(schedule, prediction="eps"):
    exact = RING.model_fn(schedule, prediction)

    def model_fn(params, x, t, cond):
        return exact(x, t, cond) + params["delta"]

    return model_fn


@pytest.mark.parametrize("objective", ["eps", "x0", "v", "dsm"])
@pytest.mark.parametrize("sname", ["vp", "ve", "ddpm"])
def test_exact_model_beats_perturbed(objective, sname):
    """The Bayes-optimal prediction minimises every objective: L(delta) - L(0) ~ delta^2 term."""
    schedule = {"vp": diffjax.VPLinear(), "ve": diffjax.VE(), "ddpm": diffjax.DiscreteDDPM.linear()}[sname]
    prediction = "x0" if objective == "x0" else "eps"
    loss_fn = jax.jit(make_loss(_oracle_model(schedule, prediction), schedule, prediction=prediction,
                                objective=objective, t_eps=0.05))
    x, _ = RING.sample(KEY, 4096)
    batch = {"x": x}
    l0, aux = loss_fn({"delta": 0.0}, batch, jax.random.PRNGKey(1))
    l1, _ = loss_fn({"delta": 0.1}, batch, jax.random.PRNGKey(1))
    assert np.isfinite(float(l0)) and aux["loss_per_example"].shape == (4096,)
    assert float(l1) > float(l0)


def test_sigma2_weighted_dsm_equals_l_simple():
    s = diffjax.VPLinear()
    model = _oracle_model(s)
    x, _ = RING.sample(KEY, 256)
    a = make_loss(model, s, objective="eps")({"delta": 0.05}, {"x": x}, KEY)[0]
    b = make_loss(model, s, objective="dsm", weighting="sigma2")({"delta": 0.05}, {"x": x}, KEY)[0]
    chex.assert_trees_all_close(a, b, rtol=1e-5)


def test_likelihood_weighting_closed_form():
    """w = g^2: per-example loss = (T - t_eps)/2 g^2/sigma^2 ||eps_hat - eps||^2 summed over dims."""
    s = diffjax.VPLinear()
    model = _oracle_model(s)
    x, _ = RING.sample(KEY, 64)
    loss, aux = make_loss(model, s, objective="dsm", reduce="sum")({"delta": 0.0}, {"x": x}, KEY)
    _, aux_eps = make_loss(model, s, objective="eps", reduce="sum")({"delta": 0.0}, {"x": x}, KEY)
    t = aux["t"]
    expected = 0.5 * (s.t_max - s.t_min) * s.g2(t) / s.sigma2(t) * aux_eps["loss_per_example"]
    chex.assert_trees_all_close(aux["loss_per_example"], expected, rtol=1e-4)


@pytest.mark.parametrize("sname", ["vp", "subvp", "ve", "ddpm"])
def test_min_snr_weighting_closed_form(sname):
    """Min-SNR-gamma: each regression objective becomes min(SNR, gamma) ||x0_hat - x0||^2, whichever is
    regressed (so eps, x0 and v agree), and gamma -> inf gives back plain eps-MSE."""
    s = {"vp": diffjax.VPLinear(), "subvp": diffjax.SubVP(), "ve": diffjax.VE(),
         "ddpm": diffjax.DiscreteDDPM.cosine()}[sname]
    model = _oracle_model(s)
    x, _ = RING.sample(KEY, 256)
    params, gamma = {"delta": 0.07}, 5.0
    per_example = {o: make_loss(model, s, objective=o, min_snr_gamma=gamma, reduce="sum")(params, {"x": x}, KEY)[1]
                   for o in ("eps", "x0", "v")}
    _, plain_x0 = make_loss(model, s, objective="x0", reduce="sum")(params, {"x": x}, KEY)
    t = plain_x0["t"]
    snr = jnp.exp(2.0 * s.log_snr(t))
    expected = jnp.minimum(snr, gamma) * plain_x0["loss_per_example"]
    for o in ("eps", "x0", "v"):
        chex.assert_trees_all_close(per_example[o]["loss_per_example"], expected, rtol=2e-4, atol=1e-7)
    assert float(jnp.max(snr)) > gamma > float(jnp.min(snr))  # both branches of the min are exercised
    huge = make_loss(model, s, objective="eps", min_snr_gamma=1e30)(params, {"x": x}, KEY)[0]
    chex.assert_trees_all_close(huge, make_loss(model, s, objective="eps")(params, {"x": x}, KEY)[0], rtol=1e-6)


def test_antithetic_and_discrete_times():
    t = sample_times(KEY, 9, 0.01, 1.0, antithetic=True)
    chex.assert_trees_all_close(t[:4] + t[5:9], jnp.full(4, 1.01), rtol=1e-6)
    assert t.shape == (9,)
    td = sample_times(KEY, 1000, 0.0, 1.0, discrete=1000)
    n = np.asarray(td) * 1000
    assert np.allclose(n, np.round(n), atol=1e-3) and n.min() >= 1 and n.max() <= 1000


def test_condition_dropout():
    labels = jnp.arange(20000) % 8
    out = drop_condition(KEY, labels, 0.2, null_label=8)
    frac = float(jnp.mean(out == 8))
    assert abs(frac - 0.2) < 0.01
    kept = out != 8
    assert bool(jnp.all(out[kept] == labels[kept]))
    chex.assert_trees_all_equal(drop_condition(KEY, labels, 0.0, 8), labels)


def test_loss_gradient_and_conditioning():
    s = diffjax.VPLinear()

    def model_fn(params, x, t, cond):
        emb = params["emb"][cond]
        return params["w"] * x + emb + t[:, None] * params["b"]

    params = {"w": jnp.ones(()), "b": jnp.zeros(2), "emb": jnp.zeros((9, 2))}
    x, labels = RING.sample(KEY, 128)
    loss_fn = jax.jit(make_loss(model_fn, s, cond_drop_prob=0.1, null_label=8, antithetic=True))
    grads = jax.grad(lambda p: loss_fn(p, {"x": x, "label": labels}, KEY)[0])(params)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["emb"][8]).sum()) > 0  # the null class is trained


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(objective="score"), "objective"),
        (dict(weighting="snr"), "weighting"),
        (dict(reduce="max"), "reduce"),
        (dict(cond_drop_prob=1.5), "cond_drop_prob"),
        (dict(cond_drop_prob=0.1), "null_label"),
        (dict(prediction="noise"), "prediction"),
        (dict(t_eps=2.0), "t_eps"),
        (dict(objective="dsm", min_snr_gamma=5.0), "min_snr_gamma"),
        (dict(min_snr_gamma=0.0), "min_snr_gamma"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_loss(lambda p, x, t, c: x, diffjax.VPLinear(), **kwargs)


def test_bad_batch():
    loss_fn = make_loss(lambda p, x, t, c: x, diffjax.VPLinear())
    with pytest.raises(ValueError, match="'x'"):
        loss_fn({}, {"image": jnp.zeros((2, 2))}, KEY)
    with pytest.raises(ValueError, match=r"batch\['x'\]"):
        loss_fn({}, {"x": jnp.zeros((4,))}, KEY)
    with pytest.raises(ValueError, match="label"):
        loss_fn({}, {"x": jnp.zeros((4, 2)), "label": jnp.zeros((3,), jnp.int32)}, KEY)
    with pytest.raises(ValueError, match="output shape"):
        make_loss(lambda p, x, t, c: x[:, :1], diffjax.VPLinear())({}, {"x": jnp.zeros((4, 2))}, KEY)


# ---- the DDPM bound as a training objective ------------------------------------------------

def _learned_var_model(schedule, v_init=0.0):
    """Oracle eps plus a shift, and a learned-variance channel v (same for every dim)."""
    exact = RING.model_fn(schedule, "eps")

    def model_fn(params, x, t, cond):
        eps = exact(x, t, cond) + params["delta"]
        return jnp.concatenate([eps, jnp.full_like(eps, params["v"])], axis=-1)

    return model_fn


def test_vlb_objective_is_unbiased_for_the_bound():
    """E_n,x_n[N L_{n-1} + L_T] == ddpm_vlb's sum over the whole chain (N = 8, Gaussian decoder)."""
    from diffjax.likelihood import ddpm_vlb

    s = diffjax.DiscreteDDPM.linear(8, beta_start=0.01, beta_end=0.3)
    x0 = RING.sample(KEY, 1)[0] / 4
    exact = RING.model_fn(s, "eps")
    loss_fn = jax.jit(make_loss(lambda p, x, t, c: exact(x, t, c), s, objective="vlb", reduce="sum",
                                decoder="gaussian"))
    xb = jnp.repeat(x0, 40000, axis=0)
    mc = np.concatenate([np.asarray(loss_fn({}, {"x": xb}, jax.random.PRNGKey(i))[1]["loss_per_example"])
                         for i in range(4)])
    ref = np.mean([float(ddpm_vlb(exact, s, xb[:4000], key=jax.random.PRNGKey(10 + i),
                                  decoder="gaussian")[1]["total"].mean()) for i in range(4)])
    se = mc.std() / np.sqrt(mc.size)
    assert abs(mc.mean() - ref) < 4 * se + 1e-3 * abs(ref), (mc.mean(), ref, se)


def test_vlb_exact_model_beats_perturbed_and_learned_variance_endpoints():
    s = diffjax.DiscreteDDPM.linear(50, beta_start=1e-3, beta_end=0.2)
    x = RING.sample(KEY, 2048)[0]  # the oracle's own data: it is the Bayes-optimal mean
    batch, k = {"x": x}, jax.random.PRNGKey(2)
    fixed = jax.jit(make_loss(_oracle_model(s), s, objective="vlb", decoder="gaussian"))
    assert float(fixed({"delta": 0.1}, batch, k)[0]) > float(fixed({"delta": 0.0}, batch, k)[0])
    learned = jax.jit(make_loss(_learned_var_model(s), s, objective="vlb", learned_variance=True,
                                decoder="gaussian"))
    large = make_loss(_oracle_model(s), s, objective="vlb", vlb_variance="large", decoder="gaussian")
    # v = -1 -> beta_tilde, v = +1 -> beta
    chex.assert_trees_all_close(learned({"delta": 0.0, "v": -1.0}, batch, k)[0], fixed({"delta": 0.0}, batch, k)[0],
                                rtol=1e-5)
    chex.assert_trees_all_close(learned({"delta": 0.0, "v": 1.0}, batch, k)[0], large({"delta": 0.0}, batch, k)[0],
                                rtol=1e-5)


def test_hybrid_trains_the_mean_only_through_l_simple():
    s = diffjax.DiscreteDDPM.linear(50, beta_start=1e-3, beta_end=0.2)
    x = RING.sample(KEY, 512)[0]
    batch, k = {"x": x}, jax.random.PRNGKey(3)
    params = {"delta": 0.05, "v": 0.3}
    hybrid = make_loss(_learned_var_model(s), s, objective="hybrid", learned_variance=True, vlb_weight=0.5,
                       decoder="gaussian")
    simple = make_loss(_oracle_model(s), s, objective="eps")
    g_h = jax.grad(lambda p: hybrid(p, batch, k)[0])(params)
    g_s = jax.grad(lambda p: simple(p, batch, k)[0])({"delta": 0.05})
    chex.assert_trees_all_close(g_h["delta"], g_s["delta"], rtol=1e-5)
    assert abs(float(g_h["v"])) > 0


def test_vlb_objective_errors():
    m = _oracle_model(diffjax.VPLinear())
    with pytest.raises(ValueError, match="DiscreteDDPM"):
        make_loss(m, diffjax.VPLinear(), objective="vlb")
    with pytest.raises(ValueError, match="learned_variance"):
        make_loss(m, diffjax.DiscreteDDPM.linear(10), objective="hybrid")
    with pytest.raises(ValueError, match="vlb_variance"):
        make_loss(m, diffjax.DiscreteDDPM.linear(10), objective="vlb", vlb_variance="big")
    s = diffjax.DiscreteDDPM.linear(10)
    loss = make_loss(_oracle_model(s), s, objective="vlb", learned_variance=True)
    with pytest.raises(ValueError, match="learned_variance=True"):
        loss({"delta": 0.0}, {"x": jnp.zeros((4, 2))}, KEY)
