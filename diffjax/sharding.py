"""Device meshes and the one rule set that lays arrays out on them (``jax.sharding``).

The mesh has three named axes, any of which may have size 1:

* ``data``  -- pure data parallelism: the batch is split, parameters are replicated;
* ``fsdp``  -- the batch is split *and* every large parameter (with its optimizer moments and EMA)
  is sharded along one axis (ZeRO-3 / FSDP); XLA all-gathers a parameter where it is used and
  reduce-scatters its gradient;
* ``model`` -- tensor parallelism: weights are split over it and the batch is replicated across it.

The batch is always split over ``("data", "fsdp")``. Which leaf gets which ``PartitionSpec`` is
decided by ``leaf_spec`` from the leaf's parameter path and shape, where the path is the leaf's
dict keys only (``params/block3/fc1/kernel``): parameters, EMA copies, Adam moments and a teacher's
copy of one tensor share it, so they are laid out identically. The rule set:

1. **Path rules** (``TRANSFORMER_RULES``, Megatron-style tensor parallelism, Shoeybi et al. 2019
   sec. 3) for the blocks of a transformer named as ``diffjax.models.DiT`` names them
   (``block<i>/{adaLN_modulation, qkv, proj, fc1, fc2}``, ``patch_embed``, ``final_layer``):

   * ``qkv`` and ``fc1`` are column-parallel: their output features go over ``model``; ``qkv``
     in the head-major "split" layout of ``ops.QKVAttention`` (kernel (C, 3, C), bias (3, C)) is
     split on its last axis, so each shard holds whole heads of q, k and v (``model`` must divide
     the number of heads); the fused (C, 3 C) [q|k|v] layout is not split over ``model`` (a
     contiguous split would cut across q / k / v);
   * ``proj`` and ``fc2`` are row-parallel: their input features go over ``model``, so the
     attention and the MLP each end in one all-reduce over ``model`` of the (B, T, D) activations
     in the forward pass (and one at their inputs in the backward pass), and nothing else moves;
   * ``adaLN_modulation`` (of the blocks and of the final layer) is row-parallel too, its input
     features split over ``model`` and, within that, over ``fsdp``: its output (B, 6 D) is cut into
     shift / scale / gate vectors that every shard needs whole, and a split of the output features
     (over either axis) makes XLA gather the small conditioning c instead of the weight and then
     redistribute the output with an all-to-all;
   * ``patch_embed`` and ``final_layer/linear`` are not split over ``model`` (the tokens enter and
     leave the blocks whole);
   * ``fsdp`` takes the other weight axis (adaLN: the same one); ``model`` splits apply whatever
     the leaf's size (they cost no collective of their own), ``fsdp`` splits only from
     ``min_size`` elements. An array axis that its mesh axes do not divide is not split.

2. **The shape rule**, for every other leaf (the U-Net, the MLP, embeddings): leaves smaller
   than ``min_size`` stay replicated; ``model`` takes the last axis (output features); ``fsdp``
   the largest remaining axis it divides.

The same code runs on one CPU, on simulated devices
(``--xla_force_host_platform_device_count``) and on a multi-host pod, where each process holds
only its addressable shards; ``global_batch`` builds global arrays from per-process slices,
``shard_batch`` from data every process holds in full, and ``to_host`` brings a global array back.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["MESH_AXES", "BATCH_AXES", "TRANSFORMER_RULES", "make_mesh", "mesh_shape", "leaf_spec", "path_name",
           "tree_shardings",
           "batch_sharding", "global_batch", "shard_batch", "to_host", "batch_shards"]

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

_BLOCK = r"(?:^|/)block\d+/"
# (pattern searched in the leaf's path, mesh axis per array axis); the first rule whose pattern matches
# and whose length equals the leaf's rank decides (module docstring, rule 1).
TRANSFORMER_RULES = (
    (_BLOCK + r"qkv/kernel$", ("fsdp", None, "model")),  # (C, 3, C) head-major: column-parallel, whole heads
    (_BLOCK + r"qkv/bias$", (None, "model")),
    (_BLOCK + r"qkv/kernel$", ("fsdp", None)),  # fused (C, 3 C) [q|k|v]: no tensor parallelism
    (_BLOCK + r"qkv/bias$", (None,)),
    (_BLOCK + r"fc1/kernel$", ("fsdp", "model")),  # column-parallel
    (_BLOCK + r"fc1/bias$", ("model",)),
    (_BLOCK + r"(?:proj|fc2)/kernel$", ("model", "fsdp")),  # row-parallel
    (_BLOCK + r"(?:proj|fc2)/bias$", (None,)),
    (r"(?:^|/)(?:block\d+|final_layer)/adaLN_modulation/kernel$", (("model", "fsdp"), None)),  # row-parallel
    (r"(?:^|/)(?:block\d+|final_layer)/adaLN_modulation/bias$", (None,)),
    (r"(?:^|/)patch_embed/kernel$", (None, None, None, "fsdp")),  # (p, p, C, D)
    (r"(?:^|/)final_layer/linear/kernel$", ("fsdp", None)),
    (r"(?:^|/)(?:patch_embed|final_layer/linear)/bias$", (None,)),
)


def mesh_shape(shape: Optional[Mapping[str, int]], num_devices: int) -> dict:
    """Resolve ``{"data": -1, "fsdp": 2, ...}`` (at most one -1, missing axes 1) to sizes whose product is ``num_devices``."""
    shape = dict(shape or {"data": -1})
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh axes must be among {MESH_AXES}; got {unknown}")
    sizes = {a: shape.get(a, 1) for a in MESH_AXES}
    bad = {a: s for a, s in sizes.items() if not (isinstance(s, (int, np.integer)) and (s == -1 or s >= 1))}
    if bad:
        raise ValueError(f"mesh axis sizes must be positive integers or -1; got {bad}")
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"at most one mesh axis may be -1; got {fill}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(f"mesh {shape}: {num_devices} devices are not divisible by the fixed axes' product {known}")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh {sizes} has {math.prod(sizes.values())} devices; {num_devices} are in use")
    return sizes


def make_mesh(shape: Optional[Mapping[str, int]] = None, num_devices: Optional[int] = None) -> Mesh:
    """A ``(data, fsdp, model)`` mesh over all devices of all processes (or the first ``num_devices``).

    Devices are ordered process by process, so each process's devices hold a contiguous block of
    the batch (what ``jax.make_array_from_process_local_data`` expects); with all devices,
    ``jax.make_mesh`` picks the physical order (TPU/GPU topology).
    """
    devices = jax.devices()
    if num_devices is not None:
        if not 0 < num_devices <= len(devices):
            raise ValueError(f"num_devices must lie in [1, {len(devices)}]; got {num_devices}")
        devices = devices[:num_devices]
    sizes = mesh_shape(shape, len(devices))
    local = jax.local_device_count()
    if jax.process_count() > 1 and local % sizes["model"]:
        raise ValueError(f"the model axis ({sizes['model']}) must divide the devices of one process ({local})")
    dims = tuple(sizes[a] for a in MESH_AXES)
    auto = (AxisType.Auto,) * len(MESH_AXES)  # XLA's SPMD partitioner propagates shardings through the model
    if num_devices is None:
        return jax.make_mesh(dims, MESH_AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices).reshape(dims), MESH_AXES, axis_types=auto)


def path_name(path) -> str:
    """The dict keys of a ``jax.tree_util`` key path joined by "/" (``params/block0/qkv/kernel``).

    Attribute and sequence keys (``.params``, ``.opt_state[1][0].mu``) are left out, so a parameter,
    its EMA copy and its Adam moments have the same name.
    """
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _rule_spec(axes, shape, mesh: Mesh, min_size: int) -> P:
    """A path rule's mesh axes per array axis (None, a name or a tuple of names), keeping the names of size > 1
    ("fsdp" only from ``min_size`` elements); an array axis their product does not divide is not split."""
    big = math.prod(shape) >= min_size
    spec = []
    for names, n in zip(axes, shape):
        names = tuple(a for a in ((names,) if isinstance(names, str) else names or ())
                      if mesh.shape[a] > 1 and (a == "model" or big))
        split = bool(names) and n % math.prod(mesh.shape[a] for a in names) == 0
        spec.append((names[0] if len(names) == 1 else names) if split else None)
    return P(*spec)


def leaf_spec(shape, mesh: Mesh, min_size: int = 2**14, path: str = "",
              rules: Sequence = TRANSFORMER_RULES) -> P:
    """The rule set (module docstring): which axes of the leaf ``path`` of ``shape`` are split over ``model`` and ``fsdp``.

    The first of ``rules`` whose pattern is found in ``path`` and whose length is the leaf's rank
    decides; otherwise the shape rule: leaves smaller than ``min_size`` (biases, norms, scalars,
    PRNG keys) stay replicated, as sharding them saves no memory and costs a collective each;
    ``model`` takes the last axis (output features); ``fsdp`` the largest remaining axis it
    divides. Indivisible axes are not split.
    """
    shape = tuple(shape)
    for pattern, axes in rules:
        if len(axes) == len(shape) and re.search(pattern, path):
            return _rule_spec(axes, shape, mesh, min_size)
    spec = [None] * len(shape)
    if math.prod(shape) < min_size:
        return P(*spec)
    m, f = mesh.shape["model"], mesh.shape["fsdp"]
    if m > 1 and shape and shape[-1] % m == 0:
        spec[-1] = "model"
    if f > 1:
        for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
            if spec[axis] is None and shape[axis] % f == 0:
                spec[axis] = "fsdp"
                break
    return P(*spec)


def tree_shardings(tree, mesh: Mesh, min_size: int = 2**14, rules: Sequence = TRANSFORMER_RULES):
    """``NamedSharding`` for every leaf by ``leaf_spec`` of its path and shape (parameters, EMA, optimizer moments alike)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, leaf_spec(np.shape(x), mesh, min_size, path_name(path), rules)), tree)


def batch_sharding(mesh: Mesh, stacked: bool = False) -> NamedSharding:
    """Batch axis 0 (axis 1 for a stack of batches) split over ``("data", "fsdp")``."""
    return NamedSharding(mesh, P(None, BATCH_AXES) if stacked else P(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many pieces the batch is split into."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(local_batch, mesh: Mesh, stacked: bool = False):
    """The global batch from each process's own slice (processes in order; batch axis 0, or 1 if stacked)."""
    sharding = batch_sharding(mesh, stacked)
    per_process = batch_shards(mesh) // jax.process_count()

    def put(x):
        x = np.asarray(x)
        b = x.shape[1 if stacked else 0]
        if per_process == 0 or b % per_process:
            raise ValueError(f"the per-process batch ({b}) must be divisible by the batch shards of one process "
                             f"({batch_shards(mesh)} over {jax.process_count()} processes)")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, local_batch)


def shard_batch(x, mesh: Mesh):
    """Split a batch that every process holds in full over the mesh, zero-padded to a multiple of the shards.

    Returns ``(global_array, n)`` with ``n`` the number of real rows (the first ``n``).
    """
    x = np.asarray(x)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"shard_batch needs a batch of shape (n >= 1, ...); got shape {x.shape}")
    n = x.shape[0]
    pad = -n % batch_shards(mesh)
    if pad:
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    sharding = batch_sharding(mesh)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx]), n


def to_host(x) -> np.ndarray:
    """A (possibly multi-process) array as one host numpy array, identical on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
