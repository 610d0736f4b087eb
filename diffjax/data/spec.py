"""What a data set is (``DatasetSpec``) and where built data lives (``default_data_dir``)."""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

DATA_DIR_ENV = "DIFFJAX_DATA_DIR"


class DatasetSpec(NamedTuple):
    """Shape of one example, classes (None: unconditional), bits (None: continuous), kind."""

    shape: tuple[int, ...]
    num_classes: Optional[int]
    num_bits: Optional[int]
    kind: str  # "image" (n-bit, TFDS) or "toy" (continuous, generated in-process)


def default_data_dir(data_dir: Optional[str] = None) -> str:
    """The data dir: ``data_dir`` if given, else $DIFFJAX_DATA_DIR, else a user cache dir."""
    if data_dir is not None:
        return os.path.expanduser(os.fspath(data_dir))
    if os.environ.get(DATA_DIR_ENV):
        return os.path.expanduser(os.environ[DATA_DIR_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "diffjax", "tensorflow_datasets")


DATA_RANGE = (-1.0, 1.0)


def to_data_range(u, num_bits: int, noise=None, data_range=DATA_RANGE):
    """n-bit integers u to ``data_range``: lo + (hi - lo) (u + noise) / 2^n, noise ~ U[0, 1) (uniform
    dequantization, Theis et al. 2016), or without noise the bin centres lo + (hi - lo) u / (2^n - 1).

    Plain arithmetic, so numpy (the input pipeline) and jax (``likelihood.dequantize``) share it;
    ``u`` must already be floating point.
    """
    lo, hi = data_range
    if noise is None:
        return lo + (hi - lo) * u / (2**num_bits - 1)
    return lo + (hi - lo) * (u + noise) / 2**num_bits


def from_data_range(x, num_bits: int, data_range=DATA_RANGE):
    """The inverse of the bin-centre map: the nearest n-bit integer of x, clipped (numpy)."""
    import numpy as np

    lo, hi = data_range
    k = 2**num_bits - 1
    u = np.rint((np.asarray(x, np.float64) - lo) / (hi - lo) * k)
    return np.clip(u, 0, k).astype(np.uint8 if num_bits <= 8 else np.uint16)
