"""Samplers: each a pure function (denoiser, schedule, x_T, ts, key, cond, **options) -> (x, stats),
registered in ``SAMPLERS``; ``sample`` on top."""

from diffjax.samplers.ancestral import ddim, ddim_invert, ddim_step, ddpm, nfe_stats, scan_grid, slerp
from diffjax.consistency import consistency_sample
from diffjax.samplers.api import METHODS, SAMPLERS, SamplerSpec, sample
from diffjax.samplers.dpm_solver import (
    DPMSolver, DPMSolverAdaptive, DPMSolverPPAdaptive, DPMSolverPPMultistep, check_dpm_adaptive, dpm_adaptive,
    dpm_solver, extrapolate_x0,
)
from diffjax.samplers.grid_search import grid_error, load_grid, optimise_grid, save_grid
from diffjax.samplers.edm import EDMSolver, edm_sampler
from diffjax.samplers.ode import pf_ode
from diffjax.samplers.sde import euler_maruyama, langevin_step, predictor_corrector
from diffjax.samplers.trajectory import Trajectory, plot_nfe_error, plot_trajectory, trajectory_image
from diffjax.samplers.unipc import UniPCAdaptive, UniPCMultistep, unipc, unipc_adaptive
