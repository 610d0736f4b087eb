"""diffjax: diffusion models in JAX, pure functions all the way down.

schedules -> parameterization -> samplers / likelihood / losses -> training -> experiments.
"""

from diffjax import xla_cpu

xla_cpu.apply()  # before anything starts a JAX backend; see diffjax/xla_cpu.py
xla_cpu.apply_malloc()

from diffjax import losses, parameterization, schedules, sde, timesteps
from diffjax.parameterization import Denoised, convert, make_denoiser
from diffjax.samplers import METHODS, sample
from diffjax.schedules import (
    VE,
    DiscreteDDPM,
    RectifiedFlow,
    Schedule,
    SubVP,
    VPCosine,
    VPLinear,
)

__version__ = "0.1.0"
