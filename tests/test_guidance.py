"""Guidance wrappers against the class-conditional Gaussian-mixture oracle (component k = class k)."""

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffjax
from diffjax import guidance, make_denoiser
from diffjax.samplers.api import METHODS, sample
from diffjax.testing.gmm import GaussianMixture, ring_mixture

RING = ring_mixture()  # 8 well separated modes: exact guidance must land in the asked one
K = RING.num_components
# overlapping classes (the conditional alone leaves many samples in other components)
BLOB = GaussianMixture(jnp.ones(3), jnp.array([[-0.6, 0.0], [0.6, 0.0], [0.0, 0.9]]), jnp.full((3, 2), 0.5**2))


def exact_classifier(gmm, schedule):
    """log p(y | x_t) = log w_y + log p_t(x | y) - log p_t(x) (Bayes' rule on the noised mixture)."""
    def log_prob(x, t, y):
        return jnp.log(gmm.weights)[y] + gmm.log_prob_t(x, schedule, t, y) - gmm.log_prob_t(x, schedule, t)
    return log_prob


def cfg_model(gmm, schedule, prediction):
    """The oracle trained 'with condition dropout': label K (the null class) means unconditional."""
    f = gmm.model_fn(schedule, prediction)
    k = gmm.num_components

    def model_fn(x, t, c):
        shape = (-1,) + (1,) * (x.ndim - 1)
        return jnp.where((c == k).reshape(shape), f(x, t, None), f(x, t, jnp.clip(c, 0, k - 1)))
    return model_fn


def in_component(gmm, x, labels):
    """Fraction of samples whose most probable clean component is their label."""
    comps = jnp.stack([gmm.log_prob(x, jnp.full((x.shape[0],), k)) + jnp.log(gmm.weights[k])
                       for k in range(gmm.num_components)], axis=1)
    return float(jnp.mean(jnp.argmax(comps, axis=1) == labels))


@pytest.mark.parametrize("prediction", ["eps", "v", "score", "x0"])
def test_classifier_guidance_scale_one_gives_the_conditional_model(schedule, prediction):
    """Exact classifier, s = 1: the guided unconditional oracle is the class-conditional oracle."""
    x, _ = RING.sample_t(jax.random.PRNGKey(0), 64, schedule, 0.3)
    t = jnp.linspace(0.05, 0.95, 64) * schedule.t_max
    labels = jnp.arange(64) % K
    guided = guidance.classifier_guidance(make_denoiser(RING.model_fn(schedule, prediction), schedule, prediction),
                                          exact_classifier(RING, schedule), 1.0)
    want = RING.model_fn(schedule, prediction)(x, t, labels)
    chex.assert_trees_all_close(guided.predict(x, t, labels), want, rtol=2e-4, atol=2e-4)


def test_classifier_guided_samples_land_in_the_asked_component():
    s = diffjax.VPLinear()
    labels = jnp.arange(400) % K
    x_T = s.prior_sample(jax.random.PRNGKey(1), (400, 2))
    guided = guidance.classifier_guidance(make_denoiser(RING.model_fn(s, "eps"), s), exact_classifier(RING, s), 1.0)
    x = sample(guided, s, x_T, method="dpm_solver++_2m", num_steps=30, cond=labels, key=jax.random.PRNGKey(2))
    assert in_component(RING, x, labels) >= 0.97


def test_cfg_raises_the_fraction_in_the_asked_component_monotonically():
    s = diffjax.VPLinear()
    n = 3000
    labels = jnp.arange(n) % 3
    x_T = s.prior_sample(jax.random.PRNGKey(3), (n, 2))
    model = make_denoiser(cfg_model(BLOB, s, "v"), s, "v")
    fractions = []
    for w in (0.0, 0.25, 0.5, 1.0, 2.0):
        guided = guidance.classifier_free_guidance(model, jnp.float32(w), null_cond=3, num_classes=3)
        x = sample(guided, s, x_T, method="dpm_solver++_2m", num_steps=25, prediction="v", cond=labels,
                   key=jax.random.PRNGKey(4))
        fractions.append(in_component(BLOB, x, labels))
    assert all(b > a or a == b == 1.0 for a, b in zip(fractions, fractions[1:])), fractions  # up until all in y
    assert fractions[0] < 0.9 and fractions[-1] > 0.97, fractions  # the overlap is real; guidance resolves it


# one or two methods of each family by default (the guidance wrappers only change the denoiser every sampler calls);
# the rest run with -m slow
_GUIDANCE_DEFAULT = ("ddpm", "pc", "pf_ode", "dpm_solver_3", "dpm_solver++_3m", "dpm_adaptive", "edm_heun", "unipc",
                     "consistency")


@pytest.mark.parametrize("method", [m if m in _GUIDANCE_DEFAULT else pytest.param(m, marks=pytest.mark.slow)
                                    for m in METHODS])
def test_zero_guidance_equals_the_unguided_sampler(method):
    s = diffjax.VPLinear()
    labels = jnp.arange(16) % 3
    x_T = s.prior_sample(jax.random.PRNGKey(5), (16, 2))
    model = make_denoiser(cfg_model(BLOB, s, "eps"), s, "eps")
    kw = dict(method=method, num_steps=6, cond=labels, key=jax.random.PRNGKey(6))
    ref = sample(model, s, x_T, **kw)
    # a Python 0 returns the model itself; a traced 0 runs the 2B batch and must agree exactly
    assert guidance.classifier_free_guidance(model, 0, null_cond=None) is model
    cfg0 = sample(guidance.classifier_free_guidance(model, jnp.float32(0.0), null_cond=3), s, x_T, **kw)
    chex.assert_trees_all_close(cfg0, ref, rtol=0, atol=1e-5)  # a batch of 2B may round differently
    cg0 = guidance.classifier_guidance(model, exact_classifier(BLOB, s), jnp.float32(0.0), unconditional=False)
    chex.assert_trees_all_close(sample(cg0, s, x_T, **kw), ref, rtol=0, atol=1e-5)
    guided = guidance.classifier_free_guidance(model, 2.0, null_cond=3)
    assert np.all(np.isfinite(np.asarray(sample(guided, s, x_T, **kw))))


def test_thresholding_keeps_x0_in_range_and_leaves_in_range_estimates_alone():
    s = diffjax.VPLinear()
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(7), (32, 2))
    t = jnp.full((32,), 0.5)
    big = lambda x, t, c=None: 5.0 * x  # noqa: E731  (x0-prediction far outside [-1, 1])
    for wrap in (guidance.dynamic_thresholding(make_denoiser(big, s, "x0"), percentile=0.9),
                 guidance.clip_x0(make_denoiser(big, s, "x0"))):
        x0 = wrap.predict(x, t)
        assert float(jnp.max(jnp.abs(x0))) <= 1.0 + 1e-6
    small = lambda x, t, c=None: 0.1 * jnp.tanh(x)  # noqa: E731
    eps_model = lambda x, t, c=None: diffjax.parameterization.convert(small(x, t), "x0", "eps", x, t, s)  # noqa: E731
    wrapped = guidance.dynamic_thresholding(make_denoiser(eps_model, s, "eps"))
    chex.assert_trees_all_close(wrapped.predict(x, t), eps_model(x, t), rtol=1e-5, atol=1e-5)


def test_bad_input_is_named():
    s = diffjax.VPLinear()
    model = make_denoiser(cfg_model(BLOB, s, "eps"), s, "eps")
    x = jnp.zeros((4, 2))
    t = jnp.full((4,), 0.5)
    with pytest.raises(ValueError, match="null_cond"):
        guidance.classifier_free_guidance(model, 1.5, null_cond=None)
    with pytest.raises(ValueError, match=r"cond must lie in \[0, 3\)"):
        guidance.classifier_free_guidance(model, 1.5, null_cond=3, num_classes=3)(x, t, jnp.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="needs cond"):
        guidance.classifier_free_guidance(model, 1.5, null_cond=3)(x, t, None)
    bad_classifier = lambda x, t, y: jnp.zeros((x.shape[0], 3))  # noqa: E731  (logits, not log p(y|x))
    with pytest.raises(ValueError, match=r"classifier_log_prob must return .* shape \(4,\); got shape \(4, 3\)"):
        guided = guidance.classifier_guidance(make_denoiser(BLOB.model_fn(s), s), bad_classifier, 1.0)
        guided(x, t, jnp.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="percentile"):
        guidance.dynamic_thresholding(model, percentile=1.5)


def test_guidance_takes_a_denoiser_and_its_prediction_type_travels():
    """A raw model_fn is refused by every wrapper; sample and log_likelihood refuse a prediction or
    schedule that differs from the guided denoiser's, and a new traced scale reuses the compiled loop."""
    s = diffjax.VPLinear()
    raw = cfg_model(BLOB, s, "v")
    for wrap in (lambda m: guidance.classifier_free_guidance(m, 1.0, null_cond=3),
                 lambda m: guidance.classifier_guidance(m, exact_classifier(BLOB, s), 1.0),
                 guidance.clip_x0, guidance.dynamic_thresholding):
        with pytest.raises(ValueError, match="Denoiser"):
            wrap(raw)
    guided = guidance.clip_x0(guidance.classifier_free_guidance(make_denoiser(raw, s, "v"), jnp.float32(1.0), 3),
                              data_range=(-3.0, 3.0))
    assert guided.prediction == "v" and guided.schedule is s
    x_T = s.prior_sample(jax.random.PRNGKey(0), (8, 2))
    labels = jnp.arange(8) % 3
    with pytest.raises(ValueError, match="prediction='eps'"):
        sample(guided, s, x_T, method="ddim", num_steps=3, cond=labels, prediction="eps")
    with pytest.raises(ValueError, match="schedule"):
        sample(guided, diffjax.VPCosine(), x_T, method="ddim", num_steps=3, cond=labels)
    with pytest.raises(ValueError, match="prediction"):
        diffjax.log_likelihood(guided, None, x_T, cond=labels, prediction="x0")
    a = sample(guided, None, x_T, method="ddim", num_steps=3, cond=labels)
    chex.assert_trees_all_close(a, sample(guided, diffjax.VPLinear(), x_T, method="ddim", num_steps=3, cond=labels))
    before = diffjax.samplers.api._sample_jit._cached._cache_size()
    guided2 = eqx.tree_at(lambda d: d.inner.scale, guided, jnp.float32(2.0))
    b = sample(guided2, s, x_T, method="ddim", num_steps=3, cond=labels)
    assert diffjax.samplers.api._sample_jit._cached._cache_size() == before
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
