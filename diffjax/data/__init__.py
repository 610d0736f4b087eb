"""Data: a registry of image (TFDS) and toy data sets, exact-resume training batches, eval batches.

Image sets are 8-bit and read by random access from TFDS ``array_record`` files without
TensorFlow: ``digits`` (scikit-learn's 8x8 digits, built offline on first use into
``default_data_dir()``: $DIFFJAX_DATA_DIR or ~/.cache/diffjax/tensorflow_datasets), and ``mnist``,
``cifar10``, ``celeb_a`` (64x64 central crops), which TFDS must have prepared beforehand.
Toy sets (``ring``, ``gmm``, ``two_moons``, ``checkerboard``) are continuous and sampled
in-process. ``train_batches`` gives batch s as a pure function of (seed, s, process): see
``diffjax.data.pipeline`` for how, and for the dequantization convention.
"""

from diffjax.data.images import DatasetNotPreparedError, prepare
from diffjax.data.pipeline import SPECS, eval_batches, get_spec, train_batches
from diffjax.data.spec import DATA_RANGE, DatasetSpec, default_data_dir, from_data_range, to_data_range

__all__ = [
    "SPECS",
    "DatasetNotPreparedError",
    "DatasetSpec",
    "default_data_dir",
    "eval_batches",
    "get_spec",
    "prepare",
    "train_batches",
    "DATA_RANGE",
    "to_data_range",
    "from_data_range",
]
