"""Convolutional KL-regularised autoencoder, LDM's "KL-f" family (Rombach et al. 2022 app. G;
``ldm/modules/diffusionmodules/model.py`` Encoder / Decoder, ``ldm/models/autoencoder.py`` AutoencoderKL).

``AutoencoderKL.encode(x)`` maps images (B, H, W, C) in [-1, 1] to the posterior ``diffjax.autoencoder.Posterior``
(mean, log-variance), each (B, H / f, W / f, latent_channels) with f = 2^(len(ch_mult) - 1);
``decode(z)`` maps latents back to images; ``__call__(x)`` is ``decode(encode(x).mean)``.

Encoder: 3x3 conv to ``ch``; per level i ``num_res_blocks`` residual blocks of ``ch * ch_mult[i]`` channels
(self-attention after each where the spatial size is in ``attn_resolutions``), then a stride-2 conv except at the
last level; a middle block (res, attention, res); GroupNorm, SiLU, 3x3 conv to 2 x latent_channels (mean and
log-variance). Decoder: 3x3 conv from the latents, the middle block, the mirrored levels with
``num_res_blocks + 1`` blocks each and nearest-neighbour 2x upsampling + conv, GroupNorm, SiLU, 3x3 conv to
``channels``. LDM's 1x1 ``quant_conv`` / ``post_quant_conv`` are left out: with z_channels = embed_dim, as in all
its KL configs, each is a linear map fused into the adjacent conv.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffjax.autoencoder import LOGVAR_RANGE, Posterior
from diffjax.models import ops
from diffjax.models.embeddings import check_int, check_levels, default_init
from diffjax.models.unet import AttnBlock, Downsample, Upsample, default_num_groups

__all__ = ["AutoencoderKL", "Encoder", "Decoder", "AEResBlock"]


def _norm(channels: int, name: str, act: Optional[str], kernels: str, dtype) -> ops.GroupNorm:
    return ops.GroupNorm(default_num_groups(channels), 1e-6, act, kernels, dtype, name=name)


def _conv(features: int, name: str, kernels: str, dtype, kernel: int = 3) -> ops.Conv:
    return ops.Conv(features, kernel, kernel_init=default_init(), kernels=kernels, dtype=dtype, name=name)


class AEResBlock(nn.Module):
    """Residual block without conditioning: x + conv(SiLU(GN(conv(SiLU(GN(x)))))) (LDM ResnetBlock, temb 0)."""

    out_ch: int
    kernels: str = "auto"
    dtype: Optional[str] = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(kernels=self.kernels, dtype=self.dtype)
        h = _norm(x.shape[-1], "norm0", "silu", **kw)(x, train)
        h = _conv(self.out_ch, "conv0", **kw)(h, train)
        h = _norm(self.out_ch, "norm1", "silu", **kw)(h, train)
        h = _conv(self.out_ch, "conv1", **kw)(h, train)
        x = x.astype(h.dtype)
        if x.shape[-1] != self.out_ch:
            x = _conv(self.out_ch, "skip", kernel=1, **kw)(x, train)
        return x + h


def _attn(kernels, dtype, name):
    # LDM's AttnBlock: one head, default-initialised output, plain residual sum
    return AttnBlock(num_heads=1, skip_rescale=False, zero_init=False, kernels=kernels, dtype=dtype, name=name)


def _mid(h, kernels, dtype, attn: bool, train: bool):
    c = h.shape[-1]
    h = AEResBlock(c, kernels, dtype, name="mid_res0")(h, train)
    if attn:
        h = _attn(kernels, dtype, "mid_attn")(h, train)
    return AEResBlock(c, kernels, dtype, name="mid_res1")(h, train)


class Encoder(nn.Module):
    """Images (B, H, W, C) -> (B, H / f, W / f, 2 latent_channels): the posterior's mean and log-variance."""

    latent_channels: int
    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    mid_attn: bool
    kernels: str
    dtype: Optional[str]

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(kernels=self.kernels, dtype=self.dtype)
        h = _conv(self.ch, "conv_in", **kw)(x, train)
        for i, m in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                h = AEResBlock(self.ch * m, name=f"down{i}_res{j}", **kw)(h, train)
                if h.shape[1] in self.attn_resolutions:
                    h = _attn(self.kernels, self.dtype, f"down{i}_attn{j}")(h, train)
            if i < len(self.ch_mult) - 1:
                h = Downsample(name=f"down{i}_sample", **kw)(h, train)
        h = _mid(h, self.kernels, self.dtype, self.mid_attn, train)
        h = _norm(h.shape[-1], "norm_out", "silu", **kw)(h, train)
        return _conv(2 * self.latent_channels, "conv_out", **kw)(h, train)


class Decoder(nn.Module):
    """Latents (B, h, w, latent_channels) -> images (B, h f, w f, channels)."""

    channels: int
    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    mid_attn: bool
    kernels: str
    dtype: Optional[str]

    @nn.compact
    def __call__(self, z, train: bool = False):
        kw = dict(kernels=self.kernels, dtype=self.dtype)
        h = _conv(self.ch * self.ch_mult[-1], "conv_in", **kw)(z, train)
        h = _mid(h, self.kernels, self.dtype, self.mid_attn, train)
        for i in reversed(range(len(self.ch_mult))):
            for j in range(self.num_res_blocks + 1):
                h = AEResBlock(self.ch * self.ch_mult[i], name=f"up{i}_res{j}", **kw)(h, train)
                if h.shape[1] in self.attn_resolutions:
                    h = _attn(self.kernels, self.dtype, f"up{i}_attn{j}")(h, train)
            if i > 0:
                h = Upsample(name=f"up{i}_sample", **kw)(h, train)
        h = _norm(h.shape[-1], "norm_out", "silu", **kw)(h, train)
        return _conv(self.channels, "conv_out", **kw)(h, train).astype(jnp.float32)


class AutoencoderKL(nn.Module):
    """KL-f autoencoder (Rombach et al. 2022 app. G): ``encode``, ``decode``, ``__call__`` = decode(mean).

    Attributes:
      channels: image channels (the decoder's output).
      latent_channels: channels of the latents (LDM's z_channels = embed_dim).
      ch, ch_mult: level i has ``ch * ch_mult[i]`` channels; f = 2^(len(ch_mult) - 1).
      num_res_blocks: residual blocks per encoder level (one more per decoder level, as LDM).
      attn_resolutions: feature-map heights with self-attention after each residual block.
      mid_attn: self-attention in the middle blocks (always in LDM).
      kernels, dtype: the ops' kernel set and compute dtype (``diffjax.models.ops``).
    """

    channels: int
    latent_channels: int = 4
    ch: int = 32
    ch_mult: Sequence[int] = (1, 2)
    num_res_blocks: int = 1
    attn_resolutions: Sequence[int] = ()
    mid_attn: bool = True
    kernels: str = "auto"
    dtype: Optional[str] = None

    def setup(self):
        check_int("channels", self.channels)
        check_int("latent_channels", self.latent_channels)
        check_levels(self.ch, self.ch_mult, self.num_res_blocks, self.attn_resolutions)
        ops.check_kernels(self.kernels)
        common = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                      attn_resolutions=tuple(self.attn_resolutions), mid_attn=self.mid_attn, kernels=self.kernels,
                      dtype=self.dtype)
        self.encoder = Encoder(self.latent_channels, **common)
        self.decoder = Decoder(self.channels, **common)

    def encode(self, x, train: bool = False) -> Posterior:
        """q(z | x): mean and log-variance (clipped to ``LOGVAR_RANGE``), each (B, H / f, W / f, latent_channels);
        ``train`` picks the ops' training kernels (no dropout, no batch statistics: the same numbers)."""
        if x.ndim != 4 or x.shape[-1] != self.channels:
            raise ValueError(f"encode expects images (B, H, W, {self.channels}); got shape {x.shape}")
        f = 2 ** (len(self.ch_mult) - 1)
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"image size {x.shape[1]}x{x.shape[2]} is not divisible by the downsampling factor "
                             f"f = {f} (ch_mult={tuple(self.ch_mult)})")
        moments = self.encoder(x, train).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return Posterior(mean, jnp.clip(logvar, *LOGVAR_RANGE))

    def decode(self, z, train: bool = False):
        """Images (B, h f, w f, channels) from latents (B, h, w, latent_channels)."""
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            raise ValueError(f"decode expects latents (B, h, w, {self.latent_channels}); got shape {z.shape}")
        return self.decoder(z, train)

    def __call__(self, x, train: bool = False):
        return self.decode(self.encode(x, train).mean, train)
