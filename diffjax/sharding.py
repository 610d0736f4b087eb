"""Device meshes and the one rule set that lays arrays out on them (``jax.sharding``).

The mesh has three named axes, any of which may have size 1:

* ``data``  -- pure data parallelism: the batch is split, parameters are replicated;
* ``fsdp``  -- the batch is split *and* every large parameter (with its optimizer moments and EMA)
  is sharded along its largest divisible axis (ZeRO-3 / FSDP); XLA all-gathers a parameter where
  it is used and reduce-scatters its gradient;
* ``model`` -- tensor parallelism: the output-feature axis (the last axis of Dense/Conv kernels
  and of their biases) is split; the batch is replicated across it.

The batch is always split over ``("data", "fsdp")``. Which leaf gets which ``PartitionSpec`` is
decided by ``leaf_spec`` from the leaf's shape alone, so parameters, Adam moments and EMA copies
of one tensor are laid out identically. The same code runs on one CPU, on simulated devices
(``--xla_force_host_platform_device_count``) and on a multi-host pod, where each process holds
only its addressable shards; ``global_batch`` builds global arrays from per-process slices,
``shard_batch`` from data every process holds in full, and ``to_host`` brings a global array back.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["MESH_AXES", "BATCH_AXES", "make_mesh", "mesh_shape", "leaf_spec", "tree_shardings",
           "batch_sharding", "global_batch", "shard_batch", "to_host", "batch_shards"]

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")


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


def leaf_spec(shape, mesh: Mesh, min_size: int = 2**14) -> P:
    """The rule set: which axes of an array of ``shape`` are split over ``model`` and ``fsdp``.

    Leaves smaller than ``min_size`` (biases, norms, scalars, PRNG keys) stay replicated: sharding
    them saves no memory and costs a collective each. ``model`` takes the last axis (output
    features); ``fsdp`` the largest remaining axis it divides. Indivisible axes are not split.
    """
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


def tree_shardings(tree, mesh: Mesh, min_size: int = 2**14):
    """``NamedSharding`` for every leaf by ``leaf_spec`` (parameters, EMA and optimizer moments alike)."""
    return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(np.shape(x), mesh, min_size)), tree)


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
