"""Old import path of ``Dropout`` (now ``diffjax.models.ops``) and ``threefry_bits`` (``diffjax.models.cpu_kernels``)."""

from diffjax.models.cpu_kernels import threefry_bits
from diffjax.models.ops import Dropout

__all__ = ["Dropout", "threefry_bits"]
