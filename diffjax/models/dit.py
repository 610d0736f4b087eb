"""Diffusion Transformer with adaLN-Zero blocks (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

``DiT()(x, t, cond, train=...)`` maps x of shape (B, H, W, C) (NHWC), times t of shape (B,) in the
schedule's units and optional int labels (B,) to a prediction of shape (B, H, W, out_channels),
the same call as ``UNet``; the rest of diffjax sees it only as ``model_fn(params, x, t, cond)``.

Layout (Peebles & Xie 2023 sec. 3.2, Fig. 3): a p x p stride-p convolution turns the image into
T = (H / p)(W / p) tokens of ``hidden_size`` features, to which a fixed 2-D sin-cos position
embedding is added (MAE's, Vaswani et al. 2017 per axis); the conditioning vector c is the
time embedding (an MLP on sinusoidal features) plus the class embedding (with a learned null
class); ``depth`` adaLN-Zero blocks; a final adaLN layer, a linear map to p * p * out_channels
per token and unpatchify. Every adaLN modulation layer and the final linear map start at zero,
so each block starts as the identity and the network outputs zeros at init.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from diffjax.models import ops
from diffjax.models.embeddings import check_embedding_fields, check_int, conditioning

__all__ = ["DiT", "DiTBlock", "FinalLayer", "DIT_CONFIGS", "dit_fields", "patchify", "unpatchify",
           "sincos_pos_embed_2d", "modulate"]

_ZERO = nn.initializers.zeros
_XAVIER = nn.initializers.xavier_uniform()

# Named sizes of Peebles & Xie 2023, Table 1 (depth, hidden size, heads) x patch size 2 / 4 / 8.
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_CONFIGS = {f"{s}/{p}": dict(depth=d, hidden_size=h, num_heads=n, patch_size=p)
               for s, (d, h, n) in _SIZES.items() for p in (2, 4, 8)}


def dit_fields(name: str) -> dict:
    """The fields (depth, hidden_size, num_heads, patch_size) of a named size such as "XL/2" or "DiT-S/4" (Table 1)."""
    key = name[4:] if isinstance(name, str) and name.startswith("DiT-") else name
    if key not in DIT_CONFIGS:
        raise ValueError(f"unknown DiT size {name!r}; known: {sorted(DIT_CONFIGS)}")
    return dict(DIT_CONFIGS[key])


def _patch_init(key, shape, dtype=jnp.float32):
    """Xavier-uniform of the (p p C, hidden) matrix the stride-p convolution is (as DiT initialises its PatchEmbed)."""
    return _XAVIER(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)


def patchify(x, p: int):
    """(B, H, W, C) -> (B, (H / p)(W / p), p p C): row-major tokens, each a p x p x C patch flattened (row, col, C)."""
    b, hgt, wid, c = x.shape
    x = x.reshape(b, hgt // p, p, wid // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (hgt // p) * (wid // p), p * p * c)


def unpatchify(tokens, p: int, height: int, width: int):
    """The inverse of ``patchify``: (B, (H / p)(W / p), p p C) -> (B, H, W, C)."""
    b, t, d = tokens.shape
    h, w, c = height // p, width // p, d // (p * p)
    if t != h * w or d != p * p * c:
        raise ValueError(f"unpatchify: {t} tokens of {d} features do not tile a {height}x{width} image in "
                         f"{p}x{p} patches")
    x = tokens.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)


def sincos_pos_embed_2d(dim: int, height: int, width: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (T, dim), T = height x width row-major (MAE's ``get_2d_sincos_pos_embed``).

    The first dim / 2 features encode the column, the last dim / 2 the row, each as
    [sin(pos w_k), cos(pos w_k)], w_k = 10000^(-k / (dim / 4)) (Vaswani et al. 2017 sec. 3.5). A constant
    of the network (numpy, folded in at trace time), not a parameter.
    """
    if dim % 4:
        raise ValueError(f"the 2-D position embedding needs hidden_size divisible by 4; got {dim}")
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def axis(pos):
        out = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    return np.concatenate([axis(cols), axis(rows)], axis=1).astype(np.float32)


def modulate(x, shift, scale):
    """adaLN: x (1 + scale) + shift per example, shift / scale (B, D) broadcast over the tokens of x (B, T, D)."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def _layer_norm(dtype, name):
    """LayerNorm without affine parameters, eps 1e-6 (DiT's norm1 / norm2 / norm_final); statistics in float32."""
    return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype, name=name)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block (Peebles & Xie 2023 sec. 3.2):

    x + gate_a * Attn(modulate(LN(x), shift_a, scale_a)), then x + gate_m * MLP(modulate(LN(x), shift_m, scale_m)),
    the six (B, D) vectors from a zero-initialised Dense(6 D) of SiLU(c): the block is the identity at init.
    Attention through ``ops.QKVAttention`` (head-major "split" qkv kernel (D, 3, D): whole heads per ``model``
    shard for tensor parallelism; ``jax.nn.dot_product_attention`` on "xla"); the MLP
    is Dense(mlp_ratio D), tanh-GELU, Dense(D).
    """

    num_heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    kernels: str = "auto"
    dtype: Optional[str] = None

    @nn.compact
    def __call__(self, x, c, train: bool = False):
        dtype = ops.compute_dtype(self.dtype)
        d = x.shape[-1]
        mod = nn.Dense(6 * d, kernel_init=_ZERO, dtype=dtype, name="adaLN_modulation")(nn.silu(c))
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
        x = x.astype(dtype)

        h = modulate(_layer_norm(dtype, "norm1")(x), shift_a, scale_a)
        h = ops.QKVAttention(self.num_heads, _XAVIER, self.kernels, self.dtype, layout="split", name="qkv")(h)
        h = nn.Dense(d, kernel_init=_XAVIER, dtype=dtype, name="proj")(h)
        h = ops.Dropout(self.dropout, self.kernels)(h, deterministic=not train)
        x = x + gate_a[:, None, :] * h

        h = modulate(_layer_norm(dtype, "norm2")(x), shift_m, scale_m)
        h = nn.Dense(int(d * self.mlp_ratio), kernel_init=_XAVIER, dtype=dtype, name="fc1")(h)
        h = ops.Dropout(self.dropout, self.kernels)(nn.gelu(h, approximate=True), deterministic=not train)
        h = nn.Dense(d, kernel_init=_XAVIER, dtype=dtype, name="fc2")(h)
        return x + gate_m[:, None, :] * h


class FinalLayer(nn.Module):
    """Final adaLN layer: Dense(modulate(LN(x), shift, scale)) to p p out_channels per token, all zero-initialised."""

    patch_size: int
    out_channels: int
    dtype: Optional[str] = None

    @nn.compact
    def __call__(self, x, c):
        dtype = ops.compute_dtype(self.dtype)
        mod = nn.Dense(2 * x.shape[-1], kernel_init=_ZERO, dtype=dtype, name="adaLN_modulation")(nn.silu(c))
        shift, scale = jnp.split(mod, 2, axis=-1)
        h = modulate(_layer_norm(dtype, "norm_final")(x), shift, scale)
        return nn.Dense(self.patch_size**2 * self.out_channels, kernel_init=_ZERO, dtype=dtype, name="linear")(h)


class DiT(nn.Module):
    """Diffusion Transformer eps/x0/v/score network with adaLN-Zero blocks (Peebles & Xie 2023).

    Defaults are DiT-S/2 without classes; ``dit_fields("XL/2")`` (``DIT_CONFIGS``) gives the
    paper's named sizes. DiT-XL/2 on 32x32x4 latents with 1000 classes and ``out_channels=8``
    (learned sigma) has the paper's 675M parameters.

    Attributes:
      patch_size: p; H and W must be divisible by it; T = (H / p)(W / p) tokens.
      hidden_size: token width D (divisible by 4 for the 2-D position embedding, and by num_heads).
      depth: number of adaLN-Zero blocks.
      num_heads: attention heads (D / num_heads channels each).
      mlp_ratio: MLP hidden width / D (4 in the paper).
      dropout: dropout rate on the attention output and the MLP's hidden activations (0 in the paper);
        active only with ``train=True`` and a 'dropout' rng.
      num_classes: if set, a learned class embedding with ``num_classes + 1`` rows is added to the
        time embedding; label ``num_classes`` (and ``cond=None``) is the null class of
        classifier-free guidance (the losses drop labels to it; ``diffjax.guidance`` asks for it).
      embedding, time_scale, fourier_scale: the time features, as in ``UNet`` (positional: the
        sinusoidal features of ``1000 t`` by default, DiT's step indices for t in [0, 1]).
      freq_dim: number of sinusoidal time features fed to the time MLP (256 in DiT).
      out_channels: output channels; None means the input's C; 2 C is DiT's learned sigma
        (``config.diffusion.learned_variance`` sets it).
      kernels, dtype: as in ``UNet`` (``diffjax.models.ops``): attention and patch embedding through
        the ops layer; ``dtype="bfloat16"`` computes in bfloat16 with float32 parameters, LayerNorm
        statistics and softmax in float32; output float32.

    Differences from the reference implementation (facebookresearch/DiT), none of which changes
    the parameter count or the identity at init: the time MLP and class table take diffjax's
    shared initialisers (``embeddings.conditioning``) instead of N(0, 0.02), and the null row of
    the class table always exists (DiT adds it only when its class dropout is on).
    """

    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    num_classes: Optional[int] = None
    embedding: str = "positional"
    time_scale: Optional[float] = None
    fourier_scale: float = 16.0
    freq_dim: int = 256
    out_channels: Optional[int] = None
    kernels: str = "auto"
    dtype: Optional[str] = None

    def __post_init__(self):
        self._check_fields()
        super().__post_init__()

    def _check_fields(self) -> None:
        check_int("patch_size", self.patch_size)
        check_int("hidden_size", self.hidden_size)
        check_int("depth", self.depth)
        check_int("num_heads", self.num_heads)
        check_int("freq_dim", self.freq_dim, 2)
        check_int("out_channels", self.out_channels, optional=True)
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by 4 (the 2-D sin-cos position "
                             f"embedding gives a quarter of the features to sin / cos of each axis)")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if not (isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0
                and int(self.hidden_size * self.mlp_ratio) >= 1):
            raise ValueError(f"mlp_ratio must be > 0 (MLP width hidden_size x mlp_ratio >= 1); got {self.mlp_ratio!r}")
        ops.check_kernels(self.kernels)
        ops.compute_dtype(self.dtype)
        check_embedding_fields(self.embedding, self.time_scale, self.fourier_scale, self.num_classes, self.dropout)

    def _check_input(self, x) -> None:
        if x.ndim != 4:
            raise ValueError(f"DiT input x must have rank 4 (B, H, W, C) (NHWC); got shape {x.shape}")
        _, hgt, wid, _ = x.shape
        if hgt % self.patch_size or wid % self.patch_size:
            raise ValueError(f"input size {hgt}x{wid} is not divisible by patch_size={self.patch_size}")

    def num_tokens(self, height: int, width: int) -> int:
        """T = (H / p)(W / p), the sequence length for an H x W input."""
        return (height // self.patch_size) * (width // self.patch_size)

    @nn.compact
    def __call__(self, x, t, cond=None, *, train: bool = False):
        x = jnp.asarray(x)
        self._check_input(x)
        b, hgt, wid, ch = x.shape
        p, d = self.patch_size, self.hidden_size
        dtype = ops.compute_dtype(self.dtype)
        out_ch = ch if self.out_channels is None else self.out_channels

        c = conditioning(self, t, cond, b, dim=d, features=self.freq_dim)  # t_emb + y_emb, (B, D)
        h = ops.Conv(d, p, p, kernel_init=_patch_init, kernels=self.kernels, dtype=self.dtype,
                     name="patch_embed")(x, train)  # kernel = stride = p: the SAME padding is zero
        h = h.reshape(b, self.num_tokens(hgt, wid), d) + jnp.asarray(sincos_pos_embed_2d(d, hgt // p, wid // p), dtype)
        for i in range(self.depth):
            h = DiTBlock(self.num_heads, self.mlp_ratio, self.dropout, self.kernels, self.dtype,
                         name=f"block{i}")(h, c, train)
        h = FinalLayer(p, out_ch, self.dtype, name="final_layer")(h, c)
        return unpatchify(h, p, hgt, wid).astype(jnp.float32)
