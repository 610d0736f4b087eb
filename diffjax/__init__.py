"""diffjax: diffusion models in JAX, pure functions all the way down.

schedules -> parameterization -> samplers / likelihood / losses -> training -> experiments.

Importing diffjax changes nothing global (environment, allocator, JAX settings); programs that run on
XLA:CPU may call ``diffjax.xla_cpu.tune()`` first, as the CLIs do.
"""

from diffjax import losses, parameterization, schedules, sde, timesteps, xla_cpu
from diffjax.likelihood import log_likelihood
from diffjax.parameterization import Denoised, Denoiser, convert, make_denoiser
from diffjax.runs import load_run
from diffjax.samplers import METHODS, SAMPLERS, Trajectory, sample
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
