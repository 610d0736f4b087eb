import os

import chex
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffjax
from diffjax.losses import make_loss
from diffjax.models import (
    MLP,
    EncoderClassifier,
    MODELS,
    UNet,
    count_params,
    create_model,
    init_params,
    make_model_fn,
    sinusoidal_embedding,
    fourier_embedding,
)
from diffjax.models.embeddings import TimeEmbedding, default_init
from diffjax.models.unet import default_num_groups

KEY = jax.random.PRNGKey(0)
LABELS = jnp.array([0, 1, 2, 3], jnp.int32)  # 3 = the null class of the tiny network

# Proposed default for sklearn digits (8x8x1, 10 classes); its parameter count is pinned below.
DIGITS_UNET = dict(ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,), dropout=0.1,
                   num_classes=10)
# A small DDPM++-like CIFAR-10 network (half width, 2 blocks per level).
CIFAR_SMALL_UNET = dict(ch=64, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                        dropout=0.1, num_classes=10)
# Tiny network used for the numerical tests: 8x8x1, attention at 4, 3 classes, dropout.
TINY = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_heads=2, resblock_updown=False,
            dropout=0.5, num_classes=3, scale_shift=True)


def _shapes(module, x_shape, cond=None):
    """(variables, output) shapes of ``module.init`` by tracing only: no compilation."""
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    t = jax.ShapeDtypeStruct(x_shape[:1], jnp.float32)
    out, variables = jax.eval_shape(lambda x, t: module.init_with_output(KEY, x, t, cond), x, t)
    return variables, out


def _perturb(variables, scale=0.3):
    """Give every parameter (the zero-initialised ones included) a random offset (host-side: no compiles)."""
    rng = np.random.default_rng(42)
    return jax.tree_util.tree_map(
        lambda p: jnp.asarray(np.asarray(p) + scale * rng.standard_normal(p.shape).astype(np.float32)),
        variables)


def _compile(fn, *args):
    """jit at XLA optimisation level 0: these tiny tests are dominated by compile time."""
    return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def mlp():
    """A small conditional MLP (3 classes, null label 3) on D = 2."""
    module = MLP(width=16, depth=2, num_classes=3)
    return dict(module=module, variables=init_params(module, KEY, (1, 2), num_classes=3))


@pytest.fixture(scope="module")
def tiny():
    """A tiny conditional UNet, its perturbed params, and compiled eval / unconditional / train calls."""
    module = UNet(**TINY)
    variables = init_params(module, KEY, (4, 8, 8, 1), num_classes=3)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
    t = jnp.full((4,), 0.5)
    f, f_train = make_model_fn(module), make_model_fn(module, train=True)
    return dict(
        module=module, variables=variables, perturbed=_perturb(variables), x=x,
        f=_compile(f, variables, x, t, LABELS),
        f_none=_compile(lambda v, x, t: f(v, x, t, None), variables, x, t),
        f_train=_compile(f_train, variables, x, t, LABELS, KEY),
    )


# ---- shapes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg,x_shape", [
    (dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)), (2, 8, 8, 1)),
    (dict(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(7,)), (2, 28, 28, 1)),
    (dict(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,), num_classes=10,
          resblock_updown=False, scale_shift=True, embedding="fourier"), (2, 32, 32, 3)),
], ids=["digits8", "mnist28", "cifar32"])
def test_unet_output_shape(cfg, x_shape):
    _, out = _shapes(UNet(**cfg), x_shape)
    assert out.shape == x_shape and out.dtype == jnp.float32


def test_unet_out_channels():
    _, out = _shapes(UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), out_channels=2),
                     (2, 8, 8, 1))
    assert out.shape == (2, 8, 8, 2)


def test_unet_forward_values(tiny):
    out = tiny["f"](tiny["variables"], tiny["x"], jnp.full((4,), 0.5), LABELS)
    chex.assert_shape(out, (4, 8, 8, 1))
    # zero-initialised output conv: the untrained network predicts exactly 0
    assert float(jnp.max(jnp.abs(out))) == 0.0
    out = tiny["f"](tiny["perturbed"], tiny["x"], jnp.full((4,), 0.5), LABELS)
    assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 0


def test_unet_zero_init_switch():
    """zero_init: the last layer of every residual branch and the output conv start at 0 (DDPM++), or not."""
    cfg = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
    flat = {z: flax.traverse_util.flatten_dict(init_params(UNet(**cfg, zero_init=z), KEY, (2, 8, 8, 1))["params"])
            for z in (True, False)}
    assert jax.tree.map(jnp.shape, flat[True]) == jax.tree.map(jnp.shape, flat[False])
    last = [k for k in flat[True] if k[-1] == "kernel" and (k[-2] in ("conv1", "out", "conv_out"))]
    # residual blocks: down 2 + downsample 1 + mid 2 + up 4 + upsample 1; attentions: down 1 + mid 1 + up 2; conv_out
    assert len(last) == 10 + 4 + 1
    for k in last:
        assert float(jnp.max(jnp.abs(flat[True][k]))) == 0.0, k
        assert float(jnp.std(flat[False][k])) > 0.0, k
    others = [k for k in flat[True] if k[-1] == "kernel" and k not in last]
    assert all(float(jnp.std(flat[True][k])) > 0.0 for k in others)


def test_mlp_output_shape_and_zero_init(mlp):
    out = jax.jit(make_model_fn(mlp["module"]))(mlp["variables"], jnp.ones((5, 2)), jnp.linspace(0, 1, 5), None)
    chex.assert_shape(out, (5, 2))
    assert float(jnp.max(jnp.abs(out))) == 0.0


# ---- conditioning --------------------------------------------------------------------------

def test_unet_time_conditioning(tiny):
    x = tiny["x"]
    a = tiny["f_none"](tiny["perturbed"], x, jnp.full((4,), 0.1))
    b = tiny["f_none"](tiny["perturbed"], x, jnp.full((4,), 0.9))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3


def test_unet_class_conditioning_and_null(tiny):
    x, t, p = tiny["x"], jnp.full((4,), 0.5), tiny["perturbed"]
    a = tiny["f"](p, x, t, jnp.zeros((4,), jnp.int32))
    b = tiny["f"](p, x, t, jnp.ones((4,), jnp.int32))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    null = tiny["f"](p, x, t, jnp.full((4,), 3, jnp.int32))  # row num_classes = 3 is the null class
    none = tiny["f_none"](p, x, t)
    chex.assert_trees_all_close(null, none, rtol=1e-6, atol=1e-6)
    assert p["params"]["class_embed"]["table"]["embedding"].shape == (4, 4 * TINY["ch"])


def test_unconditional_rejects_cond():
    with pytest.raises(ValueError, match="num_classes"):
        _shapes(UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=()), (2, 8, 8, 1),
                cond=jnp.zeros((2,), jnp.int32))


def test_mlp_conditioning_after_one_gradient_step(mlp):
    """At init the zero output layer blocks every gradient but its own; one step opens the rest."""
    f, v = make_model_fn(mlp["module"]), mlp["variables"]
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 2))
    t = jnp.linspace(0.05, 0.95, 8)
    y = jnp.arange(8, dtype=jnp.int32) % 3

    def loss(v):
        return jnp.mean((f(v, x, t, y) - x) ** 2)

    grad = _compile(jax.grad(loss), v)
    g0 = grad(v)["params"]
    assert float(jnp.abs(g0["time_embed"]["dense0"]["kernel"]).max()) == 0.0
    v1 = jax.tree_util.tree_map(lambda p, g: np.asarray(p) - 0.1 * np.asarray(g), v, {"params": g0})
    g1 = grad(v1)["params"]
    assert float(jnp.abs(g1["time_embed"]["dense0"]["kernel"]).max()) > 0
    assert float(jnp.abs(g1["class_embed"]["table"]["embedding"]).max()) > 0

    def outputs(v):  # one compile for every comparison
        xs = x[:1].repeat(2, 0)
        return (f(v, xs, jnp.array([0.2, 0.8]), None),
                f(v, xs, jnp.full((2,), 0.5), jnp.array([0, 1], jnp.int32)),
                f(v, xs, jnp.full((2,), 0.5), jnp.full((2,), 3, jnp.int32)),
                f(v, xs, jnp.full((2,), 0.5), None))

    by_time, by_label, null, none = _compile(outputs, v1)(v1)
    assert float(jnp.abs(by_time[0] - by_time[1]).max()) > 1e-6
    assert float(jnp.abs(by_label[0] - by_label[1]).max()) > 1e-6
    chex.assert_trees_all_close(null, none)


def test_mlp_model_fn_drives_library_loss(mlp):
    """The library sees only model_fn(params, x, t, cond): L_simple with CFG label dropout."""
    loss_fn = make_loss(make_model_fn(mlp["module"]), diffjax.VPLinear(), cond_drop_prob=0.2, null_label=3)
    batch = {"x": jnp.ones((6, 2)), "label": jnp.array([0, 1, 2, 0, 1, 2], jnp.int32)}
    v = mlp["variables"]
    (loss, _), g = _compile(jax.value_and_grad(loss_fn, has_aux=True), v, batch, KEY)(v, batch, KEY)
    assert np.isfinite(float(loss)) and count_params(g) == count_params(v)


# ---- dropout ---------------------------------------------------------------------------------

def test_dropout_only_in_training(tiny):
    x, t, p, y = tiny["x"], jnp.full((4,), 0.5), tiny["perturbed"], LABELS
    chex.assert_trees_all_equal(tiny["f"](p, x, t, y), tiny["f"](p, x, t, y))
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    a, b = tiny["f_train"](p, x, t, y, k1), tiny["f_train"](p, x, t, y, k2)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    chex.assert_trees_all_equal(a, tiny["f_train"](p, x, t, y, k1))
    assert float(jnp.max(jnp.abs(a - tiny["f"](p, x, t, y)))) > 1e-3
    with pytest.raises(ValueError, match="rng"):
        make_model_fn(tiny["module"], train=True)(p, x, t, y)


# ---- architecture ----------------------------------------------------------------------------

@pytest.mark.parametrize("attn,expected", [((4,), {4}), ((8, 2), {8, 2}), ((), set())])
def test_attention_at_requested_resolutions(attn, expected):
    cfg = dict(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=attn)
    variables, _ = _shapes(UNet(**cfg), (1, 8, 8, 1))
    names = list(variables["params"])
    found = {int(n.split("_")[1][1:]) for n in names if "_attn" in n and not n.startswith("mid")}
    assert found == expected
    for r in expected:  # after every block: num_res_blocks down, num_res_blocks + 1 up
        assert sum(n.startswith(f"down_r{r}_attn") for n in names) == 1
        assert sum(n.startswith(f"up_r{r}_attn") for n in names) == 2
    assert "mid_attn" in names


def test_resblock_updown_vs_plain():
    base = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=())
    v_res, _ = _shapes(UNet(**base, resblock_updown=True), (1, 8, 8, 1))
    v_plain, _ = _shapes(UNet(**base, resblock_updown=False), (1, 8, 8, 1))
    assert "emb" in v_res["params"]["down_r8_downsample"]
    assert set(v_plain["params"]["down_r8_downsample"]) == {"conv"}


def test_default_num_groups():
    assert [default_num_groups(c) for c in (3, 8, 64, 128, 256, 144)] == [1, 2, 16, 32, 32, 24]
    variables, _ = _shapes(UNet(ch=48, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=()), (1, 8, 8, 1))
    assert variables["params"]["up_r8_res0"]["norm0"]["scale"].shape == (144,)


def test_parameter_counts():
    """Pinned counts. Ho et al. 2020's CIFAR-10 DDPM has 35.7M parameters; the defaults are
    score_sde's DDPM++ (VP) CIFAR-10 net, with attention after every up block (+4 blocks, 1.05M)."""
    counts = [count_params(_shapes(UNet(**cfg), x_shape)[0]) for cfg, x_shape in [
        (DIGITS_UNET, (1, 8, 8, 1)),
        (CIFAR_SMALL_UNET, (1, 32, 32, 3)),
        (dict(num_res_blocks=2, resblock_updown=False, skip_rescale=False), (1, 32, 32, 3)),
        ({}, (1, 32, 32, 3)),
    ]]
    assert 0.5e6 < counts[0] < 2e6
    assert counts == [1_067_297, 10_000_195, 35_746_307, 62_859_139]


# ---- embeddings ---------------------------------------------------------------------------

def test_embeddings_closed_form():
    emb = sinusoidal_embedding(jnp.array([0.0, 1.0]), 4)  # frequencies 1, 1e-2
    expect = jnp.array([[0, 0, 1, 1], [np.sin(1.0), np.sin(0.01), np.cos(1.0), np.cos(0.01)]])
    chex.assert_trees_all_close(emb, expect, atol=1e-6)
    ff = fourier_embedding(jnp.array([0.0, 0.3]), 8)
    chex.assert_shape(ff, (2, 8))
    chex.assert_trees_all_close(ff[0], jnp.array([0.0] * 4 + [1.0] * 4))
    chex.assert_trees_all_equal(ff, fourier_embedding(jnp.array([0.0, 0.3]), 8))  # fixed W


def test_time_scale_default_is_ddpm_steps():
    t = jnp.array([0.25, 0.5])
    default, explicit = TimeEmbedding(8, 6), TimeEmbedding(8, 6, time_scale=1000.0)
    v = default.init(KEY, t)

    @jax.jit
    def embed(v, t):
        return (default.apply(v, t), explicit.apply(v, t), TimeEmbedding(8, 6, time_scale=1.0).apply(v, 1000.0 * t))

    a, b, c = embed(v, t)
    chex.assert_trees_all_close(a, b)
    chex.assert_trees_all_close(a, c)
    fourier = jax.eval_shape(lambda: TimeEmbedding(8, 6, embedding="fourier").init(KEY, t))
    assert set(fourier["params"]) == {"dense0", "dense1"}  # Fourier frequencies are constants, not params


# ---- validation -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    (dict(ch_mult=()), "ch_mult"),
    (dict(ch_mult=(1, 0)), "ch_mult"),
    (dict(ch=0), "ch"),
    (dict(num_res_blocks=0), "num_res_blocks"),
    (dict(dropout=1.0), "dropout"),
    (dict(embedding="learned"), "embedding"),
    (dict(time_scale=0.0), "time_scale"),
    (dict(num_classes=0), "num_classes"),
    (dict(num_groups=5), "num_groups"),
    (dict(num_heads=0), "num_heads"),
    (dict(out_channels=0), "out_channels"),
    (dict(kernels="gpu"), "kernels"),
    (dict(kernels=None), "kernels"),
    (dict(dtype="float16"), "dtype"),
])
def test_unet_bad_fields(kwargs, field):
    with pytest.raises(ValueError, match=field):
        UNet(**{**dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=()), **kwargs})


@pytest.mark.parametrize("cfg,x_shape,match", [
    (dict(attn_resolutions=(16,)), (1, 8, 8, 1), "attn_resolutions"),
    (dict(ch_mult=(1, 2, 2, 2), attn_resolutions=()), (1, 28, 28, 1), r"28.*ch_mult"),
    (dict(attn_resolutions=()), (8, 8, 1), "rank 4"),
    (dict(num_heads=3), (1, 8, 8, 1), "num_heads"),
    (dict(head_channels=3), (1, 8, 8, 1), "head_channels"),
])
def test_unet_bad_inputs(cfg, x_shape, match):
    module = UNet(**{**dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)), **cfg})
    with pytest.raises(ValueError, match=match):
        _shapes(module, x_shape)


def test_mlp_bad_fields_and_inputs():
    for kwargs, field in [(dict(width=0), "width"), (dict(depth=0), "depth"),
                          (dict(dropout=-0.1), "dropout"), (dict(embedding="x"), "embedding"),
                          (dict(kernels="tpu"), "kernels"), (dict(dtype="int8"), "dtype")]:
        with pytest.raises(ValueError, match=field):
            MLP(**kwargs)
    with pytest.raises(ValueError, match="rank 2"):
        _shapes(MLP(width=8, depth=1), (2, 2, 2))
    with pytest.raises(ValueError, match="t must have shape"):
        jax.eval_shape(lambda: MLP(width=8, depth=1).init(KEY, jnp.ones((2, 3)), jnp.ones((3,))))
    with pytest.raises(ValueError, match="cond must have shape"):
        _shapes(MLP(width=8, depth=1, num_classes=2), (2, 3), cond=jnp.zeros((3,), jnp.int32))


def test_registry_and_helpers():
    from diffjax.models import DiT

    assert MODELS == {"unet": UNet, "dit": DiT, "mlp": MLP, "classifier": EncoderClassifier}
    assert isinstance(create_model("mlp", width=8, depth=1), MLP)
    with pytest.raises(ValueError, match=r"'vae'.*\['classifier', 'dit', 'mlp', 'unet'\]"):
        create_model("vae")


def test_init_and_model_fn_errors(mlp):
    module, v = mlp["module"], mlp["variables"]
    with pytest.raises(ValueError, match="num_classes"):
        init_params(module, KEY, (1, 2), num_classes=10)
    with pytest.raises(ValueError, match="x_shape"):
        init_params(module, KEY, (2,))
    with pytest.raises(ValueError, match="variables dict"):
        make_model_fn(module)(v["params"], jnp.ones((1, 2)), jnp.ones((1,)))
    assert count_params(v) == sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(v))
