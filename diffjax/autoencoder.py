"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", sec. 3 and app. G): its diagonal Gaussian posterior, the KL to N(0, I), the
reconstruction term, the training loss and the latent scale factor. Pure functions of arrays; the network is
``diffjax.models.AutoencoderKL``.

The loss is LDM's ``LPIPSWithDiscriminator`` without the perceptual and adversarial terms and with its learned
output log-variance fixed at 0: per example, the reconstruction error summed over pixels plus ``kl_weight`` times
the KL summed over latent dimensions, averaged over the batch.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

__all__ = ["RECON_LOSSES", "LOGVAR_RANGE", "Posterior", "posterior_sample", "kl_to_standard_normal",
           "reconstruction_error", "autoencoder_loss", "make_autoencoder_loss", "scale_factor", "latent_shape",
           "downsampling_factor", "psnr", "Codec", "make_codec"]

RECON_LOSSES = ("l1", "l2")
# the posterior's log-variance is clipped to this range (LDM's DiagonalGaussianDistribution)
LOGVAR_RANGE = (-30.0, 20.0)


class Posterior(NamedTuple):
    """q(z | x) = N(mean, exp(logvar)), each (B, h, w, c)."""

    mean: jax.Array
    logvar: jax.Array


def posterior_sample(key, posterior: Posterior) -> jax.Array:
    """z = mean + exp(logvar / 2) eps, eps ~ N(0, I) (the reparameterisation, Kingma & Welling 2014 eq. 10)."""
    eps = jax.random.normal(key, posterior.mean.shape, posterior.mean.dtype)
    return posterior.mean + jnp.exp(0.5 * posterior.logvar) * eps


def kl_to_standard_normal(posterior: Posterior) -> jax.Array:
    """KL(N(mu, sigma^2) || N(0, I)) per example, summed over latent dims (Kingma & Welling 2014 app. B):
    1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2); shape (B,)."""
    mu, logvar = posterior
    chex.assert_equal_shape([mu, logvar])
    axes = tuple(range(1, mu.ndim))
    return 0.5 * jnp.sum(jnp.square(mu) + jnp.exp(logvar) - 1.0 - logvar, axis=axes)


def reconstruction_error(x, x_rec, recon: str) -> jax.Array:
    """Per-example reconstruction error summed over pixels: sum |x - x_rec| ("l1", LDM) or sum (x - x_rec)^2
    ("l2"); shape (B,)."""
    chex.assert_equal_shape([x, x_rec])
    if recon not in RECON_LOSSES:
        raise ValueError(f"recon must be one of {RECON_LOSSES}; got {recon!r}")
    d = x - x_rec
    err = jnp.abs(d) if recon == "l1" else jnp.square(d)
    return jnp.sum(err, axis=tuple(range(1, x.ndim)))


def autoencoder_loss(x, x_rec, posterior: Posterior, *, kl_weight: float, recon: str):
    """LDM's first-stage loss without perceptual/GAN terms: mean over the batch of rec(x, x_rec) + kl_weight KL
    (Rombach et al. 2022 app. G). Returns (loss, aux) with the batch means of ``recon`` and ``kl``."""
    rec = reconstruction_error(x, x_rec, recon)
    kl = kl_to_standard_normal(posterior)
    loss = jnp.mean(rec + kl_weight * kl)
    return loss, {"recon": jnp.mean(rec), "kl": jnp.mean(kl)}


def make_autoencoder_loss(encode: Callable, decode: Callable, *, kl_weight: float, recon: str) -> Callable:
    """``loss_fn(params, batch, key) -> (loss, aux)``: encode ``batch["x"]`` to the posterior, decode one sample
    of it, ``autoencoder_loss``. ``encode(params, x) -> Posterior``, ``decode(params, z) -> x``."""
    if not (isinstance(kl_weight, (int, float)) and kl_weight >= 0):
        raise ValueError(f"kl_weight must be >= 0; got {kl_weight!r}")
    if recon not in RECON_LOSSES:
        raise ValueError(f"recon must be one of {RECON_LOSSES}; got {recon!r}")

    def loss_fn(params, batch, key):
        x = batch["x"]
        posterior = encode(params, x)
        x_rec = decode(params, posterior_sample(key, posterior))
        return autoencoder_loss(x, x_rec, posterior, kl_weight=kl_weight, recon=recon)

    return loss_fn


def scale_factor(latents) -> jax.Array:
    """1 / std of all entries of ``latents`` (LDM's ``scale_by_std``: the std of the flattened first-batch
    latents), so the scaled latents have unit variance."""
    std = jnp.std(jnp.asarray(latents, jnp.float32))
    return 1.0 / std


def downsampling_factor(ch_mult) -> int:
    """f = 2^(levels - 1): each level but the last halves the resolution."""
    return 2 ** (len(ch_mult) - 1)


def latent_shape(image_shape, ch_mult, latent_channels: int) -> tuple:
    """(H / f, W / f, latent_channels) of an (H, W, C) image; a ValueError unless f divides H and W."""
    h, w = image_shape[0], image_shape[1]
    f = downsampling_factor(ch_mult)
    if h % f or w % f:
        raise ValueError(f"ch_mult {tuple(ch_mult)} downsamples by f = {f}, which does not divide the "
                         f"{h}x{w} images")
    return (h // f, w // f, int(latent_channels))


def psnr(mse, peak_to_peak: float = 2.0):
    """Peak signal-to-noise ratio in dB, 10 log10(peak^2 / MSE); images in [-1, 1] have peak-to-peak 2."""
    return 10.0 * (2.0 * math.log10(peak_to_peak) - jnp.log10(mse))


class Codec(NamedTuple):
    """An autoencoder module's pure functions: ``encode(params, x, train=False) -> Posterior`` and
    ``decode(params, z, train=False) -> x`` (``params``: its variables dict)."""

    encode: Callable
    decode: Callable


def make_codec(module) -> Codec:
    """``Codec`` of a module with ``encode`` / ``decode`` methods (``diffjax.models.AutoencoderKL``)."""

    def encode(params, x, train: bool = False) -> Posterior:
        return module.apply(params, x, train, method="encode")

    def decode(params, z, train: bool = False):
        return module.apply(params, z, train, method="decode")

    return Codec(encode, decode)
