"""Flax networks (U-Net, DiT, MLP, classifier), seen by the rest of diffjax only as ``model_fn(params, x, t, cond)``;
and LDM's KL autoencoder ``AutoencoderKL`` (``encode`` / ``decode``, task "autoencoder"; not in ``MODELS``: it is not
a ``model_fn``).

``create_model(name, **fields)`` builds a module from the registry ``MODELS`` (every model takes
``kernels="auto"|"xla"|"cpu"`` and ``dtype=None|"float32"|"bfloat16"``, see ``diffjax.models.ops``);
``init_params(module, key, x_shape)`` returns its variables; ``make_model_fn(module)`` turns it
into the pure function the losses, samplers and likelihoods consume, so no other layer imports Flax.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models.autoencoder import AutoencoderKL
from diffjax.models.embeddings import ClassEmbedding, TimeEmbedding, fourier_embedding, sinusoidal_embedding
from diffjax.models.classifier import EncoderClassifier
from diffjax.models.dit import DIT_CONFIGS, DiT, dit_fields
from diffjax.models.mlp import MLP
from diffjax.models.ops import KERNELS, Conv, Dropout, GroupNorm, QKVAttention, resolve_kernels
from diffjax.models.unet import UNet

__all__ = [
    "MODELS",
    "UNet",
    "DiT",
    "DIT_CONFIGS",
    "dit_fields",
    "MLP",
    "EncoderClassifier",
    "AutoencoderKL",
    "KERNELS",
    "resolve_kernels",
    "Conv",
    "GroupNorm",
    "Dropout",
    "QKVAttention",
    "TimeEmbedding",
    "ClassEmbedding",
    "sinusoidal_embedding",
    "fourier_embedding",
    "create_model",
    "init_params",
    "make_model_fn",
    "count_params",
]

MODELS = {"unet": UNet, "dit": DiT, "mlp": MLP, "classifier": EncoderClassifier}


def create_model(name: str, **kwargs) -> nn.Module:
    """Instantiate the registered network ``name`` with the given fields."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    return MODELS[name](**kwargs)


def init_params(module: nn.Module, key, x_shape: Sequence[int], num_classes: Optional[int] = None):
    """Initialise ``module`` on zeros of shape ``x_shape`` (batch included); returns the variables dict.

    ``num_classes``, if given, must equal the module's; labels are then traced at init.
    """
    x_shape = tuple(int(s) for s in x_shape)
    if len(x_shape) < 2:
        raise ValueError(f"x_shape must include the batch dimension, (batch, ...); got {x_shape}")
    module_classes = getattr(module, "num_classes", None)
    if num_classes is not None and num_classes != module_classes:
        raise ValueError(f"num_classes={num_classes} does not match the module's num_classes={module_classes}")
    b = x_shape[0]
    x = jnp.zeros(x_shape, jnp.float32)
    t = jnp.zeros((b,), jnp.float32)
    cond = jnp.zeros((b,), jnp.int32) if module_classes is not None else None
    k_params, k_drop = jax.random.split(key)
    rngs = {"params": k_params, "dropout": k_drop}
    init = jax.jit(lambda rngs: module.init(rngs, x, t, cond, train=False))
    # init runs once, and its graph is mostly the threefry of every initialiser, on which XLA's
    # optimising backend spends seconds for no gain.
    return init.lower(rngs).compile(compiler_options={"xla_backend_optimization_level": 0})(rngs)


def make_model_fn(module: nn.Module, *, train: bool = False) -> Callable:
    """Return the pure ``model_fn(params, x, t, cond=None, rng=None)``; ``params`` is the variables dict.

    With ``train=True`` dropout is active and draws from ``rng`` (required if the module's
    dropout > 0); with ``train=False`` the function is deterministic and ``rng`` is ignored.
    """
    needs_rng = train and getattr(module, "dropout", 0.0) > 0

    def model_fn(params, x, t, cond=None, rng=None):
        if not isinstance(params, Mapping) or "params" not in params:
            raise ValueError("params must be the variables dict from init_params (with a 'params' entry)")
        if needs_rng and rng is None:
            raise ValueError(f"train=True with dropout={module.dropout} needs an rng for dropout")
        rngs = {"dropout": rng} if needs_rng else None
        return module.apply(params, x, t, cond, train=train, rngs=rngs)

    return model_fn


def count_params(params) -> int:
    """Total number of scalars in a parameter (or variables) pytree."""
    return int(sum(math.prod(jnp.shape(p)) for p in jax.tree_util.tree_leaves(params)))
