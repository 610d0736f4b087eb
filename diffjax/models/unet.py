"""U-Net denoiser in the DDPM++ / ADM style (Song et al. 2021 App. H; Dhariwal & Nichol 2021).

``UNet()(x, t, cond, train=...)`` maps x of shape (B, H, W, C) (NHWC), times t of shape (B,) in
the schedule's units and optional int labels (B,) to a prediction of shape (B, H, W, out_channels).

Layout (DDPM++): a 3x3 input conv; for each entry m of ``ch_mult`` a level of ``num_res_blocks``
residual blocks with ``ch * m`` channels (self-attention after each block where the spatial size
is in ``attn_resolutions``) followed by a 2x downsampling except at the last level; a middle
block (res, attention, res); the mirrored up path with ``num_res_blocks + 1`` blocks per level,
each taking a skip connection; GroupNorm, SiLU and a zero-initialised 3x3 output conv.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffjax.models import ops
from diffjax.models.embeddings import check_embedding_fields, check_int, check_levels, conditioning, default_init

__all__ = ["UNet", "ResBlock", "AttnBlock", "Downsample", "Upsample", "default_num_groups"]

_ZERO = nn.initializers.zeros


def default_num_groups(channels: int) -> int:
    """GroupNorm groups: the largest divisor of C not above min(32, C // 4) (DDPM++ rule, Song et al. 2021).

    Equals DDPM++'s min(32, C // 4) whenever that divides C, and stays valid otherwise (e.g. 24
    groups for the 144 channels of a skip concatenation where DDPM++ would ask for 32).
    """
    cap = max(1, min(32, channels // 4))
    return next(g for g in range(cap, 0, -1) if channels % g == 0)


def _groups(channels: int, num_groups: Optional[int]) -> int:
    return default_num_groups(channels) if num_groups is None else num_groups


def _norm(channels: int, num_groups: Optional[int], name: str, act: Optional[str] = None,
          kernels: str = "auto", dtype=None) -> ops.GroupNorm:
    """GroupNorm (eps 1e-6), optionally followed by SiLU (``diffjax.models.ops.GroupNorm``)."""
    return ops.GroupNorm(_groups(channels, num_groups), 1e-6, act, kernels, dtype, name=name)


def _conv(features: int, kernel: int = 3, stride: int = 1, zero: bool = False, name=None,
          kernels: str = "auto", dtype=None) -> ops.Conv:
    """SAME k x k convolution (``diffjax.models.ops.Conv``), zero- or DDPM-initialised."""
    init = _ZERO if zero else default_init()
    return ops.Conv(features, kernel, stride, kernel_init=init, kernels=kernels, dtype=dtype, name=name)


def _upsample_nearest(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _downsample_avg(x):
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Downsample(nn.Module):
    """Plain 2x downsampling by a stride-2 3x3 convolution (Ho et al. 2020)."""

    kernels: str = "auto"
    dtype: Optional[str] = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        return _conv(x.shape[-1], stride=2, name="conv", kernels=self.kernels, dtype=self.dtype)(x, train)


class Upsample(nn.Module):
    """Plain 2x upsampling: nearest-neighbour resize then a 3x3 convolution (Ho et al. 2020)."""

    kernels: str = "auto"
    dtype: Optional[str] = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        return _conv(x.shape[-1], name="conv", kernels=self.kernels, dtype=self.dtype)(_upsample_nearest(x), train)


class ResBlock(nn.Module):
    """Residual block with time conditioning; BigGAN-style up/down inside it (Song et al. 2021 ResnetBlockBigGANpp).

    ``scale_shift``: h = GroupNorm(h) (1 + s) + b with (s, b) from the embedding (FiLM; ADM's
    use_scale_shift_norm); otherwise the embedding is added before the second norm (DDPM).
    ``zero_init``: the second conv is zero-initialised so the block starts as the identity (up to
    rescaling; DDPM++'s init_scale=0); otherwise it gets the default init.
    """

    out_ch: int
    num_groups: Optional[int] = None
    dropout: float = 0.0
    scale_shift: bool = False
    skip_rescale: bool = True
    up: bool = False
    down: bool = False
    zero_init: bool = True
    kernels: str = "auto"
    dtype: Optional[str] = None

    @nn.compact
    def __call__(self, x, emb, train: bool = False):
        ops_kw = dict(kernels=self.kernels, dtype=self.dtype)
        in_ch = x.shape[-1]
        h = _norm(in_ch, self.num_groups, "norm0", act="silu", **ops_kw)(x, train)
        x = x.astype(h.dtype)
        if self.up:
            h, x = _upsample_nearest(h), _upsample_nearest(x)
        elif self.down:
            h, x = _downsample_avg(h), _downsample_avg(x)
        h = _conv(self.out_ch, name="conv0", **ops_kw)(h, train)
        n_emb = 2 * self.out_ch if self.scale_shift else self.out_ch
        e = nn.Dense(n_emb, kernel_init=default_init(), dtype=ops.compute_dtype(self.dtype),
                     name="emb")(nn.silu(emb))[:, None, None, :]
        if self.scale_shift:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = _norm(self.out_ch, self.num_groups, "norm1", **ops_kw)(h, train) * (1.0 + scale) + shift
            h = ops.silu(h, self.kernels)
        else:
            h = _norm(self.out_ch, self.num_groups, "norm1", act="silu", **ops_kw)(h + e, train)
        h = ops.Dropout(self.dropout, self.kernels)(h, deterministic=not train)
        h = _conv(self.out_ch, zero=self.zero_init, name="conv1", **ops_kw)(h, train)
        if in_ch != self.out_ch or self.up or self.down:  # as in ResnetBlockBigGANpp
            x = _conv(self.out_ch, kernel=1, name="skip", **ops_kw)(x, train)
        out = x + h
        return out / math.sqrt(2.0) if self.skip_rescale else out


class AttnBlock(nn.Module):
    """Multi-head self-attention over spatial positions, residual, zero-initialised output (Vaswani et al. 2017; Ho et al. 2020)."""

    num_heads: int = 1
    num_groups: Optional[int] = None
    skip_rescale: bool = True
    zero_init: bool = True
    kernels: str = "auto"
    dtype: Optional[str] = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, hgt, wid, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"attention channels {c} not divisible by num_heads={self.num_heads}")
        h = _norm(c, self.num_groups, "norm", kernels=self.kernels, dtype=self.dtype)(x, train)
        a = ops.QKVAttention(self.num_heads, default_init(), self.kernels, self.dtype,
                             name="qkv")(h.reshape(b, hgt * wid, c))
        out_init = _ZERO if self.zero_init else default_init()
        a = nn.Dense(c, kernel_init=out_init, dtype=ops.compute_dtype(self.dtype), name="out")(a)
        out = x.astype(a.dtype) + a.reshape(b, hgt, wid, c)
        return out / math.sqrt(2.0) if self.skip_rescale else out


class UNet(nn.Module):
    """DDPM++ / ADM U-Net eps/x0/v/score network (Song et al. 2021 App. H; Dhariwal & Nichol 2021).

    Defaults are the DDPM++ (VP) CIFAR-10 configuration of score_sde (62.86M parameters at
    32x32x3; score_sde's 61.8M has one attention per up level instead of one after every block,
    as here, in DDPM and ADM); ``num_res_blocks=2, resblock_updown=False, skip_rescale=False`` is
    the DDPM CIFAR-10 network of Ho et al. 2020 (35.7M parameters, as reported there).

    Attributes:
      ch: base channel count; level i has ``ch * ch_mult[i]`` channels.
      ch_mult: channel multiplier per resolution level; len(ch_mult) - 1 downsamplings, so
        H and W must be divisible by 2 ** (len(ch_mult) - 1).
      num_res_blocks: residual blocks per level on the way down (one more on the way up).
      attn_resolutions: spatial sizes (height of the feature map) after whose residual blocks
        self-attention is applied; each must be reached (H / 2^i for some level i).
      num_heads: attention heads; ignored when ``head_channels`` is set.
      head_channels: channels per head (ADM's num_head_channels); heads = C // head_channels.
      mid_attn: self-attention in the middle block (always in DDPM++ / ADM).
      dropout: dropout rate in each residual block; active only with ``train=True`` and a
        'dropout' rng.
      num_classes: if set, a learned class embedding with ``num_classes + 1`` rows is added to
        the time embedding; label ``num_classes`` (and ``cond=None``) is the null class of
        classifier-free guidance.
      embedding: "positional" (sinusoidal, DDPM) or "fourier" (Gaussian Fourier features, score_sde).
      time_scale: t (in schedule units) is multiplied by this before embedding; None means 1000
        for "positional" (DDPM step indices for a VP schedule with t in [0, 1]) and 1 for
        "fourier" (e.g. when t is a log-sigma-like quantity).
      fourier_scale: standard deviation of the Fourier frequencies (16 in score_sde).
      resblock_updown: down/up-sample inside residual blocks (BigGAN, DDPM++) instead of a
        stride-2 conv / nearest resize + conv.
      skip_rescale: divide every residual sum by sqrt(2) (DDPM++).
      scale_shift: FiLM conditioning GroupNorm(h) (1 + s) + b (ADM) instead of adding the embedding.
      zero_init: zero-initialise the last layer of every residual branch (second conv of a
        residual block, attention output) and the output conv (DDPM++/ADM); False: the default
        init there too (as diffusers' ``UNet2DModel``).
      num_groups: GroupNorm groups for every norm (each channel count must be divisible by it);
        None means ``default_num_groups(C)`` per channel count C: min(32, C // 4) as in DDPM++,
        lowered to the nearest divisor of C where that does not divide C.
      out_channels: output channels; None means the input's channel count.
      kernels: the ops' kernel set (``diffjax.models.ops``): "xla" (stock JAX, every
        transformation), "cpu" (XLA:CPU kernels) or "auto" ("cpu" iff JAX's default backend is CPU).
        The parameters are the same for all three.
      dtype: compute dtype, None (float32) or "bfloat16": activations, convolutions and matmuls in
        it; parameters float32; GroupNorm statistics and softmax in float32; output float32.
    """

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: Sequence[int] = (16,)
    num_heads: int = 1
    head_channels: Optional[int] = None
    mid_attn: bool = True
    dropout: float = 0.1
    num_classes: Optional[int] = None
    embedding: str = "positional"
    time_scale: Optional[float] = None
    fourier_scale: float = 16.0
    resblock_updown: bool = True
    skip_rescale: bool = True
    scale_shift: bool = False
    zero_init: bool = True
    num_groups: Optional[int] = None
    out_channels: Optional[int] = None
    kernels: str = "auto"
    dtype: Optional[str] = None

    def __post_init__(self):
        self._check_fields()
        super().__post_init__()

    # ---- validation -------------------------------------------------------------------------
    def _check_fields(self) -> None:
        check_levels(self.ch, self.ch_mult, self.num_res_blocks, self.attn_resolutions)
        check_int("num_heads", self.num_heads)
        check_int("head_channels", self.head_channels, optional=True)
        check_int("out_channels", self.out_channels, optional=True)
        check_int("num_groups", self.num_groups, optional=True)
        ops.check_kernels(self.kernels)
        ops.compute_dtype(self.dtype)
        check_embedding_fields(self.embedding, self.time_scale, self.fourier_scale,
                               self.num_classes, self.dropout)
        for c in sorted(self._normalized_channels()):
            if self.num_groups is not None and c % self.num_groups:
                raise ValueError(
                    f"num_groups={self.num_groups} does not divide the {c} channels of a GroupNorm "
                    f"(ch={self.ch}, ch_mult={tuple(self.ch_mult)}); choose a divisor of every "
                    f"channel count or leave num_groups=None"
                )

    def _normalized_channels(self) -> set:
        """Every channel count a GroupNorm sees (inputs and outputs of all blocks, skips included)."""
        chans = [self.ch * m for m in self.ch_mult]
        seen, skips, h = set(), [chans[0]], chans[0]
        for lvl, c in enumerate(chans):
            for _ in range(self.num_res_blocks):
                seen.update((h, c))
                h = c
                skips.append(h)
            if lvl != len(chans) - 1:
                seen.add(h)
                skips.append(h)
        seen.add(h)
        for lvl in reversed(range(len(chans))):
            for _ in range(self.num_res_blocks + 1):
                seen.update((h + skips.pop(), chans[lvl]))
                h = chans[lvl]
            seen.add(h)
        return seen

    def resolutions(self, height: int) -> tuple:
        """Feature-map heights of the levels for an input of the given height."""
        n_down = len(tuple(self.ch_mult)) - 1
        if height % (2**n_down):
            raise ValueError(
                f"input resolution {height} is not divisible by 2^{n_down} = {2**n_down}, the total "
                f"downsampling of ch_mult={tuple(self.ch_mult)} (it would reach the odd size "
                f"{_first_odd(height, n_down)}); use a shorter ch_mult or pad the input"
            )
        return tuple(height // 2**i for i in range(n_down + 1))

    def _heads(self, channels: int) -> int:
        return self.num_heads if self.head_channels is None else channels // self.head_channels

    # ---- forward ----------------------------------------------------------------------------
    def _check_input(self, x) -> tuple:
        """Validate x (NHWC) against the layout; return the level resolutions."""
        if x.ndim != 4:
            raise ValueError(f"{type(self).__name__} input x must have rank 4 (B, H, W, C) (NHWC); got shape {x.shape}")
        _, hgt, wid, _ = x.shape
        res = self.resolutions(hgt)
        if wid % (2 ** (len(res) - 1)):
            raise ValueError(f"input width {wid} is not divisible by 2^{len(res) - 1}, the total "
                             f"downsampling of ch_mult={tuple(self.ch_mult)}")
        missing = sorted(set(self.attn_resolutions) - set(res))
        if missing:
            raise ValueError(f"attn_resolutions {missing} are never reached: with input height {hgt} "
                             f"and ch_mult={tuple(self.ch_mult)} the levels have sizes {list(res)}")
        attn_levels = [i for i, r in enumerate(res) if r in self.attn_resolutions]
        if self.mid_attn:
            attn_levels.append(len(res) - 1)
        for i in attn_levels:
            c = self.ch * self.ch_mult[i]
            field = "num_heads" if self.head_channels is None else "head_channels"
            value = self.num_heads if self.head_channels is None else self.head_channels
            if c % value:
                raise ValueError(f"{field}={value} must divide the {c} channels of the attention "
                                 f"at resolution {res[i]} (ch={self.ch}, ch_mult={tuple(self.ch_mult)})")
        return res

    def _resblock(self, h, emb, c, name, train, up=False, down=False):
        return ResBlock(c, self.num_groups, self.dropout, self.scale_shift, self.skip_rescale, up=up, down=down,
                        zero_init=self.zero_init, kernels=self.kernels, dtype=self.dtype, name=name)(h, emb, train)

    def _attn(self, h, name, train):
        return AttnBlock(self._heads(h.shape[-1]), self.num_groups, self.skip_rescale, self.zero_init,
                         kernels=self.kernels, dtype=self.dtype, name=name)(h, train)

    def _encode(self, x, t, cond, train):
        """The conditioning vector, input conv, down path and middle block: (h, skips, emb, resolutions).

        Shared by the U-Net and the noise-conditional ``EncoderClassifier`` (ADM's encoder half).
        """
        res = self._check_input(x)
        chans = [self.ch * m for m in self.ch_mult]
        emb = conditioning(self, t, cond, x.shape[0], dim=4 * self.ch, features=self.ch)  # DDPM: ch -> 4 ch
        h = _conv(chans[0], name="conv_in", kernels=self.kernels, dtype=self.dtype)(x, train)
        skips = [h]
        for lvl, c in enumerate(chans):
            r = res[lvl]
            for i in range(self.num_res_blocks):
                h = self._resblock(h, emb, c, f"down_r{r}_res{i}", train)
                if r in self.attn_resolutions:
                    h = self._attn(h, f"down_r{r}_attn{i}", train)
                skips.append(h)
            if lvl != len(chans) - 1:
                if self.resblock_updown:
                    h = self._resblock(h, emb, c, f"down_r{r}_downsample", train, down=True)
                else:
                    h = Downsample(self.kernels, self.dtype, name=f"down_r{r}_downsample")(h, train)
                skips.append(h)

        h = self._resblock(h, emb, chans[-1], "mid_res0", train)
        if self.mid_attn:
            h = self._attn(h, "mid_attn", train)
        h = self._resblock(h, emb, chans[-1], "mid_res1", train)
        return h, skips, emb, res

    @nn.compact
    def __call__(self, x, t, cond=None, *, train: bool = False):
        x = jnp.asarray(x)
        h, skips, emb, res = self._encode(x, t, cond, train)
        out_ch = x.shape[-1] if self.out_channels is None else self.out_channels
        chans = [self.ch * m for m in self.ch_mult]
        for lvl in reversed(range(len(chans))):
            r, c = res[lvl], chans[lvl]
            for i in range(self.num_res_blocks + 1):
                h = self._resblock(jnp.concatenate([h, skips.pop()], axis=-1), emb, c, f"up_r{r}_res{i}", train)
                if r in self.attn_resolutions:
                    h = self._attn(h, f"up_r{r}_attn{i}", train)
            if lvl != 0:
                if self.resblock_updown:
                    h = self._resblock(h, emb, c, f"up_r{r}_upsample", train, up=True)
                else:
                    h = Upsample(self.kernels, self.dtype, name=f"up_r{r}_upsample")(h, train)
        assert not skips

        h = _norm(h.shape[-1], self.num_groups, "norm_out", "silu", self.kernels, self.dtype)(h, train)
        out = _conv(out_ch, zero=self.zero_init, name="conv_out", kernels=self.kernels, dtype=self.dtype)(h, train)
        return out.astype(jnp.float32)


def _first_odd(height: int, n_down: int) -> int:
    for _ in range(n_down):
        if height % 2:
            return height
        height //= 2
    return height
