"""Time and class embeddings shared by every network in ``diffjax.models``.

The library calls a network with ``t`` in the schedule's own time units (continuous t in
[0, 1]; discrete DDPM step n is t = n / N). A network multiplies t by its documented field
``time_scale`` before embedding it, so the embedding sees the range it was designed for
(0..1000 for the DDPM sinusoidal embedding) and no magic ``t * 999`` lives anywhere else.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "EMBEDDINGS",
    "DEFAULT_TIME_SCALE",
    "sinusoidal_embedding",
    "fourier_embedding",
    "default_init",
    "resolve_time_scale",
    "check_int",
    "check_levels",
    "check_embedding_fields",
    "check_time",
    "TimeEmbedding",
    "ClassEmbedding",
    "conditioning",
]

EMBEDDINGS = ("positional", "fourier")

# time_scale used when a network leaves it as None: the DDPM sinusoidal embedding expects
# step indices 0..1000; Gaussian Fourier features (scale 16) expect O(1) inputs.
DEFAULT_TIME_SCALE = {"positional": 1000.0, "fourier": 1.0}


def default_init(scale: float = 1.0):
    """Uniform fan-average variance scaling, the initialiser of DDPM / DDPM++ (Ho et al. 2020)."""
    return nn.initializers.variance_scaling(max(scale, 1e-10), "fan_avg", "uniform")


def sinusoidal_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal position embedding of scalar times, Vaswani et al. 2017 sec. 3.5 (as in Ho et al. 2020).

    ``t``: (batch,) -> (batch, dim) = [sin(t w_k), cos(t w_k)], w_k = max_period^(-k / (dim/2)).
    """
    t = jnp.asarray(t)
    if t.ndim != 1:
        raise ValueError(f"t must have shape (batch,); got {t.shape}")
    if dim < 2:
        raise ValueError(f"embedding dim must be >= 2; got {dim}")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def fourier_embedding(t, dim: int, scale: float = 16.0, seed: int = 0):
    """Gaussian Fourier features [sin 2pi t W, cos 2pi t W], W ~ N(0, scale^2); Tancik et al. 2020, Song et al. 2021.

    W is drawn from a fixed seed, so it is a constant of the network (never trained, never in
    the parameters; score_sde keeps it as a stop-gradient parameter instead).
    """
    t = jnp.asarray(t)
    if t.ndim != 1:
        raise ValueError(f"t must have shape (batch,); got {t.shape}")
    if dim < 2 or dim % 2:
        raise ValueError(f"fourier embedding dim must be even and >= 2; got {dim}")
    w = scale * jax.random.normal(jax.random.PRNGKey(seed), (dim // 2,), jnp.float32)
    args = 2.0 * jnp.pi * t.astype(jnp.float32)[:, None] * w[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def resolve_time_scale(embedding: str, time_scale: Optional[float]) -> float:
    """The factor t is multiplied by before embedding: ``time_scale`` or the embedding's default."""
    return float(DEFAULT_TIME_SCALE[embedding] if time_scale is None else time_scale)


def check_int(name: str, value, minimum: int = 1, optional: bool = False) -> None:
    """Raise a ValueError naming the field unless ``value`` is an int >= minimum (or None if optional)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        allowed = f"{'None or ' if optional else ''}an int >= {minimum}"
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


def check_levels(ch, ch_mult, num_res_blocks, attn_resolutions) -> None:
    """Validate the level fields of a convolutional U-Net-like network (base width, per-level multipliers,
    residual blocks per level, attention resolutions); the error names the offending field."""
    check_int("ch", ch)
    if len(tuple(ch_mult)) == 0:
        raise ValueError("ch_mult must be a non-empty tuple of positive ints; got ()")
    for m in ch_mult:
        check_int("ch_mult entry", m)
    check_int("num_res_blocks", num_res_blocks)
    for r in attn_resolutions:
        check_int("attn_resolutions entry", r)


def check_embedding_fields(embedding, time_scale, fourier_scale, num_classes, dropout) -> None:
    """Validate the fields every network shares; the error names the offending field."""
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {EMBEDDINGS}; got {embedding!r}")
    if time_scale is not None and not time_scale > 0:
        raise ValueError(f"time_scale must be > 0 (or None for the embedding's default); got {time_scale}")
    if not fourier_scale > 0:
        raise ValueError(f"fourier_scale must be > 0; got {fourier_scale}")
    check_int("num_classes", num_classes, 1, optional=True)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1); got {dropout}")


def check_time(t, batch: int) -> jax.Array:
    """Return ``t`` as a float (at least float32) array of shape (batch,); a scalar is broadcast.

    t keeps at least float32 precision even for low-precision inputs: the positional embedding
    sees ``1000 t``.
    """
    t = jnp.asarray(t)
    t = t.astype(jnp.promote_types(t.dtype, jnp.float32))
    if t.ndim == 0:
        t = jnp.broadcast_to(t, (batch,))
    if t.shape != (batch,):
        raise ValueError(f"t must have shape ({batch},) or be a scalar; got {t.shape}")
    return t


class TimeEmbedding(nn.Module):
    """``features`` time features of ``time_scale * t``, then Dense-SiLU-Dense to ``dim`` (Ho et al. 2020 App. B).

    The U-Nets of DDPM / DDPM++ / ADM use ``features = ch`` and ``dim = 4 ch``.
    """

    dim: int
    features: int
    embedding: str = "positional"
    time_scale: Optional[float] = None
    fourier_scale: float = 16.0
    dtype: Any = None  # compute dtype of the two Dense layers (None: float32); the features stay float32

    @nn.compact
    def __call__(self, t):
        scaled = resolve_time_scale(self.embedding, self.time_scale) * t
        if self.embedding == "positional":
            feats = sinusoidal_embedding(scaled, self.features)
        else:
            feats = fourier_embedding(scaled, 2 * (self.features // 2), self.fourier_scale)
        h = nn.Dense(self.dim, kernel_init=default_init(), dtype=self.dtype, name="dense0")(feats)
        return nn.Dense(self.dim, kernel_init=default_init(), dtype=self.dtype, name="dense1")(nn.silu(h))


class ClassEmbedding(nn.Module):
    """Learned label embedding with num_classes + 1 rows; row ``num_classes`` is the null class of CFG (Ho & Salimans 2022).

    ``cond=None`` means every example is unconditional (all null).
    """

    num_classes: int
    dim: int
    dtype: Any = None  # dtype of the looked-up rows (None: float32)

    @nn.compact
    def __call__(self, cond, batch: int):
        if cond is None:
            cond = jnp.full((batch,), self.num_classes, jnp.int32)
        cond = jnp.asarray(cond)
        if cond.shape != (batch,):
            raise ValueError(f"cond must have shape ({batch},); got {cond.shape}")
        if not jnp.issubdtype(cond.dtype, jnp.integer):
            raise ValueError(f"cond must hold integer labels; got dtype {cond.dtype}")
        table = nn.Embed(self.num_classes + 1, self.dim, dtype=self.dtype, name="table",
                         embedding_init=nn.initializers.normal(1.0))
        return table(cond)


def conditioning(model: nn.Module, t, cond, batch: int, *, dim: int, features: int) -> jax.Array:
    """The vector every block of ``model`` is conditioned on: the time embedding of ``t`` plus, for a
    class-conditional model, the class embedding of ``cond`` (submodules ``time_embed`` / ``class_embed``).

    Called inside ``model``'s compact ``__call__``; reads its ``embedding``, ``time_scale``,
    ``fourier_scale``, ``num_classes`` and ``dtype`` (the compute dtype, None or a name) fields.
    """
    if cond is not None and model.num_classes is None:
        raise ValueError(f"cond was given but num_classes is None (an unconditional {type(model).__name__})")
    t = check_time(t, batch)
    dtype = jnp.dtype(model.dtype or "float32")
    emb = TimeEmbedding(dim, features, model.embedding, model.time_scale, model.fourier_scale, dtype,
                        name="time_embed")(t)
    if model.num_classes is not None:
        emb = emb + ClassEmbedding(model.num_classes, dim, dtype, name="class_embed")(cond, batch)
    return emb
