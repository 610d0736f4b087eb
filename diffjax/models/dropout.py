"""Old import path of ``Dropout`` (now in ``diffjax.models.ops``) and ``threefry_bits`` (``cpu_kernels``)."""

from diffjax.models.cpu_kernels import threefry_bits
from diffjax.models.ops import Dropout

__all__ = ["Dropout", "threefry_bits"]
