"""The task framework: ContextLoss and TrainState.extra in the one train step, checkpoints with extra, the task
registry's config errors, the 'trailing' grid and the euler / heun method names."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffjax
from diffjax.config import base
from diffjax.schedules import RectifiedFlow, VPCosine
from diffjax.testing.gmm import ring_mixture
from diffjax.training import Checkpointer, ContextLoss, make_train_step
from diffjax.training.builders import ConfigError, build_optimizer, validate_config
from diffjax.training.loop import setup
from diffjax.training.tasks import TASK_NAMES, get_task

from test_training import _tiny_toy_run


def _pull_to_target():
    """loss = ||params - extra["target"]||^2 / 2 with step-dependent weight; update_extra: target <- params, and
    a counter of the steps seen (so both the read and the write of extra are checked)."""

    def loss_fn(params, batch, key, ctx):
        w = 1.0 + ctx.step.astype(jnp.float32)
        diff = jax.tree.map(lambda p, t: p - t, params, ctx.extra["target"])
        return w * 0.5 * sum(jnp.sum(d**2) for d in jax.tree.leaves(diff)), None

    def update_extra(ctx, params):
        return {"target": params, "seen": ctx.extra["seen"] + 1, "last_step": ctx.step}

    return ContextLoss(loss_fn, update_extra)


def test_context_loss_reads_and_updates_extra_in_the_fused_step():
    c, run = _tiny_toy_run()
    target = jax.tree.map(lambda p: p + 1.0, run.state.params)
    state = run.state.replace(extra={"target": target, "seen": jnp.zeros((), jnp.int32),
                                     "last_step": jnp.zeros((), jnp.int32)})
    import optax

    opt = optax.sgd(0.1)
    state = state.replace(opt_state=opt.init(state.params))
    step1 = make_train_step(_pull_to_target(), opt, ema_decay=0.5, donate=False)
    step2 = make_train_step(_pull_to_target(), opt, ema_decay=0.5, steps_per_call=2, donate=False)
    batch = {"x": jnp.zeros((16, 2))}
    one, m1 = step1(state, batch)
    # gradient (params - target) * w with w = 1 at step 0: sgd moves params 0.1 of the way to the target
    chex.assert_trees_all_close(one.params, jax.tree.map(lambda p, t: p + 0.1 * (t - p), state.params, target),
                                atol=1e-6)
    n_params = sum(p.size for p in jax.tree.leaves(state.params))
    np.testing.assert_allclose(m1["loss"], [0.5 * n_params], rtol=1e-6)
    chex.assert_trees_all_close(one.extra["target"], one.params)
    assert int(one.extra["seen"]) == 1 and int(one.extra["last_step"]) == 1
    two, m2 = step1(one, batch)  # target = params now: zero loss and gradient at step 1
    np.testing.assert_allclose(m2["loss"], [0.0], atol=1e-12)
    fused, mf = step2(state, jax.tree.map(lambda v: jnp.stack([v, v]), batch))
    chex.assert_trees_all_close(fused.params, two.params, atol=1e-6)
    chex.assert_trees_all_close(fused.extra, two.extra, atol=1e-6)
    np.testing.assert_allclose(mf["loss"], [m1["loss"][0], m2["loss"][0]], atol=1e-5)


def test_state_without_extra_is_unchanged_and_extra_checkpoints(tmp_path):
    c, run = _tiny_toy_run()
    assert run.state.extra is None
    leaves_before = len(jax.tree.leaves(run.state))
    with_extra = run.state.replace(extra={"teacher": run.state.params, "n": jnp.asarray(3, jnp.int32)},
                                   step=jnp.asarray(5, jnp.int32))
    assert len(jax.tree.leaves(with_extra)) == leaves_before + len(jax.tree.leaves(run.state.params)) + 1
    ckpt = Checkpointer(str(tmp_path / "ck"))
    ckpt.save(with_extra)
    target = with_extra.replace(extra=jax.tree.map(jnp.zeros_like, with_extra.extra))
    restored = ckpt.restore(target)
    chex.assert_trees_all_equal(restored.extra, with_extra.extra)


def test_task_registry_and_config_errors():
    assert set(TASK_NAMES) >= {"diffusion", "classifier", "progressive_distillation", "consistency_distillation",
                               "consistency_training", "reflow"}
    assert get_task("diffusion").samples and get_task("diffusion").nll
    assert not get_task("classifier").samples
    with pytest.raises(ValueError, match="unknown task 'distill'"):
        get_task("distill")
    c = base()
    c.task = "distill"
    with pytest.raises(ConfigError, match="config.task"):
        validate_config(c, num_devices=1)
    c = base()
    c.diffusion.time_sampling = "beta"
    with pytest.raises(ConfigError, match="config.diffusion.time_sampling"):
        validate_config(c, num_devices=1)
    c = base()
    c.diffusion.time_sampling, c.diffusion.logit_normal = "logit_normal", (0.0, -1.0)
    with pytest.raises(ConfigError, match="config.diffusion.logit_normal"):
        validate_config(c, num_devices=1)


def test_trailing_grid_ends_with_all_steps_and_euler_heun_names():
    """'trailing' puts every interval on [t_start, 0]; Euler on it = DDIM for rectified flow with an exact x0 model
    (both are x_s = x_t + (s - t) u on the linear interpolant), with num_steps evaluations; Heun costs 2 per step
    but the last (the step to x_0, a denoise)."""
    rf = RectifiedFlow()
    gmm = ring_mixture()
    x_T = rf.prior_sample(jax.random.PRNGKey(0), (64, 2))
    flow = gmm.model_fn(rf, "flow")
    for n in (1, 2, 4):
        x_e, nfe = diffjax.sample(flow, rf, x_T, method="euler", num_steps=n, prediction="flow", grid="trailing",
                                  t_end=0.0, return_nfe=True)
        x_d = diffjax.sample(flow, rf, x_T, method="ddim", num_steps=n, prediction="flow", grid="trailing", t_end=0.0)
        assert nfe == n
        np.testing.assert_allclose(x_e, x_d, atol=1e-5)
        x_h, nfe_h = diffjax.sample(flow, rf, x_T, method="heun", num_steps=n, prediction="flow", grid="trailing",
                                    t_end=0.0, return_nfe=True)
        assert nfe_h == 2 * (n - 1) + 1
    # without t_end = 0 'trailing' is time_uniform
    a = diffjax.sample(flow, rf, x_T, method="euler", num_steps=3, prediction="flow", grid="trailing")
    b = diffjax.sample(flow, rf, x_T, method="euler", num_steps=3, prediction="flow", grid="time_uniform")
    np.testing.assert_array_equal(a, b)
    # a time_uniform grid to t = 0 spends only num_steps - 1 intervals above t_min
    vp = VPCosine()
    x1, n1 = diffjax.sample(gmm.model_fn(vp, "eps"), vp, x_T, method="ddim", num_steps=1, t_end=0.0,
                            grid="trailing", return_nfe=True)
    np.testing.assert_allclose(x1, gmm.model_fn(vp, "x0")(x_T, jnp.full((64,), vp.t_max)), atol=1e-4)
    assert n1 == 1
