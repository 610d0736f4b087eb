"""Consistency models (diffjax.consistency, tasks consistency_distillation / consistency_training) on the
closed-form Gaussian-mixture oracle."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import erf

import diffjax
from diffjax import consistency as cm
from diffjax import models as models_lib
from diffjax.config import load
from diffjax.parameterization import make_denoiser
from diffjax.schedules import VE, VPCosine
from diffjax.testing.gmm import ring_mixture
from diffjax.training.builders import ConfigError, validate_config
from diffjax.training.state import TrainState
from diffjax.training.step import ContextLoss, StepContext, make_train_step
from diffjax.training.task_consistency import consistency_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs")


def _settings(schedule, **kw):
    kw.setdefault("sigma_max", float(cm.scaled_sigma(schedule, schedule.t_max)))
    return cm.ConsistencySettings(sigma_min=0.002, **kw)


# ---- the parameterization ----------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [VE(sigma_min=0.001, sigma_max=80.0), VPCosine()])
def test_boundary_condition_is_exact_for_any_network_output(schedule):
    t_min = cm.time_of_sigma(schedule, jnp.asarray(0.002))
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 3)) * 3.0
    for out in (jnp.full_like(x, 1e30), jnp.full_like(x, jnp.nan), jax.random.normal(jax.random.PRNGKey(1), x.shape)):
        f = cm.make_consistency_fn(lambda x_, t_, c_: out, schedule, "v", t_min=t_min, sigma_data=0.5)
        y = np.asarray(f(x, jnp.full((6,), t_min)))
        expect = np.asarray(x / schedule.alpha(t_min))
        np.testing.assert_array_equal(y, expect)  # bit for bit
        if isinstance(schedule, VE):
            np.testing.assert_array_equal(y, np.asarray(x))  # alpha = 1: f(x, t_min) = x
    # above t_min the network matters; far above it f is the network's x0 estimate (the EDM preconditioning)
    f = cm.make_consistency_fn(lambda x_, t_, c_: jnp.ones_like(x_), schedule, "x0", t_min=t_min, sigma_data=0.5)
    t_hi = cm.time_of_sigma(schedule, jnp.asarray(50.0))
    np.testing.assert_allclose(f(x, jnp.full((6,), t_hi)), 1.0, atol=2e-3)
    c_skip, c_out = cm.consistency_coeffs(jnp.asarray(0.002), 0.002, 0.5)
    assert float(c_skip) == 1.0 and float(c_out) == 0.0


def test_karras_boundaries_and_lognormal_interval_probabilities():
    n, s_min, s_max = 18, 0.002, 80.0
    s = np.asarray(cm.karras_sigma(jnp.arange(n), n, s_min, s_max))
    i = np.arange(n)
    ref = (s_min ** (1 / 7) + i / (n - 1) * (s_max ** (1 / 7) - s_min ** (1 / 7))) ** 7  # EDM eq. 5
    np.testing.assert_allclose(s, ref, rtol=1e-5)
    assert s[0] == np.float32(s_min) and s[-1] == np.float32(s_max) and np.all(np.diff(s) > 0)
    # iCT lognormal: p(i) proportional to erf((log s_{i+1} - P_mean)/(sqrt 2 P_std)) - erf((log s_i - ...)), masked
    big = np.asarray(cm.karras_sigma(jnp.arange(40), n, s_min, s_max))
    p = np.exp(np.asarray(cm.lognormal_index_logits(jnp.asarray(big), n, -1.1, 2.0), np.float64))
    c = erf((np.log(ref) + 1.1) / (math.sqrt(2) * 2.0))
    np.testing.assert_allclose(p[: n - 1] / p.sum(), np.diff(c) / np.diff(c).sum(), rtol=1e-4)
    assert np.all(p[n - 1:] == 0)


def test_curricula_and_target_ema_match_their_formulas():
    K, s0, s1, mu0 = 1000, 2, 150, 0.9
    ks = np.arange(0, K + 1, 7)
    n = np.asarray(jax.jit(lambda k: cm.ct_num_scales(k, K, s0, s1))(ks))
    ref = np.ceil(np.sqrt(ks / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1  # CM paper appendix C
    np.testing.assert_array_equal(n, ref)
    assert cm.ct_num_scales(0, K, s0, s1) == s0 and cm.ct_num_scales(K, K, s0, s1) == s1 + 1
    np.testing.assert_allclose(cm.ct_ema_rate(n, s0, mu0), np.exp(s0 * np.log(mu0) / ref), rtol=1e-6)
    assert abs(float(cm.ct_ema_rate(s0, s0, mu0)) - mu0) < 1e-6
    # iCT: K' = floor(1000 / (log2 floor(1280 / 10) + 1)) = 125; N doubles every 125 steps from 11 to 1281
    ict = jax.jit(lambda k: cm.ict_num_scales(k, K, 10, 1280))
    assert [int(ict(k)) for k in (0, 124, 125, 250, 874, 875, 999, 10**6)] == [11, 11, 21, 41, 641, 1281, 1281, 1281]
    settings = cm.ConsistencySettings(0.002, 80.0, curriculum="ct", s0=s0, s1=s1, total_steps=K, mu0=mu0)
    assert int(settings.num_scales_at(500)) == math.ceil(math.sqrt(0.5 * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1
    assert float(settings.ema_rate_at(0)) == pytest.approx(mu0)
    assert float(cm.ConsistencySettings(0.002, 80.0, target_ema=False).ema_rate_at(3)) == 0.0


def test_distance_metrics():
    a, b = jnp.zeros((2, 4, 4)), jnp.ones((2, 4, 4)) * 0.5
    np.testing.assert_allclose(cm.distance(a, b, "l2"), 0.25)
    np.testing.assert_allclose(cm.distance(a, b, "l1"), 0.5)
    c = cm.pseudo_huber_c(16)
    assert c == pytest.approx(0.00054 * 4)
    np.testing.assert_allclose(cm.distance(a, b, "pseudo_huber"), np.sqrt(16 * 0.25 + c**2) - c, rtol=1e-6)
    with pytest.raises(ValueError, match="metric"):
        cm.distance(a, b, "lpips")


# ---- the teacher's ODE step ----------------------------------------------------------------------


def test_teacher_steps_against_the_exact_ode():
    schedule, gmm = VPCosine(), ring_mixture()
    den = make_denoiser(gmm.model_fn(schedule, "x0"), schedule, "x0")
    t, s = 0.55, 0.45
    x = gmm.sample_t(jax.random.PRNGKey(0), 256, schedule, t)[0]
    tb, sb = jnp.full((256,), t), jnp.full((256,), s)
    exact = diffjax.sample(den, None, x, method="pf_ode", num_steps=1, t_start=t, t_end=s, rtol=1e-6, atol=1e-6)
    err = {k: float(jnp.mean((cm.teacher_step(den, schedule, x, tb, sb, solver=k) - exact) ** 2)) for k in cm.SOLVERS}
    # first-order steps (Euler in t, DDIM) against the second-order Heun step
    assert err["heun"] < 0.1 * min(err["euler"], err["ddim"]), err
    # DDIM is Euler in the VE variable y = x / alpha, s = sigma / alpha (the CM paper's Euler solver)
    d = den(x, tb)
    s_t, s_s = cm.scaled_sigma(schedule, t), cm.scaled_sigma(schedule, s)
    y_s = x / schedule.alpha(t) + (s_s - s_t) * d.eps
    np.testing.assert_allclose(cm.teacher_step(den, schedule, x, tb, sb, solver="ddim"), schedule.alpha(s) * y_s,
                               rtol=1e-4, atol=1e-5)


# ---- sampling -----------------------------------------------------------------------------------


def test_multistep_sampling_nfe_and_algorithm_1():
    schedule = VPCosine()
    t_min = cm.time_of_sigma(schedule, jnp.asarray(0.002))
    net = jax.tree_util.Partial(lambda w, x, t, c: jnp.tanh(w * x) + t[:, None], 0.7)
    f = cm.make_consistency_fn(net, schedule, "v", t_min=t_min, sigma_data=0.5)
    x_T = schedule.prior_sample(jax.random.PRNGKey(0), (64, 2))
    key = jax.random.PRNGKey(1)
    T = schedule.t_max
    x1, nfe1 = diffjax.sample(f, schedule, x_T, method="consistency", num_steps=1, key=key, prediction="x0",
                              t_end=0.0, return_nfe=True)
    assert nfe1 == 1
    np.testing.assert_allclose(x1, f(x_T, jnp.full((64,), T)), rtol=1e-6)
    x2, nfe2 = diffjax.sample(f, schedule, x_T, method="consistency", num_steps=2, key=key, prediction="x0",
                              t_end=0.0, return_nfe=True)
    assert nfe2 == 2
    tm = 0.3
    x3, nfe3 = diffjax.sample(f, schedule, x_T, method="consistency", num_steps=2, key=key, prediction="x0",
                              grid=[T, tm, 0.0], return_nfe=True)
    assert nfe3 == 2
    # Alg. 1 by hand: x0 = f(x_T, T); x = alpha x0 + sqrt(sigma^2 - (alpha s_min)^2) z; f(x, tm)
    z = jax.random.normal(jax.random.split(key, 1)[0], x_T.shape)
    a, s2 = schedule.alpha(tm), schedule.sigma2(tm)
    x = a * f(x_T, jnp.full((64,), T)) + jnp.sqrt(s2 - (a * 0.002) ** 2) * z
    np.testing.assert_allclose(x3, f(x, jnp.full((64,), tm)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="key"):
        diffjax.sample(f, schedule, x_T, method="consistency", num_steps=1, prediction="x0", t_end=0.0)


# ---- training -----------------------------------------------------------------------------------


def _mlp(width=128, depth=3):
    module = models_lib.create_model("mlp", width=width, depth=depth, dropout=0.0)
    params = models_lib.init_params(module, jax.random.PRNGKey(0), (1, 2))
    apply = models_lib.make_model_fn(module, train=True)
    return params, (lambda p, x, t, c, rng: apply(p, x, t, None, rng=rng))


def _train(loss, params, extra, batches, lr=2e-3, steps_per_call=50):
    step = make_train_step(ContextLoss(*loss), optax.adam(lr), ema_decay=0.99, steps_per_call=steps_per_call,
                           donate=False)
    state = TrainState.create(params, optax.adam(lr), jax.random.PRNGKey(3), extra)
    for b in batches:
        state, m = step(state, {"x": b})
    return state, m, step


def test_cd_on_the_oracle_beats_the_teachers_one_step():
    schedule, gmm = VPCosine(), ring_mixture()
    teacher_fn = gmm.model_fn(schedule, "x0")

    def teacher(extra, x, t, cond):
        return make_denoiser(teacher_fn, schedule, "x0")(x, t, cond)

    settings = _settings(schedule, num_scales=18, solver="heun", mu0=0.95, sigma_data=2.0)
    params, net = _mlp()
    loss = cm.make_consistency_loss(net, schedule, "v", settings, teacher)
    steps, per_call, batch = 300, 50, 256
    data = gmm.sample(jax.random.PRNGKey(5), steps * batch)[0].reshape(steps // per_call, per_call, batch, 2)
    state, m, _ = _train(loss, params, {"target": params}, data)
    assert np.all(np.isfinite(m["loss"]))

    x_T = schedule.prior_sample(jax.random.PRNGKey(7), (1000, 2))
    exact = diffjax.sample(teacher_fn, schedule, x_T, method="pf_ode", num_steps=1, prediction="x0", t_end=0.0,
                           rtol=1e-6, atol=1e-6)
    ddim1 = diffjax.sample(teacher_fn, schedule, x_T, method="ddim", num_steps=1, prediction="x0", t_end=0.0)
    f = cm.make_consistency_fn(jax.tree_util.Partial(lambda p, x, t, c: net(p, x, t, c, None), state.ema_params),
                               schedule, "v", t_min=settings.t_min(schedule), sigma_data=settings.sigma_data)
    cm1 = diffjax.sample(f, schedule, x_T, method="consistency", num_steps=1, key=jax.random.PRNGKey(8),
                         prediction="x0", t_end=0.0)
    err_teacher = float(jnp.mean(jnp.sum((ddim1 - exact) ** 2, -1)))
    err_cd = float(jnp.mean(jnp.sum((cm1 - exact) ** 2, -1)))
    print(f"mean squared distance to the exact PF-ODE endpoint: teacher DDIM 1 step {err_teacher:.3f}, "
          f"CD 1 step {err_cd:.3f}")
    # the teacher's one step is E[x0 | x_T] ~ the mixture mean: about the ring's radius^2 = 4 away
    assert err_teacher > 3.0
    assert err_cd < 0.25 * err_teacher


def test_one_compiled_step_serves_the_whole_curriculum():
    schedule, gmm = VPCosine(), ring_mixture()
    settings = _settings(schedule, curriculum="ct", s0=2, s1=150, total_steps=20, mu0=0.9, loss="pseudo_huber",
                         noise_sampling="lognormal", weighting="ict")
    params, net = _mlp(width=32, depth=1)
    loss_fn, update_extra = cm.make_consistency_loss(net, schedule, "v", settings)
    data = gmm.sample(jax.random.PRNGKey(0), 64)[0]

    # the loss reads N(k) from the traced step: one compiled loss for every k
    jitted = jax.jit(lambda step: loss_fn(params, {"x": data}, jax.random.PRNGKey(1),
                                          StepContext(step, params, {"target": params})))
    for k in (0, 5, 19):
        assert int(jitted(jnp.asarray(k, jnp.int32))[1]["num_scales"]) == int(cm.ct_num_scales(k, 20, 2, 150))
    assert jitted._cache_size() == 1
    # the train step across N changes (N(0) = 2 ... N(19) = 148) and the mu(k) EMA of the target
    step = make_train_step(ContextLoss(loss_fn, update_extra), optax.adam(1e-3), ema_decay=0.9, donate=False)
    state = TrainState.create(params, optax.adam(1e-3), jax.random.PRNGKey(2), {"target": params})
    for k in (0, 1, 7, 19):
        new, m = step(state.replace(step=jnp.asarray(k, jnp.int32)), {"x": data})
        assert np.isfinite(float(m["loss"][0]))
        mu = float(cm.ct_ema_rate(cm.ct_num_scales(k, 20, 2, 150), 2, 0.9))
        leaf = lambda tree: jax.tree.leaves(tree)[0]
        np.testing.assert_allclose(leaf(new.extra["target"]), mu * leaf(state.extra["target"])
                                   + (1 - mu) * leaf(new.params), rtol=1e-5, atol=1e-7)
    assert step._cache_size() == 1


# ---- the tasks ----------------------------------------------------------------------------------


def _set(c, fields):
    for path, v in fields.items():
        *parents, leaf = path.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def _config(name, **fields):
    return _set(load(os.path.join(CONFIGS, f"{name}.py")), fields)


@pytest.mark.parametrize("name, field, value, match", [
    ("digits_cd", "consistency.loss", "lpips", "config.consistency.loss"),
    ("digits_cd", "consistency.solver", "rk4", "config.consistency.solver"),
    ("digits_cd", "consistency.curriculum", "ct", "config.consistency.curriculum"),
    ("digits_cd", "consistency.num_scales", 1, "config.consistency.num_scales"),
    ("digits_cd", "consistency.mu0", 1.0, "config.consistency.mu0"),
    ("digits_cd", "consistency.sigma_min", 0.0, "config.consistency.sigma_min"),
    ("digits_cd", "consistency.sigma_max", 1e4, "config.consistency.sigma_max"),
    ("digits_cd", "distill.teacher_workdir", None, "config.distill.teacher_workdir"),
    ("digits_cd", "sample.method", "ddim", "config.sample.method"),
    ("digits_ct", "consistency.noise_sampling", "normal", "config.consistency.noise_sampling"),
    ("digits_ct", "consistency.weighting", "snr", "config.consistency.weighting"),
    ("digits_ct", "consistency.s1", 5, "config.consistency.s1"),
    ("digits_ct", "consistency.huber_c", -1.0, "config.consistency.huber_c"),
    ("digits_ct", "diffusion.schedule", "ddpm_linear", "config.diffusion.schedule"),
    ("digits_ct", "diffusion.schedule", "edm", "config.diffusion.schedule"),
])
def test_config_errors_name_the_field(name, field, value, match):
    validate_config(_config(name), 1)
    with pytest.raises(ConfigError, match=match.replace(".", r"\.")):
        validate_config(_config(name, **{field: value}), 1)


@pytest.mark.parametrize("name", ["cifar10_cd", "cifar10_ct"])
def test_cifar10_configs_validate(name):
    validate_config(_config(name), 1)


def _toy(task, workdir, **fields):
    c = _config("toy2d")
    c.training.num_steps, c.training.log_every, c.training.checkpoint_every = 10, 5, 10
    c.training.batch_size = 64
    c.sample.num_samples, c.eval.num_examples = 16, 0
    c.model.width, c.model.depth = 32, 1
    if task != "diffusion":
        consistency_config(c, task, num_scales=6, sigma_data=2.0)
    return _set(c, fields)


@pytest.mark.slow  # ~30 s of CPU: three tiny runs through the main job
def test_cd_and_ct_runs_train_resume_and_sample(tmp_path):
    from diffjax.training.loop import train_and_evaluate
    from diffjax.training.task_consistency import consistency_model_fn, eval_apply

    teacher = str(tmp_path / "teacher")
    train_and_evaluate(_toy("diffusion", teacher), teacher, progress=False)
    cd = str(tmp_path / "cd")
    config = _toy("consistency_distillation", cd, **{"distill.teacher_workdir": teacher})
    metrics = train_and_evaluate(config, cd, progress=False)
    assert np.isfinite(metrics["final_loss"])
    run = diffjax.load_run(cd)  # restores without reading the teacher
    assert set(run.run.state.extra) == {"teacher", "target"}
    t_run = diffjax.load_run(teacher)
    # the student started from the teacher: after 10 small steps, its network is close to the teacher's
    leaf = lambda p: jax.tree.leaves(p)[0]
    assert leaf(run.run.state.extra["teacher"]).shape == leaf(t_run.params).shape
    np.testing.assert_array_equal(leaf(run.run.state.extra["teacher"]), leaf(t_run.params))
    f = consistency_model_fn(run.config, run.schedule, run.run.apply_eval, run.params)
    x = diffjax.sample(f, run.schedule, run.schedule.prior_sample(jax.random.PRNGKey(0), (16, 2)),
                       method="consistency", num_steps=2, key=jax.random.PRNGKey(1), prediction="x0", t_end=0.0)
    assert x.shape == (16, 2) and np.all(np.isfinite(x))
    # eval_apply: the same consistency function, read by the run's own prediction type
    wrapped = jax.tree_util.Partial(eval_apply(run.config, run.schedule, run.run.apply_eval), run.params)
    x_T = run.schedule.prior_sample(jax.random.PRNGKey(2), (16, 2))
    a = diffjax.sample(wrapped, run.schedule, x_T, method="consistency", num_steps=1, key=jax.random.PRNGKey(1),
                       prediction=run.prediction, t_end=0.0)
    b = diffjax.sample(f, run.schedule, x_T, method="consistency", num_steps=1, key=jax.random.PRNGKey(1),
                       prediction="x0", t_end=0.0)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # a CD config whose prediction type differs from the teacher's is refused at init
    with pytest.raises(ConfigError, match=r"config\.diffusion\.prediction"):
        train_and_evaluate(_toy("consistency_distillation", str(tmp_path / "cd2"),
                                **{"distill.teacher_workdir": teacher, "diffusion.prediction": "eps"}),
                           str(tmp_path / "cd2"), progress=False)

    ct = str(tmp_path / "ct")
    config = _toy("consistency_training", ct, **{"consistency.curriculum": "ict", "consistency.s0": 2,
                                                   "consistency.s1": 8, "consistency.target_ema": False,
                                                   "consistency.loss": "pseudo_huber"})
    assert np.isfinite(train_and_evaluate(config, ct, progress=False)["final_loss"])
    assert diffjax.load_run(ct).run.state.extra is None
