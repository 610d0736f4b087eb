"""Progressive distillation (diffjax.progressive, task progressive_distillation) against the closed-form
Gaussian-mixture oracle as an exact teacher."""

import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import diffjax
from diffjax import progressive as pd
from diffjax.config import load
from diffjax.models import MLP, init_params, make_model_fn
from diffjax.parameterization import make_denoiser, to_x0_eps
from diffjax.samplers.ancestral import ddim_step
from diffjax.schedules import broadcast_time
from diffjax.testing.gmm import ring_mixture
from diffjax.timesteps import make_grid
from diffjax.training.builders import ConfigError, validate_config
from diffjax.training.loop import _train_step_for, setup, train
from diffjax.training.task_progressive import TASK, progressive_config

from test_training import toy_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULES = [diffjax.VPCosine(), diffjax.VPLinear(), diffjax.SubVP(), diffjax.VE(), diffjax.RectifiedFlow()]
IDS = ["vp_cosine", "vp_linear", "subvp", "ve", "rf"]


def _one_student_step(schedule, x_t, t, x0_hat, s):
    """The student's DDIM step t -> s with x0_hat (eps_hat from x_t)."""
    d = to_x0_eps(x0_hat, "x0", x_t, t, schedule)
    return ddim_step(schedule, d, broadcast_time(s, x_t), broadcast_time(t, x_t))


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_target_makes_one_student_step_land_on_the_teachers_two(schedule):
    gmm = ring_mixture()
    for dtype, tol in ((jnp.float64, 1e-12), (jnp.float32, 2e-5)):
        with jax.enable_x64(dtype == jnp.float64):
            teacher = make_denoiser(gmm.model_fn(schedule, "v"), schedule, "v")
            for n in (1, 8, 512):
                key = jax.random.PRNGKey(n)
                t, t_mid, t_end = pd.sample_student_times(key, 512, n, float(schedule.t_max))
                x0, _ = gmm.sample(jax.random.fold_in(key, 1), 512)
                x_t = schedule.marginal(x0.astype(dtype), t, jax.random.normal(key, (512, 2), dtype))
                x_end = pd.teacher_two_steps(teacher, x_t, t, t_mid, t_end)
                target = pd.distillation_target(teacher, x_t, t, t_mid, t_end)
                assert target.dtype == dtype
                one = _one_student_step(schedule, x_t, t, target, t_end)
                err = float(jnp.max(jnp.abs(one - x_end))) / (float(jnp.max(jnp.abs(x_end))) + 1.0)
                assert err <= tol, (dtype, n, err)
                # the target is not the teacher's own x0 prediction (which takes one DDIM step)
                if n > 1:
                    assert float(jnp.max(jnp.abs(target - teacher(x_t, t).x0))) > 1e-3, (dtype, n)


def test_target_at_t_zero_is_the_teachers_endpoint():
    """t'' = 0 (sigma = 0 on VP): x~ = x_t'' itself, the teacher's x0 prediction at t' (its DDIM step to x_0)."""
    s = diffjax.VPCosine()
    teacher = make_denoiser(ring_mixture().model_fn(s, "eps"), s, "eps")
    x_t = jax.random.normal(jax.random.PRNGKey(0), (64, 2))
    t, t_mid, t_end = jnp.full((64,), 0.3), jnp.full((64,), 0.15), jnp.zeros(64)
    x_end = pd.teacher_two_steps(teacher, x_t, t, t_mid, t_end)
    x_mid = ddim_step(s, teacher(x_t, t), broadcast_time(t_mid, x_t), broadcast_time(t, x_t))
    np.testing.assert_allclose(x_end, teacher(x_mid, t_mid).x0, atol=1e-6)
    target = pd.distillation_target(teacher, x_t, t, t_mid, t_end)
    assert np.isfinite(target).all()
    np.testing.assert_allclose(target, x_end, atol=1e-6)


def test_times_are_the_trailing_grids_and_a_perfect_student_samples_like_the_teacher_at_twice_the_steps():
    """Training times are bitwise the points of diffjax.sample's trailing grid (student's N and teacher's 2N), and
    sampling 'one student step = two teacher steps' with N trailing DDIM steps gives the teacher's 2N-step sample."""
    s = diffjax.VPCosine()
    for n in (1, 4, 32):
        grid = np.asarray(make_grid(s, float(s.t_max), 0.0, n, "trailing"))
        grid2 = np.asarray(make_grid(s, float(s.t_max), 0.0, 2 * n, "trailing"))
        t, t_mid, t_end = (np.asarray(a) for a in pd.sample_student_times(jax.random.PRNGKey(n), 4096, n,
                                                                            float(s.t_max)))
        assert set(t.tolist()) == set(grid[:-1].tolist())  # every start point t_0..t_{N-1}, bitwise
        k = np.searchsorted(-grid, -t)
        np.testing.assert_array_equal(t_end, grid[k + 1])
        np.testing.assert_array_equal(t_mid, grid2[2 * k + 1])
    gmm = ring_mixture()
    with jax.enable_x64(True):
        teacher = make_denoiser(gmm.model_fn(s, "x0"), s, "x0")
        t_max, n = float(s.t_max), 4

        def student(x, t):  # x0 prediction = the distillation target at t (its place on the N-step grid)
            return pd.distillation_target(teacher, x, t, t - 0.5 * t_max / n, jnp.maximum(t - t_max / n, 0.0))

        x_T = jax.random.normal(jax.random.PRNGKey(3), (256, 2), jnp.float64)
        ys = diffjax.sample(student, s, x_T, method="ddim", num_steps=n, grid="trailing", t_end=0.0, prediction="x0")
        yt = diffjax.sample(teacher, None, x_T, method="ddim", num_steps=2 * n, grid="trailing", t_end=0.0)
        np.testing.assert_allclose(ys, yt, atol=1e-9)
        y1 = diffjax.sample(teacher, None, x_T, method="ddim", num_steps=n, grid="trailing", t_end=0.0)
        assert float(jnp.max(jnp.abs(y1 - yt))) > 1e-2  # the teacher's own N steps differ


def test_stage_schedule_and_teacher_swap():
    n0, per, k = 16, 10, 3
    steps = np.asarray(jax.jit(lambda s: pd.student_steps(s, n0, per, k))(jnp.arange(45)))
    np.testing.assert_array_equal(steps, [8] * 10 + [4] * 10 + [2] * 25)  # the last stage holds past its end
    assert [pd.trained_steps(s, n0, per, k) for s in (0, 1, 10, 11, 20, 30, 40)] == [16, 8, 8, 4, 4, 2, 2]
    teacher, student = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    swapped = [float(pd.next_teacher(s, teacher, student, per, k)["w"][0]) for s in range(0, 41)]
    assert [s for s, v in enumerate(swapped) if v == 1.0] == [10, 20]  # stage ends, not the run's end


def test_loss_weights_are_truncated_snr_and_the_v_mse():
    s = diffjax.VPCosine()
    t = jnp.linspace(0.01, 0.99, 50)
    snr = jnp.exp(2 * s.log_snr(t))
    np.testing.assert_allclose(pd.loss_weight(s, t, "truncated_snr"), jnp.maximum(snr, 1.0), rtol=1e-5)
    # SNR + 1 on ||x0_hat - x~||^2 is ||v_hat - v~||^2 on a VP schedule (eps from x_t at the same t)
    key = jax.random.PRNGKey(0)
    x_t, a, b = (jax.random.normal(k, (50, 3)) for k in jax.random.split(key, 3))
    va, vb = (diffjax.convert(x, "x0", "v", x_t, t, s) for x in (a, b))
    np.testing.assert_allclose(jnp.sum((va - vb) ** 2, -1),
                               pd.loss_weight(s, t, "snr_plus_one") * jnp.sum((a - b) ** 2, -1), rtol=1e-4)
    with pytest.raises(ValueError, match="weighting"):
        pd.loss_weight(s, t, "snr")


def _fit_oracle(apply, params, oracle, gmm, s, opt, num_steps):
    """The MLP regressed on the oracle's v at uniform t (the network a student starts from, as a trained teacher)."""

    def body(carry, step):
        params, opt_state = carry
        key = jax.random.fold_in(jax.random.PRNGKey(2), step)
        k_x, k_t, k_e = jax.random.split(key, 3)
        t = jax.random.uniform(k_t, (256,), minval=1e-3, maxval=float(s.t_max))
        x_t = s.marginal(gmm.sample(k_x, 256)[0], t, jax.random.normal(k_e, (256, 2)))
        grads = jax.grad(lambda p: jnp.mean((apply(p, x_t, t) - oracle(x_t, t)) ** 2))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.jit(lambda c: jax.lax.scan(body, c, jnp.arange(num_steps)))((params, opt.init(params)))
    return params


def _oracle_distillation(stage_steps=300, width=64, pretrain_steps=300):
    """Algorithm 2 on the ring oracle, 8 -> 4 -> 2 -> 1 steps in one jitted scan of Adam updates: the first
    teacher is the oracle (its 8-step DDIM), later ones the previous student. The MLP student starts as the
    oracle's fit (``_fit_oracle``), as a student starts from its teacher."""
    s = diffjax.VPCosine()
    gmm = ring_mixture()
    mlp = MLP(width=width, depth=3)
    apply = make_model_fn(mlp)
    oracle = gmm.model_fn(s, "v")

    def teacher_fn(tp, x, t, cond):  # tp["w"] = 1: the oracle; 0: the network
        return jax.lax.cond(tp["w"] > 0.5, lambda: oracle(x, t), lambda: apply(tp["net"], x, t))

    def student_fn(p, x, t, cond):
        return apply(p["net"], x, t)

    per, stages = stage_steps, 3
    loss_fn = pd.make_progressive_loss(student_fn, teacher_fn, s, prediction="v", teacher_steps=8,
                                       steps_per_stage=per, num_stages=stages)
    opt = optax.adam(2e-3)
    net = _fit_oracle(apply, init_params(mlp, jax.random.PRNGKey(0), (1, 2)), oracle, gmm, s, opt, pretrain_steps)
    params = {"net": net, "w": jnp.zeros(())}
    teacher = {"net": jax.tree.map(jnp.copy, net), "w": jnp.ones(())}

    @jax.jit
    def run_stage(params, teacher, opt_state, start):
        def body(carry, step):
            params, teacher, opt_state = carry
            key = jax.random.fold_in(jax.random.PRNGKey(1), step)
            x0, _ = gmm.sample(key, 256)
            grads = jax.grad(lambda p: loss_fn(p, teacher, {"x": x0}, jax.random.fold_in(key, 1), step)[0])(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, pd.next_teacher(step + 1, teacher, params, per, stages), opt_state), None

        (params, teacher_after, opt_state), _ = jax.lax.scan(body, (params, teacher, opt_state),
                                                             start + jnp.arange(per))
        return params, teacher_after, opt_state

    @jax.jit
    def distances(params, teacher, n):
        """mean ||student one step - teacher two steps||^2 and ||teacher one step - its two steps||^2 on fresh x_t."""
        key = jax.random.fold_in(jax.random.PRNGKey(100), n)
        t, t_mid, t_end = pd.sample_student_times(key, 2048, n, float(s.t_max))
        x_t = s.marginal(gmm.sample(jax.random.fold_in(key, 1), 2048)[0], t, jax.random.normal(key, (2048, 2)))
        tden = make_denoiser(jax.tree_util.Partial(teacher_fn, teacher), s, "v")
        two = pd.teacher_two_steps(tden, x_t, t, t_mid, t_end)
        sden = make_denoiser(jax.tree_util.Partial(student_fn, params), s, "v")
        one = ddim_step(s, sden(x_t, t), broadcast_time(t_end, x_t), broadcast_time(t, x_t))
        base = ddim_step(s, tden(x_t, t), broadcast_time(t_end, x_t), broadcast_time(t, x_t))
        return jnp.mean(jnp.sum((one - two) ** 2, -1)), jnp.mean(jnp.sum((base - two) ** 2, -1))

    opt_state = opt.init(params)
    out = []
    for k in range(stages):
        n = 8 >> (k + 1)
        before = tuple(map(float, distances(params, teacher, n)))
        params, teacher_next, opt_state = run_stage(params, teacher, opt_state, jnp.int32(k * per))
        out.append((n, before, tuple(map(float, distances(params, teacher, n)))))
        teacher = teacher_next
    return out, run_stage


def test_mlp_student_matches_two_oracle_teacher_steps_in_one_stage_after_stage():
    """8 -> 4 -> 2 -> 1 steps: after each stage the student's one step lands much closer to its teacher's two
    steps than the teacher's own one step does, and than the student it started as."""
    out, run_stage = _oracle_distillation()
    assert run_stage._cache_size() == 1  # one compiled program serves all three stages (the step count is traced)
    for n, (before, base), (after, base2) in out:
        assert base == base2
        # stage 0 distils the exact oracle, which the MLP only approximates; later teachers are MLPs
        factor = 0.5 if n == 4 else 0.05
        assert after < factor * base and after < factor * before, (n, after, base, before)


# ---- the task: config, one compiled step, stage-end checkpoints, resume ------------------------------------


def _student_config(teacher_dir, **over):
    c = progressive_config(toy_config(), teacher_workdir=str(teacher_dir), teacher_steps=4, num_stages=2,
                           steps_per_stage=4, learning_rate=3e-3)
    c.training.batch_size = 32
    c.training.log_every = 2
    c.training.checkpoint_every = 2
    c.training.max_to_keep = 4
    c.sample.num_samples = 16
    for k, v in over.items():
        section, name = k.split("__")
        c[section][name] = v
    return c


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A teacher run's workdir: an MLP's checkpoint (the mechanics need no trained teacher; the oracle tests do)."""
    d = tmp_path_factory.mktemp("teacher")
    c = toy_config(4)
    run = setup(c, str(d))
    net = jax.tree.map(lambda p: p + 0.01 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), run.state.params)
    run.checkpointer.save(run.state.replace(ema_params=net, step=jnp.asarray(4, jnp.int32)), config=c)
    return d


def test_config_errors_name_fields(tmp_path):
    c = load(os.path.join(REPO, "experiments/configs/digits_pd.py"))
    validate_config(c, 1)
    validate_config(load(os.path.join(REPO, "experiments/configs/cifar10_pd.py")), 1)
    assert TASK.sample_steps(c, 0) == 32 and TASK.sample_steps(c, 240) == 16 and TASK.sample_steps(c, 1200) == 1
    cases = [
        ("progressive", "teacher_steps", 24, "config.progressive.teacher_steps"),
        ("progressive", "teacher_steps", 16, "config.progressive.teacher_steps"),  # < 2 ** num_stages
        ("progressive", "num_stages", 0, "config.progressive.num_stages"),
        ("progressive", "weighting", "snr", "config.progressive.weighting"),
        ("progressive", "next_teacher", "raw", "config.progressive.next_teacher"),
        ("training", "num_steps", 1000, "config.training.num_steps"),
        ("training", "checkpoint_every", 500, "config.training.checkpoint_every"),
        ("training", "max_to_keep", 3, "config.training.max_to_keep"),
        ("sample", "method", "dpm_solver++_2m", "config.sample.method"),
        ("sample", "grid", "time_uniform", "config.sample.grid"),
        ("sample", "num_steps", 4, "config.sample.num_steps"),
        ("distill", "teacher_workdir", None, "config.distill.teacher_workdir"),
    ]
    for section, name, value, field in cases:
        bad = load(os.path.join(REPO, "experiments/configs/digits_pd.py"))
        bad[section][name] = value
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            validate_config(bad, 1)
    bad = load(os.path.join(REPO, "experiments/configs/digits_pd.py"))
    del bad["progressive"]
    with pytest.raises(ConfigError, match=r"config\.progressive"):
        validate_config(bad, 1)
    # a teacher that is not the student's network / prediction type / a missing teacher run
    missing = _student_config(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"config\.distill\.teacher_workdir"):
        setup(missing, None)


def test_teacher_mismatch_names_the_field(teacher_dir):
    with pytest.raises(ConfigError, match=r"config\.diffusion\.prediction"):
        setup(_student_config(teacher_dir, diffusion__prediction="eps"), None)
    with pytest.raises(ConfigError, match=r"config\.model"):
        setup(_student_config(teacher_dir, model__width=32), None)
    setup(_student_config(teacher_dir, model__dropout=0.1), None)  # the student's dropout may differ


def test_one_compiled_step_serves_every_stage_resumes_exactly_and_stage_checkpoints_sample(teacher_dir, tmp_path):
    own_teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, own_teacher)
    c = _student_config(own_teacher)
    start = setup(c, None)
    teacher_params = diffjax.load_run(str(own_teacher)).params
    chex.assert_trees_all_equal(start.state.params, teacher_params)  # the student starts as the teacher (EMA)
    chex.assert_trees_all_equal(start.state.extra["teacher"], teacher_params)
    full, summary = train(c, str(tmp_path / "full"), progress=False)
    assert summary["steps"] == 8 and np.isfinite(summary["final_loss"])
    assert _train_step_for(full)._cache_size() == 1  # 8 single-step calls across the stage end at step 4
    train(c, str(tmp_path / "resumed"), progress=False, stop_after=3)  # mid-stage 0
    resumed, _ = train(c, str(tmp_path / "resumed"), progress=False)
    chex.assert_trees_all_equal(full.state.params, resumed.state.params)
    chex.assert_trees_all_equal(full.state.extra, resumed.state.extra)
    assert _train_step_for(resumed)._cache_size() == 1
    # stage-end checkpoints load without the teacher run, and sample with their own step counts by default
    shutil.rmtree(own_teacher)
    for step, n in ((2, 2), (4, 2), (8, 1)):
        run = diffjax.load_run(str(tmp_path / "full"), step=step)
        assert run.default_num_steps == n
        # the teacher is the original until the end of stage 0, then the stage-0 student (its EMA = its weights)
        chex.assert_trees_all_equal(run.run.state.extra["teacher"], teacher_params if step == 2 else
                                    diffjax.load_run(str(tmp_path / "full"), step=4).params)
        if step == 8:
            x, nfe = run.sample(16, return_nfe=True)
            assert x.shape == (16, 2) and np.isfinite(x).all() and nfe == n
    assert not np.array_equal(jax.tree.leaves(run.params)[0], jax.tree.leaves(teacher_params)[0])
