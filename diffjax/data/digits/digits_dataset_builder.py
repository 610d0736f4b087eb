"""TFDS builder for scikit-learn's 8x8 digits (UCI optdigits test set, 1797 images, 10 classes).

The source ships inside scikit-learn (``sklearn.datasets.load_digits``), so building needs no
network and takes about a second. Pixels 0..16 are rescaled to 8 bits, ``round(v * 255 / 16)``,
so the images are ordinary 8-bit data for bits/dim. Splits come from one fixed permutation
(``np.random.default_rng(0).permutation(1797)``): its first 1500 indices are ``train``, the other
297 ``test``; records are written in that order (``disable_shuffling``).

Written as ``array_record`` with a ``Tensor`` image feature, so it is written and read back
(``tfds.data_source`` / ``tfds.builder_from_directory``) without TensorFlow.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

NUM_EXAMPLES = 1797
NUM_TRAIN = 1500
PERMUTATION_SEED = 0
MAX_PIXEL = 16


def split_indices(seed: int = PERMUTATION_SEED):
    """(train, test) indices of the 1797 examples: a fixed permutation cut at 1500."""
    perm = np.random.default_rng(seed).permutation(NUM_EXAMPLES)
    return perm[:NUM_TRAIN], perm[NUM_TRAIN:]


def to_uint8(images) -> np.ndarray:
    """Rescale 0..16 pixels to 0..255: round(v * 255 / 16), as (N, 8, 8, 1) uint8."""
    images = np.asarray(images, np.float64)
    return np.round(images * 255.0 / MAX_PIXEL).astype(np.uint8)[..., None]


class Builder(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 digits as a TFDS data set named ``digits``."""

    name = "digits"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "sklearn load_digits, 8-bit pixels, 1500/297 train/test split (seed 0)."}

    def __init__(self, *, file_format: str = "array_record", **kwargs):
        # array_record by default: TFDS's default tfrecord writer needs TensorFlow.
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            homepage="https://archive.ics.uci.edu/dataset/80",
            citation=(
                "@misc{alpaydin1998optdigits, author={Alpaydin, E. and Kaynak, C.}, "
                "title={Optical Recognition of Handwritten Digits}, year={1998}, "
                "howpublished={UCI Machine Learning Repository}}"
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        from sklearn.datasets import load_digits  # noqa: PLC0415 (bundled data, no network)

        digits = load_digits()
        images, labels = to_uint8(digits.images), digits.target.astype(np.int64)
        train, test = split_indices()
        return {
            "train": self._generate_examples(images, labels, train),
            "test": self._generate_examples(images, labels, test),
        }

    def _generate_examples(self, images, labels, indices):
        # With disable_shuffling TFDS writes records sorted by key: key = position in the split.
        for position, i in enumerate(indices):
            yield position, {"image": images[i], "label": int(labels[i])}
