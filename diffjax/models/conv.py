"""Old import path of ``conv2d_same``, now in ``diffjax.models.cpu_kernels``; kept until its last importer moves."""

from diffjax.models.cpu_kernels import conv2d_same

__all__ = ["conv2d_same"]
