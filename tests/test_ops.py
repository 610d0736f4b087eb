"""diffjax.models.ops (the default path) and diffjax.models.cpu_kernels (the XLA:CPU path): same numbers,
same parameters, same dropout masks; each path's own guarantees (forward mode and any key impl on the
default path; canonical convolutions inside scan on the CPU path)."""

import re

import chex
import flax.linen as nn
import flax.traverse_util
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from diffjax.models import MLP, EncoderClassifier, UNet, cpu_kernels, init_params, ops
from diffjax.models.embeddings import default_init

KEY = jax.random.PRNGKey(0)
# 16x16 input: the first level's GroupNorms (256 positions) take the CPU path's fused backward,
# the 8x8 level autodiff; attention (2 heads) at 8, dropout 0.5 so that a different mask shows.
TINY = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_heads=2, dropout=0.5,
            num_classes=3, resblock_updown=False, scale_shift=True)
X = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 1))
T = jnp.array([0.3, 0.7])
Y = jnp.array([0, 2], jnp.int32)


def _nets(**fields):
    return {k: UNet(**TINY, kernels=k, **fields) for k in ("xla", "cpu")}


@pytest.fixture(scope="module")
def params():
    """The tiny U-Net's variables (init on the default path), every parameter offset so none is zero."""
    v = init_params(_nets()["xla"], KEY, X.shape, num_classes=3)
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(np.float32), v)


def _compile(fn, *args):
    """jit at XLA optimisation level 0: these tiny tests are dominated by compile time."""
    return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


# ---- selection and fields ---------------------------------------------------------------------

def test_auto_resolves_by_backend(monkeypatch):
    assert jax.default_backend() == "cpu" and ops.resolve_kernels("auto") == "cpu"
    assert [ops.resolve_kernels(k) for k in ("xla", "cpu")] == ["xla", "cpu"]
    assert ops.resolve_kernels("auto", backend="tpu") == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert ops.resolve_kernels("auto") == "xla" and ops.resolve_kernels("cpu") == "cpu"
    with pytest.raises(ValueError, match="kernels must be one of"):
        ops.resolve_kernels("cuda")


@pytest.mark.parametrize("make", [UNet, MLP, lambda **kw: EncoderClassifier(out_channels=3, **kw)],
                         ids=["unet", "mlp", "classifier"])
def test_models_validate_kernels_and_dtype(make):
    for field, bad in (("kernels", "gpu"), ("kernels", "CPU"), ("dtype", "float16"), ("dtype", jnp.bfloat16)):
        with pytest.raises(ValueError, match=field):
            make(**{field: bad})
    make(kernels="xla", dtype="bfloat16")


def test_param_trees_identical_across_kernels_and_dtypes():
    """Names, shapes, dtypes (float32) and initial values do not depend on ``kernels`` or ``dtype``."""
    trees = {(k, d): jax.eval_shape(lambda m=UNet(**TINY, kernels=k, dtype=d): m.init(KEY, X, T, Y))
             for k in ("xla", "cpu") for d in (None, "bfloat16")}
    ref = trees[("xla", None)]
    for tree in trees.values():
        chex.assert_trees_all_equal_shapes_and_dtypes(tree, ref)
    assert {a.dtype for a in jax.tree.leaves(ref)} == {jnp.dtype("float32")}
    flat = flax.traverse_util.flatten_dict(ref["params"])
    assert flat[("mid_attn", "qkv", "kernel")].shape == (16, 48) and flat[("mid_attn", "qkv", "bias")].shape == (48,)
    assert set(ref["params"]["down_r16_downsample"]["conv"]) == {"kernel", "bias"}
    small = dict(ch=4, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(4,))
    values = [init_params(UNet(**small, kernels=k), KEY, (1, 4, 4, 1)) for k in ("xla", "cpu")]
    chex.assert_trees_all_equal(*values)


# ---- both paths, one tiny U-Net ---------------------------------------------------------------

@pytest.fixture(scope="module")
def both_paths(params):
    """Loss and gradients of the tiny U-Net in train mode with dropout on both paths (one compile)."""
    nets = _nets()

    def loss(v, net, key):
        return jnp.mean(net.apply(v, X, T, Y, train=True, rngs={"dropout": key}) ** 2)

    def run(v, key):
        return {k: jax.value_and_grad(loss)(v, net, key) for k, net in nets.items()}

    return _compile(run, params, KEY)(params, KEY)


def test_paths_agree_in_train_mode_with_dropout(both_paths):
    """Same loss and gradients on the default and CPU paths, threefry key.

    Tolerance: float32 rounding only. The paths differ in summation order (custom-VJP convolution and
    GroupNorm backward, split vs fused q/k/v matmuls, SiLU as a division), ~1e-7 relative per op,
    so loss to rtol 1e-5 and each gradient leaf to 2e-4 of its largest entry. With dropout 0.5 a
    different mask would change the loss by O(1): the masks are the same too.
    """
    (l_xla, g_xla), (l_cpu, g_cpu) = both_paths["xla"], both_paths["cpu"]
    np.testing.assert_allclose(l_cpu, l_xla, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_cpu), jax.tree.leaves(g_xla)):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-4 * float(jnp.abs(b).max()) + 1e-12,
                                   err_msg=jax.tree_util.keystr(path))
    assert all(float(jnp.abs(b).max()) > 0 for b in jax.tree.leaves(g_xla))  # every parameter is exercised


def test_default_path_any_key_impl_and_forward_mode(params):
    """Default path: training-mode forward + gradient with an rbg key, and ``jax.jvp`` through the
    training-mode model, checked against its reverse mode by the adjoint identity <u, J d> = <J^T u, d>
    (the same rbg dropout mask in both)."""
    net = _nets()["xla"]
    key = jax.random.key(3, impl="rbg")
    d, u = (jax.random.normal(jax.random.PRNGKey(i), X.shape) for i in (4, 5))

    def run(v, key):
        f = lambda v, x: net.apply(v, x, T, Y, train=True, rngs={"dropout": key})  # noqa: E731
        grads = jax.grad(lambda v: jnp.mean(f(v, X) ** 2))(v)
        _, jd = jax.jvp(lambda x: f(v, x), (X,), (d,))
        jtu = jax.vjp(lambda x: f(v, x), X)[1](u)[0]
        return grads, jnp.vdot(u, jd), jnp.vdot(jtu, d)

    grads, ujd, jtud = _compile(run, params, key)(params, key)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["params"]["conv_in"]["kernel"]).max()) > 0
    np.testing.assert_allclose(ujd, jtud, rtol=1e-4)
    assert abs(float(ujd)) > 1e-3


def test_bfloat16_compute(params):
    """dtype="bfloat16": float32 parameters and output, convolutions and matmuls on bfloat16 operands,
    output within bfloat16 rounding of the float32 network (8-bit mantissa, ~20 layers deep: within
    5% of the output's scale; an unscaled or wrongly cast path is off by O(1))."""
    f32, bf16 = UNet(**TINY, kernels="xla"), UNet(**TINY, kernels="xla", dtype="bfloat16")

    def run(v):
        return f32.apply(v, X, T, Y), bf16.apply(v, X, T, Y)

    a, b = _compile(run, params)(params)
    assert a.dtype == b.dtype == jnp.float32 and float(jnp.std(a)) > 0
    assert float(jnp.abs(a - b).max()) < 0.05 * float(jnp.abs(a).max())
    jaxpr = jax.make_jaxpr(lambda v: bf16.apply(v, X, T, Y))(params)
    eqns = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name in ("conv_general_dilated", "dot_general")]
    assert len(eqns) > 20
    for e in eqns:
        assert {v.aval.dtype for v in e.invars} == {jnp.dtype("bfloat16")}, e

    rng = np.random.default_rng(1)
    for make, shape in ((lambda d: MLP(width=16, depth=2, dtype=d), (4, 3)),
                        (lambda d: EncoderClassifier(ch=8, out_channels=3, dtype=d), (2, 8, 8, 1))):
        x, t = jax.random.normal(KEY, shape), jnp.full((shape[0],), 0.5)
        shapes = jax.eval_shape(lambda m=make(None): m.init(KEY, x, t))
        v = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)
        out = _compile(lambda v, x, t: [make(d).apply(v, x, t) for d in (None, "bfloat16")], v, x, t)(v, x, t)
        assert out[1].dtype == jnp.float32 and float(jnp.std(out[0])) > 0
        np.testing.assert_allclose(out[1], out[0], rtol=0, atol=0.05 * float(jnp.abs(out[0]).max()))


def _all_eqns(jaxpr):
    """Every equation of a jaxpr, nested jaxprs (pjit, custom_vjp, scan bodies) included."""
    for e in jaxpr.eqns:
        yield e
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            yield from _all_eqns(sub)


# ---- dropout ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5), (2, 3, 5, 7), (16, 8, 8, 64)])
def test_threefry_bits_equal_jax_random_bits(shape):
    for key in (jax.random.PRNGKey(3), jax.random.key(11)):
        np.testing.assert_array_equal(jax.jit(cpu_kernels.threefry_bits, static_argnums=1)(key, shape),
                                      jax.random.bits(key, shape, jnp.uint32))


def test_threefry_bits_rejects_other_keys():
    with pytest.raises(ValueError, match="threefry2x32 key.*got a rbg key"):
        cpu_kernels.threefry_bits(jax.random.key(0, impl="rbg"), (4,))
    with pytest.raises(ValueError, match=r"got uint32\[3\]"):
        cpu_kernels.threefry_bits(jnp.zeros((3,), jnp.uint32), (4,))


def test_dropout_masks_equal_flax_on_both_paths():
    """Threefry keys (raw and typed): both paths keep exactly what ``flax.linen.Dropout`` keeps.
    An rbg key: the default path draws with jax.random, and the CPU path falls back to it."""
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 32))
    keys = {"raw": jax.random.PRNGKey(5), "typed": jax.random.key(6), "rbg": jax.random.key(7, impl="rbg")}

    @jax.jit
    def masks(x, keys):  # one compile for every comparison
        drop = lambda m, key: m.apply({}, x, deterministic=False, rngs={"dropout": key})  # noqa: E731
        return {(name, rate, impl): drop(m, key) for name, key in keys.items() for rate in (0.1, 0.5)
                for impl, m in (("flax", nn.Dropout(rate)), ("xla", ops.Dropout(rate, "xla")),
                                ("cpu", ops.Dropout(rate, "cpu")))}

    out = masks(x, keys)
    for (name, rate, impl), y in out.items():
        np.testing.assert_array_equal(y, out[(name, rate, "flax")], err_msg=f"{name} {rate} {impl}")
        assert abs(float(jnp.mean(y == 0)) - rate) < 0.02
    assert not np.array_equal(out[("raw", 0.5, "cpu")], out[("typed", 0.5, "cpu")])
    assert ops.Dropout(0.3).apply({}, x, deterministic=True) is x
    with pytest.raises(ValueError, match="rate"):
        ops.Dropout(1.0).apply({}, x, deterministic=False, rngs={"dropout": KEY})


# ---- attention --------------------------------------------------------------------------------

@pytest.mark.parametrize("heads", [1, 2, 4])
def test_split_qkv_attention_matches_dot_product_attention(heads):
    """The CPU path's split projections + two matmuls equal the default path's fused projection +
    ``jax.nn.dot_product_attention`` on (B, T, heads, d), values and gradients, to f32 rounding."""
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    b, t, c = 2, 10, 8
    h, g = (2.0 * jax.random.normal(ki, (b, t, c)) for ki in k[:2])
    kernel, bias = jax.random.normal(k[2], (c, 3 * c)) / np.sqrt(c), 0.1 * jax.random.normal(k[3], (3 * c,))
    args = (h, kernel, bias)
    out_r, vjp_r = jax.vjp(lambda *a: ops.qkv_attention(*a, heads), *args)
    out_o, vjp_o = jax.vjp(lambda *a: cpu_kernels.qkv_attention(*a, heads), *args)
    np.testing.assert_allclose(out_o, out_r, rtol=1e-5, atol=1e-5)
    for a, r, name in zip(vjp_o(g), vjp_r(g), ("h", "kernel", "bias")):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5 * float(jnp.abs(r).max()), err_msg=name)


@pytest.mark.parametrize("kernels", ["xla", "cpu"])
def test_attn_block_is_fused_dense_qkv_attention(kernels):
    """AttnBlock keeps nn.Dense(3C)'s "qkv" parameters and init, and computes the textbook block with them."""
    from diffjax.models.unet import AttnBlock

    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 8))
    block = AttnBlock(num_heads=2, num_groups=2, zero_init=False, kernels=kernels)
    params = block.init(KEY, x)["params"]
    assert jax.tree.map(jnp.shape, params["qkv"]) == {"kernel": (8, 24), "bias": (24,)}

    class Fused(nn.Module):  # nn.Dense(3C) named "qkv" at the root: the same rng path, the same initial kernel
        @nn.compact
        def __call__(self, h):
            return nn.Dense(24, kernel_init=default_init(), name="qkv")(h)

    ref_kernel = Fused().init(KEY, x.reshape(2, 16, 8))["params"]["qkv"]["kernel"]
    np.testing.assert_array_equal(params["qkv"]["kernel"], ref_kernel)

    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
    h = nn.GroupNorm(num_groups=2, epsilon=1e-6).apply({"params": params["norm"]}, x).reshape(2, 16, 8)
    qkv = h @ params["qkv"]["kernel"] + params["qkv"]["bias"]
    q, k, v = jnp.split(qkv.reshape(2, 16, 6, 4), 3, axis=2)
    a = jax.nn.dot_product_attention(q, k, v).reshape(2, 16, 8)
    want = (x + (a @ params["out"]["kernel"] + params["out"]["bias"]).reshape(x.shape)) / np.sqrt(2.0)
    np.testing.assert_allclose(block.apply({"params": params}, x), want, rtol=1e-5, atol=1e-5)


# ---- GroupNorm --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,groups", [((3, 16, 16, 12), 3), ((2, 4, 4, 8), 8), ((2, 5, 6), 2)])
@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("impl", ["ops", "cpu_fused", "cpu_autodiff"])
def test_group_norm_matches_flax(shape, groups, act, impl):
    """Values and all three gradients equal flax.linen.GroupNorm (+ SiLU) autodiff to f32 rounding."""
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = 1.5 * jax.random.normal(k[0], shape) + 0.7
    c = shape[-1]
    scale, bias = 1 + 0.3 * jax.random.normal(k[1], (c,)), 0.2 * jax.random.normal(k[2], (c,))
    g = jax.random.normal(k[3], shape)

    def ref(x, scale, bias):
        y = nn.GroupNorm(num_groups=groups, epsilon=1e-6).apply({"params": {"scale": scale, "bias": bias}}, x)
        return jax.nn.silu(y) if act == "silu" else y

    def ours(x, scale, bias):
        if impl == "ops":
            return ops.group_norm(x, scale, bias, groups, 1e-6, act)
        return cpu_kernels.group_norm(x, scale, bias, groups, 1e-6, act, fused_backward=impl == "cpu_fused")

    out_r, vjp_r = jax.vjp(ref, x, scale, bias)
    out_o, vjp_o = jax.vjp(ours, x, scale, bias)
    np.testing.assert_allclose(out_o, out_r, rtol=1e-5, atol=1e-5)
    for a, b, name in zip(vjp_o(g), vjp_r(g), ("x", "scale", "bias")):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()), err_msg=name)


def test_group_norm_and_conv_modules_have_flax_parameters():
    """ops.GroupNorm / ops.Conv: the parameter trees and initial values of flax.linen's, and Conv's outputs."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 4))
    for ours, ref in ((ops.GroupNorm(num_groups=2, act="silu"), nn.GroupNorm(num_groups=2)),
                      (ops.Conv(6, 3), nn.Conv(6, (3, 3), padding="SAME")),
                      (ops.Conv(6, 3, strides=2), nn.Conv(6, (3, 3), strides=(2, 2), padding="SAME")),
                      (ops.Conv(6, 1), nn.Conv(6, (1, 1), padding="SAME"))):
        p, p_ref = ours.init(KEY, x), ref.init(KEY, x)
        chex.assert_trees_all_equal(p, p_ref)
        if isinstance(ours, ops.Conv):
            p = jax.tree.map(lambda a: a + 0.1, p)
            for k in ("xla", "cpu"):
                np.testing.assert_allclose(ours.clone(kernels=k).apply(p, x, train=True), ref.apply(p, x),
                                           rtol=1e-5, atol=1e-5)


def test_group_norm_bad_input():
    x, s = jnp.ones((2, 4, 4, 6)), jnp.ones(6)
    for fn in (ops.group_norm, cpu_kernels.group_norm):
        with pytest.raises(ValueError, match="num_groups=4 must divide"):
            fn(x, s, s, 4)
        with pytest.raises(ValueError, match=r"scale must have shape \(6,\)"):
            fn(x, jnp.ones(5), s, 3)
        with pytest.raises(ValueError, match="act must be one of"):
            fn(x, s, s, 3, act="relu")


def test_silu_division_form_matches_silu_everywhere():
    """cpu_kernels.silu equals jax.nn.silu in value, gradient and tangent, with no NaN at the extremes."""
    silu = cpu_kernels.silu
    y = jnp.concatenate([jnp.linspace(-30.0, 30.0, 1201), jnp.array([-1e4, -1000.0, -90.0, -80.0, 90.0, 1e4])])
    np.testing.assert_allclose(silu(y), jax.nn.silu(y), rtol=1e-6, atol=1e-30)
    g_ours, g_ref = jax.vmap(jax.grad(silu))(y), jax.vmap(jax.grad(jax.nn.silu))(y)
    assert np.all(np.isfinite(g_ours))
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-5, atol=1e-30)
    t_ours = jax.jvp(silu, (y,), (jnp.ones_like(y),))[1]
    np.testing.assert_allclose(t_ours, g_ref, rtol=1e-5, atol=1e-30)


# ---- convolution ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,k", [((2, 8, 8, 3), 3), ((2, 5, 7, 4), 3), ((2, 6, 6, 4), 1), ((1, 8, 8, 2), 4)])
def test_conv2d_same_matches_lax_autodiff(shape, k):
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    x, w = jax.random.normal(ks[0], shape), jax.random.normal(ks[1], (k, k, shape[-1], 5))

    def ref(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    y_r, vjp_r = jax.vjp(ref, x, w)
    y_o, vjp_o = jax.vjp(cpu_kernels.conv2d_same, x, w)
    g = jax.random.normal(ks[2], y_r.shape)
    np.testing.assert_allclose(y_o, y_r, rtol=1e-5, atol=1e-5)
    for a, b in zip(vjp_o(g), vjp_r(g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_cpu_conv_gradients_canonical_inside_scan():
    """Every convolution of a scanned train-like step on the CPU path is in XLA:CPU's canonical (fast) form."""
    x = jnp.ones((2, 8, 8, 3))
    m = ops.Conv(4, 3, kernels="cpu")
    p = m.init(jax.random.PRNGKey(0), x)

    def body(carry, _):  # gradients w.r.t. both the weights and the input (as for a conv inside a network)
        g = jax.grad(lambda c: jnp.sum(jax.nn.silu(m.apply(c[0], c[1], train=True)) ** 2))(carry)
        return jax.tree.map(lambda a, b: a - 1e-3 * b, carry, g), None

    hlo = jax.jit(lambda c: jax.lax.scan(body, c, None, length=2)[0]).lower((p, x)).compile().as_text()
    labels = re.findall(r"convolution\(.*?dim_labels=(\S+?),", hlo)
    assert len(labels) >= 3, labels  # forward, input gradient, weight gradient
    assert set(labels) == {"b01f_01io->b01f"}, labels


def test_conv2d_same_bad_input():
    with pytest.raises(ValueError, match=r"same Cin; got x \(2, 8, 8, 3\), w \(3, 3, 4, 5\)"):
        cpu_kernels.conv2d_same(jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 4, 5)))
    with pytest.raises(ValueError, match="x must be"):
        cpu_kernels.conv2d_same(jnp.ones((8, 8, 3)), jnp.ones((3, 3, 3, 5)))
    with pytest.raises(ValueError, match="rank 4"):
        ops.Conv(4).init(KEY, jnp.ones((8, 8, 3)))
