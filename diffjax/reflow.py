"""Reflow (Liu et al. 2022, "Flow Straight and Fast"): couplings of a trained ODE, straightness, one-step distillation.

A trained flow (or diffusion) model's probability-flow ODE maps noise z to a sample x; the pairs (z, x) are a
*coupling* of noise and data. The k+1-rectified flow is a flow model trained by the flow-matching objective on
the linear interpolants x_t = (1 - t) x + t z of these pairs (``diffjax.losses`` objective "flow" with
``batch["noise"] = z``, Liu et al. eq. 1 with (X_0, X_1) = (z, x)); its trajectories are straighter, so few Euler
steps suffice (Liu et al. sec. 3). Liu et al.'s time runs from noise (t = 0) to data (t = 1); here, as on every
``diffjax`` schedule, t = 1 is the noise and t = 0 the data.

* ``generate_couplings``: solve the model's ODE from noise (any ``diffjax.sample`` method) and write the pairs in
  numbered ``.npz`` shards under a directory with a JSON manifest. Shard i's noise is drawn from
  ``fold_in(PRNGKey(seed), i)``, so the couplings do not depend on how many processes wrote them; process p of P
  writes shards i = p, p + P, ..., each solved in batches split over the process's own devices (no process waits
  for another), one shard in memory at a time. A shard is written to a temporary name and renamed, so a complete
  shard is never confused with a half-written one; a rerun skips complete shards (resumable).
* ``coupling_batches``: the shards streamed back as training batches ``{"x", "noise"(, "label")}``; global batch s
  is a pure function of (seed, s), so a resumed run reads what an uninterrupted one would, and process p reads its
  slice.
* ``straightness``: S(Z) = int_0^1 E||(Z_1 - Z_0) - dZ_t/dt||^2 dt of a model's ODE trajectories (Liu et al.
  sec. 2.2), on a fine Euler grid.
* ``make_distill_loss``: one-step distillation on the couplings (Liu et al. sec. 2.3): the network's one Euler
  step from the noise, x_hat = z - t v(z, t) at the sampler's first time t, regressed on x.
"""

from __future__ import annotations

import collections
import json
import os
import time
import zipfile
from typing import Callable, Iterator, NamedTuple, Optional

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.parameterization import as_denoiser, to_x0_eps
from diffjax.schedules import Schedule
from diffjax.sde import pf_ode_drift

__all__ = ["MANIFEST", "COUPLINGS_VERSION", "shard_path", "shard_noise", "coupling_settings", "missing_shards",
           "generate_couplings", "read_manifest", "coupling_batches", "Straightness", "straightness",
           "make_distill_loss"]

MANIFEST = "manifest.json"
COUPLINGS_VERSION = 1
_KEYS = ("z", "x")  # arrays of every shard; "label" too when the couplings are class-conditional


def shard_path(directory: str, i: int) -> str:
    """The file of shard ``i``."""
    return os.path.join(directory, f"shard_{i:05d}.npz")


def _num_shards(num_pairs: int, shard_size: int) -> int:
    return -(-num_pairs // shard_size)


def _shard_rows(num_pairs: int, shard_size: int, i: int) -> int:
    return min(shard_size, num_pairs - i * shard_size)


def shard_noise(schedule: Schedule, seed: int, i: int, n: int, shape, num_classes: Optional[int] = None):
    """Shard ``i``'s noise z ~ the schedule's prior (n, *shape) and, for a conditional model, its uniform labels:
    a function of (seed, i) only."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
    k_z, k_label = jax.random.split(key)
    z = np.asarray(schedule.prior_sample(k_z, (n, *shape), jnp.float32))
    labels = None
    if num_classes is not None:
        labels = np.asarray(jax.random.randint(k_label, (n,), 0, num_classes), np.int32)
    return z, labels


def coupling_settings(*, num_pairs: int, shard_size: int, shape, seed: int, method: str, num_steps: int,
                      num_classes: Optional[int] = None, t_start: Optional[float] = None,
                      sample_options: Optional[dict] = None) -> dict:
    """What defines a set of couplings (the manifest's fields a rerun must match), validated."""
    for name, v, low in (("num_pairs", num_pairs, 1), ("shard_size", shard_size, 1), ("seed", seed, 0),
                         ("num_steps", num_steps, 1)):
        if not (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= low):
            raise ValueError(f"{name} must be an integer >= {low}; got {v!r}")
    if num_classes is not None and not (isinstance(num_classes, (int, np.integer)) and num_classes >= 1):
        raise ValueError(f"num_classes must be None or an integer >= 1; got {num_classes!r}")
    return {"version": COUPLINGS_VERSION, "num_pairs": int(num_pairs), "shard_size": int(shard_size),
            "num_shards": _num_shards(num_pairs, shard_size), "shape": [int(s) for s in shape], "seed": int(seed),
            "num_classes": None if num_classes is None else int(num_classes),
            "sampler": {"method": method, "num_steps": int(num_steps),
                        "t_start": None if t_start is None else float(t_start),
                        "options": {k: v for k, v in sorted((sample_options or {}).items())}}}


def read_manifest(directory: str) -> Optional[dict]:
    """The couplings manifest of ``directory`` (None if there is none)."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _atomic_write(path: str, write: Callable) -> None:
    """``write(file)`` to a temporary name beside ``path``, then rename: readers see all of it or nothing."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_manifest(directory: str, settings: dict, metadata: Optional[dict]) -> None:
    """Write the manifest, or check that an existing one describes the same couplings."""
    old = read_manifest(directory)
    if old is None:
        payload = json.dumps({**settings, "metadata": metadata or {}}, indent=2, sort_keys=True).encode()
        _atomic_write(os.path.join(directory, MANIFEST), lambda f: f.write(payload))
        return
    diff = sorted(k for k in settings if old.get(k) != settings[k])
    if diff:
        raise ValueError(f"{directory} holds couplings with other settings ({', '.join(diff)}: "
                         f"{ {k: old.get(k) for k in diff} } vs {({k: settings[k] for k in diff})}); "
                         f"use another directory or delete it")


def _shard_complete(path: str, rows: int, shape, labelled: bool) -> bool:
    """Whether ``path`` is a whole shard of ``rows`` pairs (the zip's central directory is written last, so a
    truncated file fails to open); only the array headers are read."""
    if not os.path.exists(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            for key in _KEYS + (("label",) if labelled else ()):
                with zf.open(f"{key}.npy") as f:
                    version = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    got, _, _ = read(f)
                    want = (rows,) if key == "label" else (rows, *shape)
                    if tuple(got) != tuple(want):
                        return False
    except (zipfile.BadZipFile, KeyError, OSError, ValueError):
        return False
    return True


def missing_shards(directory: str, settings: dict) -> list[int]:
    """The shards of ``settings`` (``coupling_settings``) not yet complete in ``directory``."""
    labelled = settings["num_classes"] is not None
    rows = [_shard_rows(settings["num_pairs"], settings["shard_size"], i) for i in range(settings["num_shards"])]
    return [i for i, n in enumerate(rows)
            if not _shard_complete(shard_path(directory, i), n, settings["shape"], labelled)]


def _local_mesh():
    """A data-parallel mesh over this process's own devices (each process solves its own shards)."""
    from jax.sharding import AxisType, Mesh

    from diffjax.sharding import MESH_AXES

    devices = np.asarray(jax.local_devices()).reshape(-1, 1, 1)
    return Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _replicated_on(mesh, tree):
    """``tree``'s arrays as replicated copies on ``mesh`` (a teacher loaded on a multi-host mesh holds the whole of
    each replicated parameter in every process: its first addressable shard)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    def put(a):
        if not isinstance(a, jax.Array):
            return a
        return jax.device_put(a if a.is_fully_addressable else a.addressable_data(0), NamedSharding(mesh, P()))

    return jax.tree.map(put, tree)


def generate_couplings(model, schedule: Optional[Schedule], directory: str, *, num_pairs: int, shape,
                       shard_size: int = 1000, batch_size: Optional[int] = None, seed: int = 0, method: str = "heun",
                       num_steps: int = 50, prediction: Optional[str] = None, num_classes: Optional[int] = None,
                       t_start: Optional[float] = None, mesh=None, process_index: Optional[int] = None,
                       process_count: Optional[int] = None, metadata: Optional[dict] = None,
                       **sample_options) -> dict:
    """Write (z, x = ODE(z)) couplings of ``model`` under ``directory`` (module docstring); returns a summary.

    ``model``: a ``Denoiser`` or ``model_fn(x, t[, cond])`` with its ``prediction`` type, sampled by
    ``diffjax.sample(method, num_steps, t_start, t_end=0, **sample_options)`` from z ~ the schedule's prior at
    ``t_start`` (default ``schedule.t_max``). ``num_classes``: the model is class-conditional; each pair gets a
    uniform label. ``batch_size`` (default ``shard_size``): rows per solve, split over ``mesh`` (default: this
    process's devices; it must hold only them). ``process_index`` / ``process_count`` (default JAX's): this
    process writes shards i with i mod process_count == process_index; the model's arrays (replicated, as a
    ``load_run`` teacher's are) are copied onto ``mesh``. ``metadata``: recorded in the manifest
    (e.g. the teacher run). Returns the settings, the shards written and skipped, NFE per sample and seconds.
    """
    from diffjax.samplers import sample
    from diffjax.sharding import shard_batch, to_host

    settings = coupling_settings(num_pairs=num_pairs, shard_size=shard_size, shape=shape, seed=seed, method=method,
                                 num_steps=num_steps, num_classes=num_classes, t_start=t_start,
                                 sample_options=sample_options)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must lie in [0, process_count={process_count}); got {process_index}")
    batch_size = shard_size if batch_size is None else batch_size
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    mesh = _local_mesh() if mesh is None else mesh
    if any(d.process_index != jax.process_index() for d in mesh.devices.flat):
        raise ValueError("mesh must hold only this process's devices: each process solves its own shards")
    denoiser = _replicated_on(mesh, as_denoiser(model, schedule, prediction))
    os.makedirs(directory, exist_ok=True)
    _check_manifest(directory, settings, metadata)
    todo = [i for i in missing_shards(directory, settings) if i % process_count == process_index]
    mine = len(range(process_index, settings["num_shards"], process_count))
    t0, nfe = time.perf_counter(), 0
    for i in todo:
        n = _shard_rows(num_pairs, shard_size, i)
        z, labels = shard_noise(denoiser.schedule, seed, i, n, shape, num_classes)
        parts = []
        for lo in range(0, n, batch_size):
            rows = z[lo:lo + batch_size]
            pad = batch_size - len(rows)  # every solve has batch_size rows: one compilation
            zb, _ = shard_batch(np.concatenate([rows, np.zeros((pad, *rows.shape[1:]), rows.dtype)]), mesh)
            cond = None
            if labels is not None:
                cond, _ = shard_batch(np.concatenate([labels[lo:lo + batch_size], np.zeros(pad, np.int32)]), mesh)
            key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), i), 2), lo)
            x, nfe = sample(denoiser, None, zb, method=method, num_steps=num_steps, key=key, cond=cond,
                            t_start=t_start, t_end=0.0, return_nfe=True, **sample_options)
            parts.append(to_host(x)[:len(rows)])
        x = np.concatenate(parts).astype(np.float32)
        arrays = {"z": z, "x": x, **({"label": labels} if labels is not None else {})}
        _atomic_write(shard_path(directory, i), lambda f: np.savez(f, **arrays))
    return {**settings, "written": todo, "skipped": mine - len(todo), "nfe": nfe,
            "seconds": time.perf_counter() - t0}


class _Shards:
    """Shard files read on demand, the last ``cache`` kept in memory."""

    def __init__(self, directory: str, cache: int):
        self.directory, self.cache, self.loaded = directory, cache, collections.OrderedDict()

    def get(self, i: int) -> dict:
        if i not in self.loaded:
            with np.load(shard_path(self.directory, i)) as f:
                self.loaded[i] = {k: f[k] for k in f.files}
            while len(self.loaded) > self.cache:
                self.loaded.popitem(last=False)
        self.loaded.move_to_end(i)
        return self.loaded[i]


def _epoch_layout(num_pairs: int, shard_size: int, seed: int, epoch: int):
    """Epoch ``epoch``'s order: the shards in a permuted order, each shard's rows permuted (by (seed, epoch))."""
    n = _num_shards(num_pairs, shard_size)
    order = np.random.default_rng((seed, epoch, 0)).permutation(n)
    sizes = np.array([_shard_rows(num_pairs, shard_size, int(i)) for i in order])
    return order, np.concatenate([[0], np.cumsum(sizes)])


def coupling_batches(directory: str, *, global_batch_size: int, seed: int = 0, start_step: int = 0,
                     process_index: int = 0, process_count: int = 1, cache_shards: int = 4) -> Iterator[dict]:
    """This process's slices of global batches ``start_step``, ``start_step + 1``, ... of the couplings (infinite).

    Yields ``{"x": float32 (b, *shape), "noise": z, ("label": int32 (b,))}`` with b = global_batch_size /
    process_count. Global batch s is stream elements [sB, (s + 1)B); element i lies in epoch e = i // N (N pairs)
    at position i mod N of that epoch's order: the shards in a permutation drawn from (seed, e), the rows of each
    shard in a permutation drawn from (seed, e, shard). The pairs are i.i.d. draws of the coupling, so this
    shard-local shuffle mixes like a global one while only the shards a batch touches are read (at most
    ``cache_shards`` kept in memory). Needs every shard of the manifest.
    """
    settings = read_manifest(directory)
    if settings is None:
        raise FileNotFoundError(f"no couplings in {directory} (no {MANIFEST}); write them with generate_couplings")
    missing = missing_shards(directory, settings)
    if missing:
        raise ValueError(f"couplings in {directory} are incomplete: {len(missing)} of {settings['num_shards']} shards "
                         f"missing (first {missing[0]}); rerun generate_couplings (it resumes)")
    for name, v, low in (("global_batch_size", global_batch_size, 1), ("process_count", process_count, 1),
                         ("seed", seed, 0), ("start_step", start_step, 0)):
        if not (isinstance(v, (int, np.integer)) and v >= low):
            raise ValueError(f"{name} must be an integer >= {low}; got {v!r}")
    if global_batch_size % process_count or not 0 <= process_index < process_count:
        raise ValueError(f"global_batch_size ({global_batch_size}) must be a multiple of process_count "
                         f"({process_count}) and process_index ({process_index}) lie in [0, {process_count})")
    return _stream(directory, settings, global_batch_size, seed, start_step, process_index, process_count, cache_shards)


def _stream(directory, settings, global_batch_size, seed, start_step, process_index, process_count, cache_shards):
    num_pairs, shard_size = settings["num_pairs"], settings["shard_size"]
    local = global_batch_size // process_count
    shards = _Shards(directory, cache_shards)
    keys = _KEYS + (("label",) if settings["num_classes"] is not None else ())
    step = start_step
    while True:
        first = step * global_batch_size + process_index * local
        epoch, pos = np.divmod(np.arange(first, first + local), num_pairs)
        out = {k: [] for k in keys}
        for e in np.unique(epoch):  # a batch may straddle two epochs
            order, bounds = _epoch_layout(num_pairs, shard_size, seed, int(e))
            p = pos[epoch == e]
            slot = np.searchsorted(bounds, p, side="right") - 1
            for s in np.unique(slot):  # the shards this batch touches, in stream order
                shard = int(order[s])
                perm = np.random.default_rng((seed, int(e), 1, shard)).permutation(bounds[s + 1] - bounds[s])
                rows = perm[p[slot == s] - bounds[s]]
                data = shards.get(shard)
                for k in keys:
                    out[k].append(data[k][rows])
        batch = {k: np.concatenate(v) for k, v in out.items()}
        yield {"x": batch["x"], "noise": batch["z"], **({"label": batch["label"]} if "label" in batch else {})}
        step += 1


class Straightness(NamedTuple):
    """``value``: S(Z), the mean of ``per_example`` (squared Euclidean norms, summed over data dims); ``x``: the
    Euler endpoints; ``nfe``: model evaluations per sample."""

    value: jax.Array
    per_example: jax.Array
    x: jax.Array
    nfe: int


@eqx.filter_jit
def _euler_straightness(denoiser, z, ts, cond):
    def step(x, t_pair):
        t, t_next = t_pair
        v = pf_ode_drift(denoiser.schedule, denoiser(x, t, cond), x, t)  # dx/dt of the ODE
        return x + (t_next - t) * v, v

    x, vs = jax.lax.scan(step, z, (ts[:-1], ts[1:]))
    # in normalised time s = (t_start - t) / (t_start - t_end): dZ/ds = (t_end - t_start) v
    span = ts[-1] - ts[0]
    dev = (x - z)[None] - span * vs
    w = jnp.abs(jnp.diff(ts)) / jnp.abs(span)  # ds of each Euler interval
    per_example = jnp.einsum("k,kb->b", w, jnp.sum(dev.reshape(*dev.shape[:2], -1) ** 2, -1))
    return per_example, x


def straightness(model, schedule: Optional[Schedule], z, *, num_steps: int = 100, prediction: Optional[str] = None,
                 cond=None, t_start: Optional[float] = None, t_end: float = 0.0) -> Straightness:
    """S(Z) = int_0^1 E||(Z_1 - Z_0) - dZ_s/ds||^2 ds of the ODE trajectories from noise ``z`` (Liu et al. sec. 2.2),
    s = (t_start - t) / (t_start - t_end), on a uniform Euler grid of ``num_steps`` in t.

    Zero exactly when every trajectory is a straight line traversed at constant speed. ``model``: a ``Denoiser``
    or ``model_fn`` with its ``prediction`` (any schedule: the ODE's velocity is ``diffjax.sde.pf_ode_drift``);
    ``t_start`` defaults to ``schedule.t_max``, where ``diffjax.sample`` starts. Z_1 - Z_0 is the Euler path's own
    displacement, so S measures the path the grid traces.
    """
    denoiser = as_denoiser(model, schedule, prediction)
    if not (isinstance(num_steps, (int, np.integer)) and num_steps >= 1):
        raise ValueError(f"num_steps must be an integer >= 1; got {num_steps!r}")
    z = jnp.asarray(z)
    if z.ndim < 2:
        raise ValueError(f"z must have shape (batch, ...data dims); got {z.shape}")
    t0 = float(denoiser.schedule.t_max if t_start is None else t_start)
    if not 0.0 <= t_end < t0 <= 1.0:
        raise ValueError(f"need 0 <= t_end < t_start <= 1; got t_start={t0}, t_end={t_end}")
    ts = jnp.linspace(t0, t_end, num_steps + 1, dtype=z.dtype)
    per_example, x = _euler_straightness(denoiser, z, ts, cond)
    return Straightness(jnp.mean(per_example), per_example, x, num_steps)


def make_distill_loss(model_fn: Callable, schedule: Schedule, *, prediction: str = "flow",
                      t_start: Optional[float] = None, reduce: str = "mean"):
    """``loss_fn(params, batch, key)`` of one-step distillation on couplings (Liu et al. sec. 2.3):
    E||x - x_hat(z)||^2, x_hat the network's x_0 estimate at (z, t_start), i.e. its one Euler step to t = 0
    (x_hat = z - t v for a flow model on ``RectifiedFlow``), which ``diffjax.sample`` with ``num_steps=1`` returns.

    ``batch``: ``{"x": x, "noise": z(, "label")}``; ``model_fn(params, x, t, cond)``; ``t_start`` defaults to
    ``schedule.t_max`` (where the sampler starts); ``reduce``: mean or sum over data dims. ``key`` is unused.
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum'; got {reduce!r}")
    t0 = float(schedule.t_max if t_start is None else t_start)
    if not 0.0 < t0 <= 1.0:
        raise ValueError(f"t_start must lie in (0, 1]; got {t0}")

    def loss_fn(params, batch, key):
        if not isinstance(batch, dict) or "x" not in batch or "noise" not in batch:
            raise ValueError("batch must be a dict with 'x' (samples) and 'noise' (their z): couplings")
        x, z = batch["x"], batch["noise"]
        chex.assert_equal_shape([x, z])
        t = jnp.full((x.shape[0],), t0, x.dtype)
        x_hat = to_x0_eps(model_fn(params, z, t, batch.get("label")), prediction, z, t, schedule).x0
        err = ((x_hat - x) ** 2).reshape(x.shape[0], -1)
        per_example = jnp.mean(err, -1) if reduce == "mean" else jnp.sum(err, -1)
        return jnp.mean(per_example), {"loss_per_example": per_example, "t": t}

    return loss_fn
