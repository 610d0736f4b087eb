"""Flow matching and reflow (``diffjax.reflow``, task "reflow"): the flow objective on the Gaussian-mixture oracle,
logit-normal times, Euler's order on rectified flow, straightness, couplings on disk, and one reflow on 2-D data.

The oracle's velocity E[eps - x_0 | x_t] on ``RectifiedFlow`` is the exact 1-rectified flow of its data, so the
reflow tests need no trained teacher: the 2-rectified flow is an MLP trained on the oracle's couplings.
"""

import functools
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import diffjax
from diffjax import reflow
from diffjax.losses import make_loss, sample_times
from diffjax.metrics import sliced_wasserstein
from diffjax.models import create_model, init_params, make_model_fn
from diffjax.testing.gmm import ring_mixture

RF = diffjax.RectifiedFlow()


def oracle_flow(gmm):
    """The oracle's velocity as a ``model_fn(params, x, t, cond)`` (params ignored)."""
    fn = gmm.model_fn(RF, "flow")
    return lambda params, x, t, cond=None: fn(x, t)


def conditional_velocity_variance(gmm, x_t, t):
    """tr Var(u | x_t) / D of u = eps - x_0 = (x_t - x_0) / t on ``RectifiedFlow``: tr Var(x_0 | x_t) / (D t^2), with
    Var(x_0 | x_t) of the mixture posterior (per component s^2 sigma^2 / (alpha^2 s^2 + sigma^2) about its mean)."""
    alpha, sigma2 = (1.0 - t)[:, None, None], (t**2)[:, None, None]
    var = alpha**2 * gmm.variances[None] + sigma2  # (B, K, D)
    diff = x_t[:, None] - alpha * gmm.means[None]
    log_r = jnp.log(gmm.weights)[None] - 0.5 * jnp.sum(diff**2 / var + jnp.log(var), -1)
    r = jax.nn.softmax(log_r, -1)[..., None]
    mean_k = gmm.means[None] + alpha * gmm.variances[None] / var * diff
    var_k = gmm.variances[None] * sigma2 / var
    mean = jnp.sum(r * mean_k, 1)
    second = jnp.sum(r * (var_k + mean_k**2), 1)
    return jnp.mean(second - mean**2, -1) / t**2


def test_flow_loss_is_minimised_by_the_oracle_velocity():
    """E||v - u||^2 at the exact velocity is the conditional variance of u; a shift c adds ||c||^2 / D."""
    gmm = ring_mixture()
    n = 20_000
    k_x, k_eps, k_loss = jax.random.split(jax.random.PRNGKey(0), 3)
    x0, _ = gmm.sample(k_x, n)
    eps = jax.random.normal(k_eps, x0.shape)
    batch = {"x": x0, "noise": eps}
    shift = jnp.array([0.3, -0.2])
    base = oracle_flow(gmm)
    loss_of = {name: make_loss(fn, RF, prediction="flow", objective="flow")
               for name, fn in (("oracle", base), ("shifted", lambda p, x, t, c=None: base(p, x, t) + shift))}
    (l_o, aux_o), (l_s, aux_s) = (jax.jit(f)(None, batch, k_loss) for f in loss_of.values())
    chex.assert_trees_all_close(aux_o["t"], aux_s["t"])  # the same times and noise: a paired comparison
    t = aux_o["t"]
    x_t = RF.marginal(x0, t, eps)
    cond_var = conditional_velocity_variance(gmm, x_t, t)
    # per example, E[loss | x_t] = tr Var(u | x_t) / D: their difference has mean 0
    d = aux_o["loss_per_example"] - cond_var
    assert abs(float(d.mean())) < 4 * float(d.std()) / np.sqrt(n), (float(l_o), float(cond_var.mean()))
    assert float(l_s) > float(l_o)
    gap = aux_s["loss_per_example"] - aux_o["loss_per_example"]
    want = float(jnp.sum(shift**2)) / 2
    assert abs(float(gap.mean()) - want) < 4 * float(gap.std()) / np.sqrt(n) + 1e-6, (float(gap.mean()), want)


def test_logit_normal_times_follow_their_law():
    """t = t_eps + (T - t_eps) sigmoid(m + s n): logit of the rescaled t is N(m, s) (KS test), as the loss draws it."""
    m, s = 0.4, 0.7
    gmm = ring_mixture()
    x0, _ = gmm.sample(jax.random.PRNGKey(1), 4000)
    loss = make_loss(oracle_flow(gmm), RF, prediction="flow", objective="flow", time_sampling="logit_normal",
                     logit_normal=(m, s))
    _, aux = jax.jit(loss)(None, {"x": x0}, jax.random.PRNGKey(2))
    t_lo, t_hi = float(RF.t_min), float(RF.t_max)
    u = (np.asarray(aux["t"], np.float64) - t_lo) / (t_hi - t_lo)
    logit = np.log(u) - np.log1p(-u)
    assert stats.kstest(logit, "norm", args=(m, s)).pvalue > 1e-3
    assert stats.kstest(logit, "norm", args=(m + 0.15, s)).pvalue < 1e-3  # the test can tell a shifted law apart
    t_uniform = np.asarray(sample_times(jax.random.PRNGKey(3), 4000, t_lo, t_hi))
    assert stats.kstest(t_uniform, "uniform", args=(t_lo, t_hi - t_lo)).pvalue > 1e-3


def test_euler_on_rectified_flow_converges_at_order_one():
    """Euler (trailing grid, the last step to x_0) with the oracle flow: error ~ 1/N toward the exact ODE endpoint."""
    gmm = ring_mixture(std=0.4)
    model = gmm.model_fn(RF, "flow")
    z = RF.prior_sample(jax.random.PRNGKey(0), (256, 2))
    ref = diffjax.sample(model, RF, z, method="pf_ode", num_steps=1, prediction="flow", t_end=0.0, rtol=1e-8,
                         atol=1e-8)
    errors = []
    for n in (8, 16, 32):
        x = diffjax.sample(model, RF, z, method="euler", num_steps=n, prediction="flow", grid="trailing", t_end=0.0)
        errors.append(float(jnp.mean(jnp.linalg.norm(x - ref, axis=-1))))
    slopes = np.log2(np.asarray(errors[:-1]) / np.asarray(errors[1:]))
    assert np.all((slopes > 0.8) & (slopes < 1.3)), (errors, slopes)


def test_straightness_is_zero_for_a_straight_flow_and_positive_for_the_mixture():
    """Data at one point mu: every rectified-flow path is the line z -> mu at constant speed, so S = 0."""
    mu = jnp.array([1.0, -2.0])
    z = jax.random.normal(jax.random.PRNGKey(0), (64, 2))
    straight = reflow.straightness(lambda x, t: (x - mu) / t[:, None], RF, z, num_steps=50, prediction="flow",
                                   t_start=1.0)
    assert float(straight.value) < 1e-10
    chex.assert_trees_all_close(straight.x, jnp.broadcast_to(mu, z.shape), atol=1e-5)
    curved = reflow.straightness(ring_mixture().model_fn(RF, "flow"), RF, z, num_steps=50, prediction="flow")
    assert float(curved.value) > 0.1
    assert curved.per_example.shape == (64,) and curved.nfe == 50


@functools.cache
def _ring_flow():
    """One function object, so every sampler call below reuses its compiled loop."""
    return ring_mixture().model_fn(RF, "flow")


def _oracle_couplings(directory, **kw):
    args = dict(num_pairs=250, shape=(2,), shard_size=100, batch_size=50, prediction="flow", method="heun",
                num_steps=4, seed=3)
    args.update(kw)
    return reflow.generate_couplings(_ring_flow(), RF, str(directory), **args)


def _shards(directory, n=3):
    out = []
    for i in range(n):
        with np.load(reflow.shard_path(str(directory), i)) as f:
            out.append({k: f[k] for k in f.files})
    return out


def test_couplings_are_written_resumed_and_independent_of_the_process_count(tmp_path):
    one = _oracle_couplings(tmp_path / "one")
    assert one["written"] == [0, 1, 2] and one["skipped"] == 0 and one["num_shards"] == 3
    manifest = json.load(open(tmp_path / "one" / reflow.MANIFEST))
    assert manifest["num_pairs"] == 250 and manifest["sampler"]["method"] == "heun"
    shards = _shards(tmp_path / "one")
    assert [len(s["z"]) for s in shards] == [100, 100, 50]
    # shard i's noise is a function of (seed, i), and x is the sampler's endpoint from it
    z1, _ = reflow.shard_noise(RF, 3, 1, 100, (2,))
    np.testing.assert_array_equal(shards[1]["z"], z1)
    x1 = diffjax.sample(_ring_flow(), RF, z1[:50], method="heun", num_steps=4, prediction="flow", t_end=0.0)
    np.testing.assert_allclose(shards[1]["x"][:50], np.asarray(x1), atol=1e-5)
    # two processes write disjoint shards; together the same couplings
    p0 = _oracle_couplings(tmp_path / "two", process_index=0, process_count=2)
    assert p0["written"] == [0, 2] and reflow.missing_shards(str(tmp_path / "two"), manifest) == [1]
    p1 = _oracle_couplings(tmp_path / "two", process_index=1, process_count=2)
    assert p1["written"] == [1]
    chex.assert_trees_all_equal(_shards(tmp_path / "two"), shards)
    # a rerun skips complete shards; a lost shard, a stale temporary and a truncated shard are redone
    again = _oracle_couplings(tmp_path / "one")
    assert again["written"] == [] and again["skipped"] == 3
    d = tmp_path / "one"
    os.remove(reflow.shard_path(str(d), 1))
    (d / "shard_00001.npz.tmp999").write_bytes(b"half a shard")
    data = open(reflow.shard_path(str(d), 2), "rb").read()
    open(reflow.shard_path(str(d), 2), "wb").write(data[: len(data) // 2])
    assert reflow.missing_shards(str(d), manifest) == [1, 2]
    redo = _oracle_couplings(d)
    assert redo["written"] == [1, 2] and redo["skipped"] == 1
    chex.assert_trees_all_equal(_shards(d), shards)
    with pytest.raises(ValueError, match="num_pairs"):
        _oracle_couplings(d, num_pairs=300)


def test_coupling_batches_shuffle_epochs_resume_and_split_over_processes(tmp_path):
    _oracle_couplings(tmp_path)
    shards = _shards(tmp_path)
    z_all = np.concatenate([s["z"] for s in shards])
    batches = reflow.coupling_batches(str(tmp_path), global_batch_size=50, seed=7)
    epochs = [[next(batches) for _ in range(5)] for _ in range(2)]  # 250 pairs = 5 batches of 50 per epoch
    for epoch in epochs:
        z = np.concatenate([b["noise"] for b in epoch])
        x = np.concatenate([b["x"] for b in epoch])
        # every pair exactly once per epoch, z still paired with its x
        order = np.lexsort(z.T)
        np.testing.assert_array_equal(z[order], z_all[np.lexsort(z_all.T)])
        x_all = np.concatenate([s["x"] for s in shards])
        np.testing.assert_array_equal(x[order], x_all[np.lexsort(z_all.T)])
    assert not np.array_equal(epochs[0][0]["noise"], epochs[1][0]["noise"])  # reshuffled
    # batch s is a function of (seed, s): resuming at step 7 reads what the uninterrupted stream does
    resumed = next(reflow.coupling_batches(str(tmp_path), global_batch_size=50, seed=7, start_step=7))
    chex.assert_trees_all_equal(resumed, epochs[1][2])
    # batch size 60 straddles epochs; two processes read the halves of the one-process batch
    full = reflow.coupling_batches(str(tmp_path), global_batch_size=60, seed=1)
    halves = [reflow.coupling_batches(str(tmp_path), global_batch_size=60, seed=1, process_index=p, process_count=2)
              for p in range(2)]
    for _ in range(6):
        b = next(full)
        parts = [next(h) for h in halves]
        chex.assert_trees_all_equal(b, jax.tree.map(lambda *v: np.concatenate(v), *parts))
    os.remove(reflow.shard_path(str(tmp_path), 0))
    with pytest.raises(ValueError, match="incomplete"):
        reflow.coupling_batches(str(tmp_path), global_batch_size=50)


def test_distill_loss_is_the_one_step_samplers_error():
    """x_hat = z - t v(z, t) at the sampler's first time, the one-step Euler sample: zero loss for the exact map."""
    z = jax.random.normal(jax.random.PRNGKey(0), (128, 2))
    x = 2.0 * z + 1.0
    t0 = float(RF.t_max)

    def exact(params, zz, t, cond=None):
        return (zz - (2.0 * zz + 1.0)) / t[:, None]

    loss = reflow.make_distill_loss(exact, RF)
    value, _ = loss(None, {"x": x, "noise": z}, None)
    assert float(value) < 1e-10
    one_step = diffjax.sample(lambda zz, t: exact(None, zz, t), RF, z, method="euler", num_steps=1,
                              prediction="flow", t_end=0.0)
    chex.assert_trees_all_close(one_step, x, atol=1e-5)
    shifted = reflow.make_distill_loss(lambda p, zz, t, c=None: exact(p, zz, t) + 0.1, RF)
    off, _ = shifted(None, {"x": x, "noise": z}, None)
    np.testing.assert_allclose(float(off), (0.1 * t0) ** 2, rtol=1e-5)  # x_hat moves by t0 * 0.1 in each dim


# ---- one reflow on 2-D data ----------------------------------------------------------------------------------


def _train_flow(batches_fn, steps, key, params=None, width=128, depth=3, lr=2e-3):
    """An MLP velocity field trained by the flow objective on ``batches_fn(key) -> {"x"(, "noise")}``."""
    module = create_model("mlp", width=width, depth=depth)
    apply = make_model_fn(module)
    k_init, k_run = jax.random.split(key)
    params = init_params(module, k_init, (1, 2)) if params is None else params
    loss = make_loss(lambda p, x, t, c: apply(p, x, t), RF, prediction="flow", objective="flow")
    opt = optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, 50, steps, lr / 10))

    @jax.jit
    def run(params):
        def step(carry, i):
            params, state = carry
            k_batch, k_loss = jax.random.split(jax.random.fold_in(k_run, i))
            grads = jax.grad(lambda p: loss(p, batches_fn(k_batch), k_loss)[0])(params)
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(steps))
        return params

    params = run(params)
    return params, jax.tree_util.Partial(lambda p, x, t: apply(p, x, t), params)


def _reflow_gain(sample_data, one_rf, key, steps, **mlp):
    """S and the 1-step Euler sliced-Wasserstein distance to exact samples of the 1-RF ``one_rf`` and of the
    2-RF trained on its couplings (initialised from ``one_rf``'s params if it has them)."""
    k_pairs, k_train, k_eval, k_data, k_sw = jax.random.split(key, 5)
    z = RF.prior_sample(k_pairs, (4096, 2))
    x = diffjax.sample(one_rf[1], RF, z, method="heun", num_steps=32, prediction="flow", t_end=0.0)

    def couplings(k):
        i = jax.random.randint(k, (512,), 0, z.shape[0])
        return {"x": x[i], "noise": z[i]}

    _, two_rf = _train_flow(couplings, steps, k_train, params=one_rf[0], **mlp)
    z_eval = RF.prior_sample(k_eval, (2000, 2))
    exact = sample_data(k_data, 2000)
    out = {}
    for name, model in (("1rf", one_rf[1]), ("2rf", two_rf)):
        s = reflow.straightness(model, RF, z_eval, num_steps=32, prediction="flow")
        one = diffjax.sample(model, RF, z_eval, method="euler", num_steps=1, prediction="flow", t_end=0.0)
        out[name] = (float(s.value), float(sliced_wasserstein(one, exact, k_sw)))
    floor = float(sliced_wasserstein(sample_data(jax.random.fold_in(k_data, 1), 2000), exact, k_sw))
    return out, floor


def test_one_reflow_straightens_the_ring_oracle_and_improves_one_step_samples():
    """Fast variant: the 1-RF is the oracle's exact velocity; the 2-RF an MLP on its couplings."""
    gmm = ring_mixture()
    out, floor = _reflow_gain(lambda k, n: gmm.sample(k, n)[0], (None, gmm.model_fn(RF, "flow")),
                              jax.random.PRNGKey(0), steps=200, width=64, depth=2)
    (s1, w1), (s2, w2) = out["1rf"], out["2rf"]
    assert s2 < 0.25 * s1, out  # straighter
    assert w2 < 0.5 * w1 and w2 < w1 - 5 * floor, (out, floor)  # closer to the data in one Euler step


@pytest.mark.slow
def test_one_reflow_straightens_a_trained_flow_on_two_moons():
    """Both flows trained: the 1-RF by flow matching on two moons, the 2-RF fine-tuned from it on its couplings."""
    from diffjax.data.toy import _sample_two_moons

    key = jax.random.PRNGKey(1)
    one_rf = _train_flow(lambda k: {"x": _sample_two_moons(k, 512)[0]}, 1500, key)
    out, floor = _reflow_gain(lambda k, n: _sample_two_moons(k, n)[0], one_rf, jax.random.fold_in(key, 1),
                              steps=800)
    (s1, w1), (s2, w2) = out["1rf"], out["2rf"]
    assert s2 < 0.5 * s1, out
    assert w2 < 0.7 * w1 and w2 < w1 - 5 * floor, (out, floor)


# ---- the main job's tasks -------------------------------------------------------------------------------------


def _toy_flow_config(num_steps):
    import ml_collections
    from ml_collections import config_dict

    from diffjax.config import load

    c = load(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "configs",
                          "digits_flow.py"))
    c.data.dataset = "ring"
    c.data.dequantize = False
    c.model = ml_collections.ConfigDict({"name": "mlp", "width": 32, "depth": 1, "dropout": 0.0,
                                         "num_classes": config_dict.placeholder(int)})
    c.training.batch_size = 64
    c.training.num_steps = num_steps
    c.training.steps_per_call = 5
    c.training.log_every = c.training.checkpoint_every = 10
    c.sample.num_samples = 16
    c.sample.num_steps = 2
    c.eval.num_examples = c.eval.batch_size = 32
    return c


def test_reflow_task_trains_from_its_teacher_on_couplings_it_writes(tmp_path):
    """1-RF (task diffusion, flow objective) -> 2-RF (task reflow): couplings written at the start, the student
    initialised from the teacher, resumed without regenerating, loaded and sampled; validation names fields."""
    from diffjax.training.builders import ConfigError, validate_config
    from diffjax.training.loop import setup, train
    from diffjax.training.task_reflow import reflow_config

    train(_toy_flow_config(10), str(tmp_path / "rf1"), progress=False)
    c = reflow_config(_toy_flow_config(10), teacher_workdir=str(tmp_path / "rf1"),
                      couplings_dir=str(tmp_path / "pairs"), num_pairs=200, shard_size=100, num_steps=4)
    run = setup(c, None)  # initialised from the teacher's EMA weights
    chex.assert_trees_all_close(run.state.params, diffjax.load_run(str(tmp_path / "rf1")).params)
    train(c, str(tmp_path / "rf2"), progress=False)
    assert reflow.missing_shards(c.reflow.couplings_dir, reflow.read_manifest(c.reflow.couplings_dir)) == []
    stamp = os.path.getmtime(reflow.shard_path(c.reflow.couplings_dir, 0))
    c.training.num_steps = 20  # resumed: the couplings are complete, nothing is regenerated
    train(c, str(tmp_path / "rf2"), progress=False)
    assert os.path.getmtime(reflow.shard_path(c.reflow.couplings_dir, 0)) == stamp
    student = diffjax.load_run(str(tmp_path / "rf2"))
    assert student.step == 20 and np.all(np.isfinite(student.sample(8))) and student.default_num_steps == 2

    for field, value in (("diffusion.schedule", "vp_cosine"), ("diffusion.prediction", "v"),
                         ("reflow.method", "nope"), ("reflow.init", "other"), ("reflow.num_pairs", 0)):
        bad = c.copy_and_resolve_references()
        section, name = field.split(".")
        bad[section][name] = value
        with pytest.raises(ConfigError, match=f"config.{field}"):
            validate_config(bad, 1)
    bad = c.copy_and_resolve_references()
    bad.reflow.distill = True
    with pytest.raises(ConfigError, match="config.sample.num_steps"):
        validate_config(bad, 1)
