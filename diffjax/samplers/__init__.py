"""Samplers: each a pure function of (denoiser, schedule, x_T, time grid); ``sample`` on top."""

from diffjax.samplers.ancestral import ddim, ddim_invert, ddim_step, ddpm, ddpm_step, slerp
from diffjax.samplers.api import METHODS, sample
from diffjax.samplers.dpm_solver import DPMSolver, DPMSolverPPMultistep, dpm_solver, extrapolate_x0
from diffjax.samplers.ode import pf_ode
from diffjax.samplers.sde import euler_maruyama, langevin_step, predictor_corrector
