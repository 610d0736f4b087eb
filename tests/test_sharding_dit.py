"""The mesh rule set for transformers (``diffjax.sharding``): DiT's Megatron specs, the U-Net's unchanged, and a
sharded DiT train step on 8 simulated devices equal to the 1-device step."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from diffjax.config import base
from diffjax.models import DiT, MLP
from diffjax.models.ops import QKVAttention
from diffjax.sharding import MESH_AXES, TRANSFORMER_RULES, leaf_spec, path_name
from diffjax.training.builders import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH_222 = AbstractMesh((2, 2, 2), MESH_AXES)  # leaf_spec reads only the axis sizes
MESH_F8 = AbstractMesh((1, 8, 1), MESH_AXES)


def abstract_params(module, x_shape, labels: bool = False):
    """The module's parameters as ShapeDtypeStructs (nothing allocated)."""
    args = (jnp.zeros(x_shape), jnp.zeros(x_shape[:1])) + ((jnp.zeros(x_shape[:1], jnp.int32),) if labels else ())
    return jax.eval_shape(lambda k: module.init(k, *args), jax.random.PRNGKey(0))


def specs(tree, mesh, min_size, rules=TRANSFORMER_RULES):
    """{path name: spec} of every leaf by the rule set."""
    return {path_name(p): leaf_spec(x.shape, mesh, min_size, path_name(p), rules)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def dit_params():
    return abstract_params(DiT(patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=10, out_channels=2,
                               freq_dim=32), (1, 8, 8, 1), labels=True)


def test_qkv_split_layout_is_the_fused_kernel_reshaped():
    """layout="split": kernel (C, 3, C) = the fused (C, 3 C) kernel reshaped at init, same attention on both paths."""
    h = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 16))
    for kernels in ("xla", "cpu"):
        fused, split = QKVAttention(4, kernels=kernels), QKVAttention(4, kernels=kernels, layout="split")
        pf, ps = fused.init(jax.random.PRNGKey(0), h), split.init(jax.random.PRNGKey(0), h)
        assert ps["params"]["kernel"].shape == (16, 3, 16) and ps["params"]["bias"].shape == (3, 16)
        np.testing.assert_array_equal(ps["params"]["kernel"], pf["params"]["kernel"].reshape(16, 3, 16))
        np.testing.assert_allclose(split.apply(ps, h), fused.apply(pf, h), atol=2e-6)
    with pytest.raises(ValueError, match="layout"):
        QKVAttention(4, layout="heads").init(jax.random.PRNGKey(0), h)


def test_dit_kernels_get_megatron_specs(dit_params):
    """qkv / fc1 column-parallel (whole heads over model), proj / fc2 / adaLN row-parallel, FSDP on the other axis."""
    assert dit_params["params"]["block0"]["qkv"]["kernel"].shape == (32, 3, 32), \
        "DiT must build its attention with ops.QKVAttention(..., layout='split') (head-major, whole heads per shard)"
    s = specs(dit_params, MESH_222, min_size=1)
    b = "params/block1/"
    assert s[b + "qkv/kernel"] == P("fsdp", None, "model") and s[b + "qkv/bias"] == P(None, "model")
    assert s[b + "fc1/kernel"] == P("fsdp", "model") and s[b + "fc1/bias"] == P("model")
    for name in ("proj", "fc2"):
        assert s[b + f"{name}/kernel"] == P("model", "fsdp") and s[b + f"{name}/bias"] == P(None)
    for prefix in (b, "params/final_layer/"):
        assert s[prefix + "adaLN_modulation/kernel"] == P(("model", "fsdp"), None)
    assert s["params/patch_embed/kernel"] == P(None, None, None, "fsdp")
    assert s["params/final_layer/linear/kernel"] == P("fsdp", None)
    # fsdp only: the same axes without model; below min_size only the model splits remain
    s8 = specs(dit_params, MESH_F8, min_size=1)
    assert s8[b + "qkv/kernel"] == P("fsdp", None, None) and s8[b + "proj/kernel"] == P(None, "fsdp")
    assert s8[b + "adaLN_modulation/kernel"] == P("fsdp", None)
    big = specs(dit_params, MESH_222, min_size=2**14)
    assert big[b + "fc1/kernel"] == P(None, "model") and big[b + "adaLN_modulation/kernel"] == P("model", None)
    # a fused (C, 3 C) qkv kernel in a block is not split over model (a contiguous split cuts across q / k / v)
    assert leaf_spec((32, 96), MESH_222, 1, b + "qkv/kernel") == P("fsdp", None)


def test_dit_state_leaves_share_specs_and_other_models_keep_the_shape_rule(dit_params):
    """Params, EMA and Adam moments of one tensor get one spec; the U-Net and MLP get exactly the shape rule."""
    import optax

    from diffjax.training.state import TrainState

    state = jax.eval_shape(lambda p, k: TrainState.create(p, optax.adamw(1e-3), k), dit_params, jax.random.PRNGKey(0))
    by_name = {}
    for p, x in jax.tree_util.tree_leaves_with_path(state):
        name = path_name(p)
        by_name.setdefault(name, set()).add(leaf_spec(x.shape, MESH_222, 1, name))
    tensors = [n for n in by_name if n.startswith("params/")]
    assert len(tensors) == len(jax.tree.leaves(dit_params)) and all(len(by_name[n]) == 1 for n in tensors)
    assert sum(1 for p, _ in jax.tree_util.tree_leaves_with_path(state)
               if path_name(p) == "params/block0/fc1/kernel") == 4  # params, mu, nu, EMA

    unet = abstract_params(build_model(base()), (1, 8, 8, 1))
    mlp = abstract_params(MLP(), (1, 2))
    for tree in (unet, mlp):
        for mesh in (MESH_222, MESH_F8):
            for min_size in (1, 2**14):
                assert specs(tree, mesh, min_size) == specs(tree, mesh, min_size, rules=())
    s = specs(unet, MESH_222, 1)
    qkv = [n for n in s if n.endswith("qkv/kernel")]
    assert qkv and all(s[n] == P("fsdp", "model") for n in qkv)  # the U-Net's fused qkv: the shape rule, as before
    assert s["params/mid_res0/conv0/kernel"] == P(None, None, "fsdp", "model")


SCRIPT = """
import re
import jax, numpy as np
from diffjax.config import load
from diffjax.sharding import global_batch, path_name
from diffjax.training.loop import _train_step_for, setup

c = load("experiments/configs/digits_dit.py")
c.model.update(hidden_size=32, depth=1, num_heads=4, freq_dim=32, num_classes=10, dropout=0.1)
c.diffusion.learned_variance = True
c.training.update(batch_size=16, steps_per_call=1, fsdp_min_size=256)
rng = np.random.default_rng(0)
batches = [{"x": rng.standard_normal((16, 8, 8, 1)).astype(np.float32),
            "label": rng.integers(0, 10, (16,)).astype(np.int32)} for _ in range(2)]
out = {}
for name, (n, mesh) in MESHES.items():
    c.training.num_devices = n
    c.training.mesh.update({"data": 1, "fsdp": 1, "model": 1, **mesh})
    run = setup(c)
    by_name = {}
    for p, sh in jax.tree_util.tree_leaves_with_path(run.shardings):
        by_name.setdefault(path_name(p), set()).add(sh.spec)
    assert all(len(v) == 1 for k, v in by_name.items() if k.startswith("params/")), "params/EMA/moments differ"
    print(name, "qkv", by_name["params/block0/qkv/kernel"], "fc2", by_name["params/block0/fc2/kernel"])
    step = _train_step_for(run).lower(run.state, global_batch(batches[0], run.mesh)).compile()
    # no resharding of token activations (B/shards, T, ...) inside a block: a moved tensor inside a block may
    # hold at most the per-example modulation vectors (B/shards x 6 D elements)
    per_example = 16 // (mesh.get("data", 1) * mesh.get("fsdp", 1)) * 6 * 32
    for line in step.as_text().splitlines():
        if re.search(r"= .*(all-to-all|collective-permute)(-start)?\\(", line) and re.search(r"/block\\d+/", line):
            sizes = [np.prod([int(d) for d in dims.split(",") if d]) for dims in re.findall(r"f32\\[([\\d,]*)\\]", line.split(")")[0])]
            assert max(sizes) <= per_example, ("token activations resharded inside a block", line[:300])
    state, losses = run.state, []
    for batch in batches:
        state, metrics = step(state, global_batch(batch, run.mesh))
        losses.append(float(metrics["loss"][0]))
    out[name] = (np.asarray(losses), jax.tree.map(np.asarray, jax.device_get(state.params)))
ref_loss, ref = out["1 device"]
for name in list(MESHES)[1:]:
    loss, params = out[name]
    err = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(params)))
    print(name, "loss", loss, "vs", ref_loss, "max |param diff|", err)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert err < 1e-5, (name, err)
print("OK")
"""


def run_sharded(meshes: dict):
    script = textwrap.dedent(SCRIPT).replace("MESHES", repr(meshes))
    # LLVM optimisation off compiles faster; the HLO passes (SPMD partitioning, its collectives) still run
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr[-3000:]
    return res.stdout


def test_sharded_dit_step_equals_one_device():
    """Two DiT train steps (loss, Adam, clipping, EMA, dropout, labels) on data 2 x fsdp 2 x model 2 equal 1 device."""
    out = run_sharded({"1 device": (1, {}), "data 2 x fsdp 2 x model 2": (8, {"data": 2, "fsdp": 2, "model": 2})})
    assert "'model'" in out and "'fsdp'" in out  # the kernels really were split


@pytest.mark.slow
def test_sharded_dit_step_equals_one_device_fsdp8():
    """The same under fsdp 8."""
    out = run_sharded({"1 device": (1, {}), "fsdp 8": (8, {"data": 1, "fsdp": 8})})
    assert "'fsdp'" in out
