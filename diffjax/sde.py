"""The forward SDE of a schedule, its reverse-time SDE and its probability-flow ODE.

Forward (SDE survey; Song et al. 2021 eq. 5):   dx = f(t) x dt + g(t) dw
Reverse (Anderson 1982; Song et al. eq. 6):      dx = [f x - g^2 score] dt + g dw_bar
PF-ODE (Song et al. 2021 eq. 13):                dx/dt = f x - 1/2 g^2 score

With score = -eps/sigma and x = alpha x0 + sigma eps, the PF-ODE drift equals
alpha'(t) x0 + sigma'(t) eps (differentiate the interpolant at the denoiser's (x0, eps)); we use
that form because it stays finite on (0, 1] for every schedule, including alpha(1) = 0.
"""

from __future__ import annotations

from typing import Callable

import diffrax
import equinox as eqx
import jax.numpy as jnp

from diffjax.parameterization import Denoised
from diffjax.schedules import Schedule, broadcast_time

__all__ = ["pf_ode_drift", "reverse_sde_drift", "forward_sde_terms", "reverse_sde_terms", "pf_ode_term",
           "DiagonalNoiseTerm"]


def pf_ode_drift(schedule: Schedule, denoised: Denoised, x, t):
    """Probability-flow ODE drift f x - g^2 score / 2 = alpha' x0 + sigma' eps (Song eq. 13)."""
    d_alpha, d_sigma = schedule.d_alpha_sigma(broadcast_time(t, x))
    return d_alpha * denoised.x0 + d_sigma * denoised.eps


def reverse_sde_drift(schedule: Schedule, denoised: Denoised, x, t):
    """Reverse-time SDE drift f x - g^2 score = f x + g^2 eps / sigma (Song et al. 2021 eq. 6)."""
    t = broadcast_time(t, x)
    return schedule.f(t) * x + schedule.g2(t) / schedule.sigma(t) * denoised.eps


class DiagonalNoiseTerm(diffrax.AbstractTerm):
    """g(t) dW with a scalar (or per-example) g and a Brownian path of the state's shape."""

    diffusion: callable
    path: diffrax.AbstractBrownianPath

    def vf(self, t, y, args):
        return jnp.broadcast_to(self.diffusion(t, y, args), y.shape)

    def contr(self, t0, t1, **kwargs):
        return self.path.evaluate(t0, t1, **kwargs)

    def prod(self, vf, control):
        return vf * control


def _diffusion_term(schedule: Schedule, path: diffrax.AbstractBrownianPath):
    return DiagonalNoiseTerm(lambda t, y, args: jnp.sqrt(schedule.g2(t)), path)


def forward_sde_terms(schedule: Schedule, path: diffrax.AbstractBrownianPath):
    """diffrax terms of the forward SDE dx = f x dt + g dw."""
    drift = diffrax.ODETerm(lambda t, y, args: schedule.f(t) * y)
    return diffrax.MultiTerm(drift, _diffusion_term(schedule, path))


def pf_ode_term(denoiser: Callable, schedule: Schedule):
    """diffrax term of the PF-ODE dx/dt = f x - g^2 score / 2 over a denoiser (cond in ``args``)."""
    return diffrax.ODETerm(lambda t, y, args: pf_ode_drift(schedule, denoiser(y, t, args), y, t))


def reverse_sde_terms(denoiser: Callable, schedule: Schedule, path: diffrax.AbstractBrownianPath):
    """diffrax terms of the reverse SDE dx = [f x - g^2 score] dt + g dw_bar (Song et al. eq. 6)."""
    drift = diffrax.ODETerm(lambda t, y, args: reverse_sde_drift(schedule, denoiser(y, t, args), y, t))
    return diffrax.MultiTerm(drift, _diffusion_term(schedule, path))
