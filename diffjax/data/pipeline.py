"""Training and evaluation batches: every batch a pure function of (seed, step, process).

Image sets (TFDS, read by random access through ``tfds`` data sources, no TensorFlow). The
training stream is infinite and has no iterator state; its element i is

    element i = augment(train[perm_e(i mod N)], U_i),   epoch e = i // N,

where ``perm_e`` is a permutation of [0, N) drawn afresh for every epoch from ``(shuffle_seed, e)``
(NumPy's ``Generator.permutation``), so stream elements [eN, (e+1)N) are exactly epoch e in a
fresh order, and ``U_i`` are element i's uniforms: counter-based Philox4x64 keyed by ``aug_seed``,
the ``m`` consecutive counter blocks from ``i * m`` on (``m`` blocks hold one uniform per pixel for
the dequantization noise plus one for the optional horizontal flip). Being counter-based, the
uniforms of a whole slice of the stream come from one vectorised draw. ``shuffle_seed`` and
``aug_seed`` are hashed from ``seed`` (``np.random.SeedSequence``).

Global batch s is stream elements [sB, (s+1)B); process p of P computes the contiguous slice
[sB + pb, sB + (p+1)b), b = B / P, as one vectorised gather + augment. Hence P processes together
see the single-process batch (noise and flips included: they are keyed by stream position, not by
process), resuming at ``start_step=k`` reproduces an uninterrupted run bitwise, and batches
straddle epoch boundaries when B does not divide N (no example is dropped). A split whose decoded
pixels fit in ``IN_MEMORY_BYTES`` is read once into memory (digits, mnist, cifar10); larger ones
are read per batch from the data source. grain (``MapDataset.range(...).map``) computes the next
batches ahead in a few threads.

Pixels u in {0..2^n - 1} map to [-1, 1] by uniform dequantization, x = -1 + 2 (u + U) / 2^n with
U ~ U[0, 1) (``diffjax.likelihood.dequantize``'s convention and range, drawn here in NumPy on the
host), or, with ``dequantize=False``, onto the bin centres x = -1 + 2 u / (2^n - 1) that
``diffjax.likelihood.ddpm_vlb``'s discretized decoder expects.

Toy sets are sampled afresh for every step from ``fold_in(PRNGKey(seed), step)``: the global
batch is drawn whole and process p keeps its slice, so the same guarantees hold.
"""

from __future__ import annotations

import functools
import sys
from typing import Iterator, Optional

import jax
import numpy as np

from diffjax.data import images, toy
from diffjax.data.spec import DatasetSpec, to_data_range

SPECS: dict[str, DatasetSpec] = {
    **{name: entry.spec for name, entry in images.IMAGE_DATASETS.items()},
    **toy.TOY_SPECS,
}


def get_spec(name: str) -> DatasetSpec:
    """The spec (shape, num_classes, num_bits, kind) of data set ``name``."""
    if name not in SPECS:
        raise ValueError(f"unknown data set {name!r}; known data sets: {', '.join(sorted(SPECS))}")
    return SPECS[name]


def augment(images: np.ndarray, u: np.ndarray, *, num_bits: int, dequantize: bool, random_flip: bool) -> np.ndarray:
    """Stream elements from their pixels and uniforms: float32 x in [-1, 1].

    ``images``: uint8 (b, H, W, C) (or any (b, *shape) without flips); ``u``: (b, prod(shape) + 1)
    uniforms, the noise for each pixel then the flip's. The flip (p = 1/2, horizontal) comes first,
    then the map to [-1, 1]: dequantized, or onto the bin centres.
    """
    pixels = int(np.prod(images.shape[1:]))
    if u.shape != (len(images), pixels + 1):
        raise ValueError(f"u must have shape (batch, pixels + 1) = {(len(images), pixels + 1)} for images of "
                         f"shape {images.shape}; got {u.shape}")
    if random_flip and images.ndim != 4:
        raise ValueError(f"random_flip needs images of shape (b, H, W, C); got {images.shape}")
    x = images.astype(np.float32)
    if random_flip:
        flip = u[:, pixels] < 0.5
        x[flip] = x[flip][:, :, ::-1]
    noise = u[:, :pixels].reshape(x.shape) if dequantize else None
    return np.asarray(to_data_range(x, num_bits, noise), np.float32)


def _stream_seeds(seed: int) -> tuple[int, int]:
    """(shuffle_seed, aug_seed): two uint32 seeds hashed from ``seed``."""
    shuffle_seed, aug_seed = np.random.SeedSequence(seed).generate_state(2)
    return int(shuffle_seed), int(aug_seed)


def _check_train_args(global_batch_size, seed, start_step, process_index, process_count):
    if not (isinstance(process_count, (int, np.integer)) and process_count >= 1):
        raise ValueError(f"process_count must be a positive integer; got {process_count!r}")
    if not (isinstance(global_batch_size, (int, np.integer)) and global_batch_size > 0
            and global_batch_size % process_count == 0):
        raise ValueError(f"global_batch_size must be a positive multiple of process_count="
                         f"{process_count}; got global_batch_size={global_batch_size!r}")
    if not (isinstance(process_index, (int, np.integer)) and 0 <= process_index < process_count):
        raise ValueError(f"process_index must be in [0, {process_count}); got {process_index!r}")
    for arg, value in (("seed", seed), ("start_step", start_step)):
        if not (isinstance(value, (int, np.integer)) and value >= 0):
            raise ValueError(f"{arg} must be a non-negative integer; got {value!r}")


def train_batches(
    name: str,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    dequantize: bool = True,
    random_flip: bool = False,
    data_dir: Optional[str] = None,
    num_threads: int = 4,
) -> Iterator[dict]:
    """This process's slice of global batches start_step, start_step + 1, ... (infinite).

    Yields ``{"x": float32 (global_batch_size // process_count, *shape), "label": int32 (b,)}``;
    image x lies in [-1, 1]. Unlabelled sets (``celeb_a``, ``checkerboard``) give zero labels.
    ``dequantize`` and ``random_flip`` apply to images only (toy data is continuous; asking to
    flip it is an error). ``num_threads``: grain threads prefetching image batches.
    Batch s is a pure function of (name, seed, s, process_index); see the module docstring.
    """
    spec = get_spec(name)
    _check_train_args(global_batch_size, seed, start_step, process_index, process_count)
    local = global_batch_size // process_count
    if spec.kind == "toy":
        if random_flip:
            raise ValueError(f"random_flip applies to images; {name!r} is a toy data set")
        return _toy_train_batches(name, global_batch_size, local, seed, start_step, process_index)
    shuffle_seed, aug_seed = _stream_seeds(seed)
    stream = _TrainStream(_Examples(images.IMAGE_DATASETS[name], images.open_split(name, "train", data_dir)),
                          shuffle_seed, aug_seed, dequantize=dequantize, random_flip=random_flip)
    import grain  # noqa: PLC0415

    # global batch s, this process's slice: stream elements from s B + p b on
    batches = grain.MapDataset.range(start_step, sys.maxsize).map(
        lambda s: stream.batch(s * global_batch_size + process_index * local, local))
    return _prefetch(batches, num_threads)


# a split is held in memory when its decoded pixels take at most this many bytes (per process)
IN_MEMORY_BYTES = 2 << 30


class _Examples:
    """The decoded examples of a split, gathered by index arrays: from memory when the split fits."""

    def __init__(self, entry, source):
        self.entry, self.source, self.n = entry, source, len(source)
        self.images = self.labels = None
        if self.n * int(np.prod(entry.spec.shape)) <= IN_MEMORY_BYTES:
            self.images, self.labels = self._read(np.arange(self.n))

    def _read(self, index: np.ndarray):
        decoded = [images.decode(self.entry, ex) for ex in self.source.__getitems__(index.tolist())]
        return np.stack([d["image"] for d in decoded]), np.asarray([d["label"] for d in decoded], np.int32)

    def take(self, index: np.ndarray):
        """(uint8 images (b, *shape), int32 labels (b,)) of examples ``index``."""
        if self.images is None:
            return self._read(index)
        return self.images[index], self.labels[index]


@functools.lru_cache(maxsize=8)
def _epoch_order(n: int, shuffle_seed: int, epoch: int) -> np.ndarray:
    """perm_e: the order of epoch ``epoch`` (read-only; shared between the reading threads)."""
    order = np.random.default_rng((shuffle_seed, epoch)).permutation(n)
    order.flags.writeable = False
    return order


def stream_uniforms(seed: int, first: int, count: int, per_element: int) -> np.ndarray:
    """U_i for stream elements first..first+count-1: float32 (count, per_element) in [0, 1).

    Element i owns Philox4x64 counter blocks [i m, (i + 1) m), m = ceil(per_element / 4) (4 words
    per block), so any slice is one contiguous draw; each word's top 24 bits give one uniform (exact
    in float32).
    """
    m = -(-per_element // 4)
    words = np.random.Philox(key=seed, counter=first * m).random_raw(count * m * 4)
    return ((words >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)).reshape(count, 4 * m)[:, :per_element]


class _TrainStream:
    """Stream elements as vectorised slices: ``batch(first, size)`` is elements [first, first + size)."""

    def __init__(self, examples: _Examples, shuffle_seed: int, aug_seed: int, *, dequantize: bool,
                 random_flip: bool):
        self.examples, self.shuffle_seed, self.aug_seed = examples, shuffle_seed, aug_seed
        self.dequantize, self.random_flip = dequantize, random_flip
        self.spec = examples.entry.spec

    def batch(self, first: int, size: int) -> dict:
        n = self.examples.n
        epoch, pos = np.divmod(np.arange(first, first + size), n)
        index = np.empty(size, np.int64)
        for e in np.unique(epoch):
            here = epoch == e
            index[here] = _epoch_order(n, self.shuffle_seed, int(e))[pos[here]]
        image, label = self.examples.take(index)
        u = stream_uniforms(self.aug_seed, first, size, int(np.prod(self.spec.shape)) + 1)
        x = augment(image, u, num_bits=self.spec.num_bits, dequantize=self.dequantize,
                    random_flip=self.random_flip)
        return {"x": x, "label": label}


def _decoded(entry, source):
    """The grain MapDataset of decoded examples {"image": uint8, "label": int32} of a source."""
    import grain  # noqa: PLC0415

    return grain.MapDataset.source(source).map(functools.partial(images.decode, entry))


def _prefetch(dataset, num_threads: int) -> Iterator[dict]:
    """Iterate a grain MapDataset in order, reading ahead with ``num_threads`` threads."""
    import grain  # noqa: PLC0415

    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2 * num_threads, 1))
    return iter(dataset.to_iter_dataset(options))


def toy_train_batch(name: str, global_batch_size: int, seed: int, step: int):
    """Global toy batch ``step``: ``global_batch_size`` samples from fold_in(PRNGKey(seed), step)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    return toy.sample_toy(name, key, global_batch_size)


def _toy_train_batches(name, global_batch_size, local, seed, start_step, process_index):
    for step in range(start_step, sys.maxsize):
        x, labels = toy_train_batch(name, global_batch_size, seed, step)
        lo = process_index * local
        yield {"x": x[lo:lo + local], "label": labels[lo:lo + local]}


def eval_batches(
    name: str,
    *,
    split: str = "test",
    batch_size: int,
    num_examples: Optional[int] = None,
    data_dir: Optional[str] = None,
) -> Iterator[dict]:
    """The first ``num_examples`` (default all) of ``split`` in order, in batches (last one smaller).

    Images: ``{"x": uint8 (b, *shape) in 0..2^n - 1, "label": int32 (b,)}``, for
    ``evaluate_nll(..., discrete=True, num_bits=8)``. Toy sets: each split is a fixed sample of
    ``toy.TOY_EVAL_SIZE`` examples (key from the split's name, never a training key), ``x``
    float32, for ``discrete=False``. Feed ``(b["x"] for b in eval_batches(...))``.
    """
    spec = get_spec(name)
    if not (isinstance(batch_size, (int, np.integer)) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    if num_examples is not None and not (isinstance(num_examples, (int, np.integer)) and num_examples > 0):
        raise ValueError(f"num_examples must be a positive integer or None; got {num_examples!r}")
    if spec.kind == "toy":
        return _toy_eval_batches(name, split, batch_size, num_examples)
    entry = images.IMAGE_DATASETS[name]
    examples = _decoded(entry, images.open_split(name, split, data_dir))[:num_examples]
    return iter(examples.map(_image_as_x).batch(batch_size))


def _image_as_x(example: dict) -> dict:
    """{"image", "label"} -> {"x", "label"}: integer pixels kept as they are (for bits/dim)."""
    return {"x": example["image"], "label": example["label"]}


def _toy_eval_batches(name, split, batch_size, num_examples):
    n = toy.TOY_EVAL_SIZE if num_examples is None else min(num_examples, toy.TOY_EVAL_SIZE)
    x, labels = toy.sample_toy(name, toy.eval_key(name, split), n)  # a prefix of the whole split
    for lo in range(0, len(x), batch_size):
        yield {"x": x[lo:lo + batch_size], "label": labels[lo:lo + batch_size]}
