"""DiT (Peebles & Xie 2023): adaLN-Zero identity at init, patchify, the null class, the paper's sizes and FLOPs.

The four paper models (DiT-S/2 ... XL/2 at 256x256, i.e. 32x32x4 latents, 1000 classes, learned
sigma) are only evaluated abstractly: ``jax.eval_shape`` of ``init`` for the parameter counts and
``jax.jit(apply).lower(...).cost_analysis()`` on ShapeDtypeStructs for the FLOPs; nothing of their
size is allocated.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.config import load
from diffjax.losses import make_loss
from diffjax.models import DIT_CONFIGS, MODELS, DiT, count_params, create_model, dit_fields, init_params, make_model_fn
from diffjax.models.dit import DiTBlock, patchify, sincos_pos_embed_2d, unpatchify
from diffjax.schedules import VPCosine
from diffjax.training.builders import validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_DIT = os.path.join(REPO, "experiments", "configs", "digits_dit.py")
TINY = dict(patch_size=2, hidden_size=32, depth=2, num_heads=2, freq_dim=32, kernels="xla")

# Peebles & Xie 2023, Table 4: parameters (millions) and forward Gflops at 256x256 (32x32x4 latents)
PAPER = {"S/2": (33, 6.06), "B/2": (130, 23.01), "L/2": (458, 80.71), "XL/2": (675, 118.64)}
# this implementation's exact counts (1001-row class table, out_channels 8); the position embedding is no parameter
EXACT_PARAMS = {"S/2": 32_865_056, "B/2": 130_315_808, "L/2": 457_840_672, "XL/2": 674_834_720}


def _perturbed(variables, scale=0.5, seed=1):
    """The variables plus Gaussian noise (numpy's): a stand-in for trained weights (adaLN-Zero makes the init
    output 0)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(a + scale * rng.standard_normal(a.shape), jnp.float32), variables)


def _shapes(module, x_shape, num_classes=None):
    """The variables of ``module`` for inputs of ``x_shape``, abstractly (``jax.eval_shape`` of ``init``)."""
    x, t = jnp.zeros(x_shape), jnp.zeros(x_shape[:1])
    y = None if num_classes is None else jnp.zeros(x_shape[:1], jnp.int32)
    return jax.eval_shape(lambda k: module.init(k, x, t, y), jax.random.key(0))


def _abstract(name, batch=1):
    """(module, abstract variables, abstract x, t, y) of a paper model at 256x256: nothing allocated."""
    module = DiT(**dit_fields(name), num_classes=1000, out_channels=8, kernels="xla")
    x = jax.ShapeDtypeStruct((batch, 32, 32, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32)
    variables = jax.eval_shape(lambda k, x, t, y: module.init(k, x, t, y), jax.random.key(0), x, t, y)
    return module, variables, x, t, y


# ---- adaLN-Zero: identity at init -----------------------------------------------------------------------------

def test_every_block_is_the_identity_at_init():
    """A DiT block with its init parameters returns its input exactly, whatever the conditioning c."""
    block = DiTBlock(num_heads=4, kernels="xla")
    kx, kc, kp = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (3, 16, 64))
    c = 3.0 * jax.random.normal(kc, (3, 64))
    variables = block.init(kp, x, c)
    apply = jax.jit(block.apply)
    np.testing.assert_array_equal(apply(variables, x, c), x)
    # the modulation is the only zero-initialised part: with it perturbed the block is no longer the identity
    mod = dict(variables["params"], adaLN_modulation=_perturbed(variables["params"]["adaLN_modulation"]))
    assert float(jnp.max(jnp.abs(apply({"params": mod}, x, c) - x))) > 1e-2


@pytest.mark.parametrize("num_classes, out_channels", [(None, None), (10, 2)])
def test_network_outputs_zeros_at_init_and_every_block_is_the_identity(num_classes, out_channels):
    """The whole network outputs exact zeros at init (zero final layer), each block returns its input
    (intermediates), and learned sigma doubles the output channels."""
    module = DiT(**TINY, num_classes=num_classes, out_channels=out_channels)
    variables = init_params(module, jax.random.PRNGKey(0), (2, 8, 8, 1), num_classes=num_classes)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
    t = jnp.array([0.1, 0.9])
    cond = None if num_classes is None else jnp.array([3, num_classes])
    out, inter = jax.jit(lambda v: module.apply(v, x, t, cond, capture_intermediates=lambda m, _: isinstance(
        m, DiTBlock), mutable=["intermediates"]))(variables)
    assert out.shape == (2, 8, 8, out_channels or 1) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)
    tokens = patchify(x, 2) @ variables["params"]["patch_embed"]["kernel"].reshape(4, 32)
    tokens = tokens + variables["params"]["patch_embed"]["bias"] + sincos_pos_embed_2d(32, 4, 4)
    for i in range(TINY["depth"]):
        np.testing.assert_allclose(inter["intermediates"][f"block{i}"]["__call__"][0], tokens, atol=1e-5)


# ---- patches and positions ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, p", [((2, 8, 8, 3), 2), ((1, 8, 12, 4), 4), ((2, 6, 6, 1), 1), ((1, 8, 8, 2), 8)])
def test_patchify_unpatchify_round_trip(shape, p):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    tokens = patchify(x, p)
    assert tokens.shape == (shape[0], (shape[1] // p) * (shape[2] // p), p * p * shape[3])
    np.testing.assert_array_equal(unpatchify(tokens, p, shape[1], shape[2]), x)
    # token j is the patch at row j // (W / p), column j % (W / p), flattened (row, column, channel)
    w = shape[2] // p
    j = tokens.shape[1] - 1
    r, c = divmod(j, w)
    np.testing.assert_array_equal(tokens[:, j], x[:, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(shape[0], -1))


def test_patch_embedding_is_a_linear_map_of_the_patches():
    """The stride-p convolution equals patchify followed by its kernel as a (p p C, D) matrix (token order agrees)."""
    module = DiT(**TINY)
    variables = init_params(module, jax.random.PRNGKey(0), (2, 8, 12, 3))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 12, 3))
    _, inter = jax.jit(lambda v: module.apply(v, x, jnp.zeros(2), mutable=["intermediates"],
                                              capture_intermediates=lambda m, _: m.name == "patch_embed"))(variables)
    conv = inter["intermediates"]["patch_embed"]["__call__"][0].reshape(2, 24, 32)
    pe = variables["params"]["patch_embed"]
    np.testing.assert_allclose(conv, patchify(x, 2) @ pe["kernel"].reshape(12, 32) + pe["bias"], atol=1e-5)


def test_position_embedding_is_fixed_2d_sincos():
    """MAE's 2-D sin-cos table: the first half of the features encodes the column, the second the row; not a
    parameter."""
    d, h, w = 16, 3, 5
    pe = sincos_pos_embed_2d(d, h, w)
    assert pe.shape == (h * w, d)
    omega = 1.0 / 10000 ** (np.arange(4) / 4)
    for j in range(h * w):
        r, c = divmod(j, w)
        want = np.concatenate([np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)])
        np.testing.assert_allclose(pe[j], want, rtol=1e-6, atol=1e-7)
    params = _shapes(DiT(**TINY), (1, 8, 8, 1))["params"]
    assert set(params) == {"time_embed", "patch_embed", "block0", "block1", "final_layer"}  # no position table


# ---- classes, the null class and condition dropout -------------------------------------------------------------

def test_class_conditioning_and_the_null_class():
    """At init the labels cannot matter (output 0); with trained-like weights they do, cond=None is the null class
    (label num_classes), and condition dropout with p = 1 in the loss is training on the null class."""
    module = DiT(**TINY, num_classes=10)
    variables = init_params(module, jax.random.PRNGKey(0), (4, 8, 8, 1), num_classes=10)
    assert variables["params"]["class_embed"]["table"]["embedding"].shape == (11, 32)  # 10 classes + null
    fn = jax.jit(make_model_fn(module))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
    t = jnp.full((4,), 0.5)
    labels, null = jnp.array([0, 1, 2, 3]), jnp.full((4,), 10)
    np.testing.assert_array_equal(fn(variables, x, t, labels), fn(variables, x, t, null))
    trained = _perturbed(variables)
    by_label = fn(trained, x, t, labels)
    assert float(jnp.min(jnp.abs(by_label - fn(trained, x, t, null)).max(axis=(1, 2, 3)))) > 1e-3
    x_same = jnp.broadcast_to(x[:1], x.shape)
    out = fn(trained, x_same, t, labels)  # one image, four labels: four different outputs
    assert float(jnp.min(jnp.abs(out[1:] - out[:1]).max(axis=(1, 2, 3)))) > 1e-3
    np.testing.assert_array_equal(fn(trained, x, t, None), fn(trained, x, t, null))

    model_fn = make_model_fn(module)
    batch, key = {"x": x, "label": labels}, jax.random.PRNGKey(2)
    dropped = make_loss(model_fn, VPCosine(), prediction="v", objective="v", cond_drop_prob=1.0, null_label=10)
    unconditional = make_loss(model_fn, VPCosine(), prediction="v", objective="v")
    np.testing.assert_array_equal(jax.jit(dropped)(trained, batch, key)[0],
                                  jax.jit(unconditional)(trained, {"x": x}, key)[0])
    with pytest.raises(ValueError, match="num_classes is None"):
        DiT(**TINY).init(jax.random.PRNGKey(0), x, t, labels)


def test_kernels_and_bfloat16_compute_agree():
    """The "cpu" kernel set (split-qkv attention) gives the "xla" numbers; the parameter tree does not depend on
    kernels or dtype; bfloat16 compute keeps float32 parameters and output, close to float32."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
    t = jnp.array([0.2, 0.7])
    ref_module = DiT(**TINY, num_classes=10)
    variables = _perturbed(init_params(ref_module, jax.random.PRNGKey(0), (2, 8, 8, 1), num_classes=10), 0.1, 1)
    cond = jnp.array([1, 10])
    ref = jax.jit(make_model_fn(ref_module))(variables, x, t, cond)
    cpu = jax.jit(make_model_fn(DiT(**{**TINY, "kernels": "cpu"}, num_classes=10)))(variables, x, t, cond)
    np.testing.assert_allclose(cpu, ref, rtol=1e-4, atol=1e-4)
    trees = [_shapes(DiT(**{**TINY, "kernels": k, "dtype": d}, num_classes=10), (2, 8, 8, 1), 10)
             for k in ("xla", "cpu") for d in (None, "bfloat16")]
    for tree in trees:  # one parameter tree (names, shapes, float32) for every kernel set and compute dtype
        assert jax.tree.structure(tree) == jax.tree.structure(trees[0])
        assert [(v.shape, v.dtype) for v in jax.tree.leaves(tree)] == [(v.shape, jnp.float32)
                                                                      for v in jax.tree.leaves(trees[0])]
    bf16_module = DiT(**TINY, num_classes=10, dtype="bfloat16")
    bf16 = jax.jit(make_model_fn(bf16_module))(variables, x, t, cond)
    assert bf16.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(bf16 - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))


# ---- fields ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, match", [
    (dict(hidden_size=30, num_heads=3), "hidden_size=30 must be divisible by 4"),
    (dict(hidden_size=32, num_heads=3), "hidden_size=32 must be divisible by num_heads=3"),
    (dict(patch_size=0), "patch_size"),
    (dict(depth=0), "depth"),
    (dict(mlp_ratio=0.0), "mlp_ratio"),
    (dict(dropout=1.0), "dropout"),
    (dict(out_channels=0), "out_channels"),
    (dict(kernels="gpu"), "kernels"),
    (dict(dtype="float16"), "dtype"),
    (dict(embedding="learned"), "embedding"),
])
def test_bad_fields_are_named(fields, match):
    with pytest.raises(ValueError, match=match):
        DiT(**{**TINY, **fields})


def test_bad_inputs_and_names_are_named():
    module = DiT(**{**TINY, "patch_size": 4})
    with pytest.raises(ValueError, match="not divisible by patch_size=4"):
        jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 6, 1)), jnp.zeros(1)))
    with pytest.raises(ValueError, match="rank 4"):
        jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 64)), jnp.zeros(1)))
    with pytest.raises(ValueError, match="unknown DiT size"):
        dit_fields("M/2")
    assert dit_fields("DiT-XL/2") == dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)
    assert len(DIT_CONFIGS) == 12 and {f["patch_size"] for f in DIT_CONFIGS.values()} == {2, 4, 8}
    assert MODELS["dit"] is DiT and isinstance(create_model("dit", **TINY), DiT)


# ---- the paper's sizes: parameters and FLOPs, abstractly ------------------------------------------------------

@pytest.mark.parametrize("name", list(PAPER))
def test_parameter_counts_match_the_paper(name):
    """Within 1% of Table 4 (33M / 130M / 458M / 675M). facebookresearch/DiT's ``model.parameters()`` count adds
    its frozen (T, D) ``pos_embed`` (an ``nn.Parameter`` with ``requires_grad=False``), here a constant."""
    _, variables, *_ = _abstract(name)
    n = count_params(variables)
    assert n == EXACT_PARAMS[name], n
    assert abs(n / 1e6 - PAPER[name][0]) < 0.01 * PAPER[name][0]


def _matmul_macs(name):
    """Multiply-accumulates of every matmul / convolution of a paper DiT at batch 1 (the paper's Gflops convention)."""
    f = dit_fields(name)
    p, d, depth = f["patch_size"], f["hidden_size"], f["depth"]
    t = (32 // p) ** 2
    block = 12 * d * d * t + 2 * t * t * d  # qkv 3 D^2 + proj D^2 + MLP 8 D^2 per token; q k^T and attn v
    head = p * p * 4 * d * t + d * p * p * 8 * t + 2 * d * d + 256 * d + d * d  # patches, final linear, adaLN, t-MLP
    return depth * (block + 6 * d * d) + head


@pytest.mark.parametrize("name", list(PAPER))
def test_forward_flops_match_the_paper(name):
    """XLA's cost analysis of the lowered forward at batch 1, halved, is within 1% of Table 4's Gflops.

    The paper counts a multiply-add as one FLOP (fvcore); XLA counts 2 per multiply-add of a dot / convolution plus
    one per elementwise op (LayerNorm, GELU, softmax, residual sums), so XLA / 2 is the paper's count plus half
    the elementwise work: +0.7% (S/2) down to +0.25% (XL/2). The matmul-only count is within 0.1% of the table
    (the rest: the table's rounding and fvcore's LayerNorm count).
    """
    module, variables, x, t, y = _abstract(name)
    cost = jax.jit(module.apply).lower(variables, x, t, y).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gflops = cost["flops"] / 2 / 1e9
    paper = PAPER[name][1]
    assert paper <= gflops < 1.01 * paper, (name, gflops)
    assert abs(_matmul_macs(name) / 1e9 - paper) < 1e-3 * paper  # the table's 2 decimals: 6.06 is 6.055..6.065
    assert 2 * _matmul_macs(name) <= cost["flops"]


# ---- training through diffjax.training ------------------------------------------------------------------------

def test_digits_dit_config_validates_and_is_about_a_million_parameters():
    c = load(DIGITS_DIT)
    validate_config(c, num_devices=1)
    assert c.model.name == "dit"
    module = create_model("dit", **{k: v for k, v in c.model.to_dict().items() if k != "name"})
    n = count_params(_shapes(module, (1, 8, 8, 1)))
    assert n == 1_057_444


def _tiny_digits_dit():
    c = load(DIGITS_DIT)
    c.model.update(hidden_size=32, depth=2, num_heads=2, freq_dim=32, num_classes=10)
    c.diffusion.cond_drop_prob = 0.1
    c.training.update(batch_size=16, steps_per_call=1, num_steps=3, log_every=1, checkpoint_every=3)
    return c


def test_tiny_dit_trains_on_digits(tmp_path):
    """A small class-conditional DiT (dropout on) trains a few steps through the main loop."""
    from diffjax.training.loop import train

    run, summary = train(_tiny_digits_dit(), str(tmp_path), progress=False)
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
    assert isinstance(run.module, DiT) and run.module.num_classes == 10


@pytest.mark.slow
def test_tiny_dit_trains_and_samples_on_digits(tmp_path):
    """The same run samples with labels (the null class among them) through ``diffjax.sample``."""
    from diffjax.training.loop import generate, train

    run, _ = train(_tiny_digits_dit(), str(tmp_path), progress=False)
    x, nfe = generate(run, method="ddim", num_steps=2, num_samples=4, key=jax.random.PRNGKey(0),
                      cond=jnp.array([0, 1, 2, 10]))
    assert x.shape == (4, 8, 8, 1) and np.all(np.isfinite(x)) and nfe >= 2
