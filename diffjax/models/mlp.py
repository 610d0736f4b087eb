"""Residual MLP denoiser for low-dimensional data x of shape (B, D)."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from diffjax.models import ops
from diffjax.models.embeddings import check_embedding_fields, check_int, conditioning, default_init

__all__ = ["MLP", "MLPBlock"]


class MLPBlock(nn.Module):
    """Pre-norm residual block h + W2 dropout(SiLU(W1 LN(h) + U emb)) (He et al. 2016; time injected as in DDPM)."""

    width: int
    layer_norm: bool = True
    dropout: float = 0.0
    kernels: str = "auto"
    dtype: Optional[str] = None

    @nn.compact
    def __call__(self, h, emb, train: bool = False):
        dtype = ops.compute_dtype(self.dtype)
        z = nn.LayerNorm(dtype=dtype, name="norm")(h) if self.layer_norm else h
        z = nn.Dense(self.width, kernel_init=default_init(), dtype=dtype, name="dense0")(z)
        z = z + nn.Dense(self.width, kernel_init=default_init(), dtype=dtype, name="emb")(nn.silu(emb))
        z = ops.Dropout(self.dropout, self.kernels)(nn.silu(z), deterministic=not train)
        return h + nn.Dense(self.width, kernel_init=default_init(), dtype=dtype, name="dense1")(z)


class MLP(nn.Module):
    """Time- (and class-) conditioned residual MLP network for (B, D) data, zero-initialised output.

    Attributes:
      width: hidden width of every block.
      depth: number of residual blocks.
      emb_dim: time/class embedding width; None means ``width``.
      layer_norm: LayerNorm at the start of each block and before the output layer.
      dropout: dropout rate inside each block (``train=True`` with a 'dropout' rng only).
      num_classes, embedding, time_scale, fourier_scale: as in ``UNet`` (row ``num_classes`` of
        the class table is the null class; ``cond=None`` means all null).
      out_dim: output width; None means D.
      kernels, dtype: as in ``UNet`` (here only dropout has a CPU kernel; LayerNorm statistics in
        float32, output float32).
    """

    width: int = 256
    depth: int = 3
    emb_dim: Optional[int] = None
    layer_norm: bool = True
    dropout: float = 0.0
    num_classes: Optional[int] = None
    embedding: str = "positional"
    time_scale: Optional[float] = None
    fourier_scale: float = 16.0
    out_dim: Optional[int] = None
    kernels: str = "auto"
    dtype: Optional[str] = None

    def __post_init__(self):
        check_int("width", self.width)
        check_int("depth", self.depth)
        check_int("emb_dim", self.emb_dim, 2, optional=True)
        check_int("out_dim", self.out_dim, optional=True)
        check_embedding_fields(self.embedding, self.time_scale, self.fourier_scale,
                               self.num_classes, self.dropout)
        ops.check_kernels(self.kernels)
        ops.compute_dtype(self.dtype)
        super().__post_init__()

    @nn.compact
    def __call__(self, x, t, cond=None, *, train: bool = False):
        x = jnp.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"MLP input x must have rank 2 (B, D); got shape {x.shape}")
        b, d = x.shape
        emb_dim = self.width if self.emb_dim is None else self.emb_dim
        emb = conditioning(self, t, cond, b, dim=emb_dim, features=emb_dim)
        dtype = ops.compute_dtype(self.dtype)
        h = nn.Dense(self.width, kernel_init=default_init(), dtype=dtype, name="dense_in")(x)
        for i in range(self.depth):
            h = MLPBlock(self.width, self.layer_norm, self.dropout, self.kernels, self.dtype,
                         name=f"block{i}")(h, emb, train)
        if self.layer_norm:
            h = nn.LayerNorm(dtype=dtype, name="norm_out")(h)
        out = d if self.out_dim is None else self.out_dim
        h = nn.Dense(out, kernel_init=nn.initializers.zeros, dtype=dtype, name="dense_out")(nn.silu(h))
        return h.astype(jnp.float32)
