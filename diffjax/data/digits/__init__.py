"""The ``digits`` TFDS builder: scikit-learn's bundled 8x8 handwritten digits, built offline."""

from diffjax.data.digits.digits_dataset_builder import NUM_TRAIN, Builder

__all__ = ["Builder", "NUM_TRAIN"]
