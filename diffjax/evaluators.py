"""The embedded sample-quality evaluator: an independent digits classifier and its feature space.

FID needs Inception weights a user supplies (``diffjax.metrics.load_inception``); for the
embedded 8x8 digits the default evaluator is a small CNN trained here on the **train split only**,
on clean (dequantized, +-1 pixel shifted) images. It shares nothing with the noise-conditional
guidance classifier (``config.task = "classifier"``): other architecture, other inputs (clean
images, no noise), other seed, so guided samples cannot score well by fooling the classifier that
guided them. It gives

* ``logits`` -> conditional accuracy: does a sample show the class it was asked for;
* ``features`` (the 64-d penultimate layer) -> a Fréchet distance in that space (``metrics``),
  per class and overall, the digits analogue of FID (Heusel et al. 2017).

Training is a pure function of the seed (~40 s on 2 CPU cores) and the
weights are cached in ``$DIFFJAX_DATA_DIR/../evaluators`` (default ``~/.cache/diffjax/evaluators``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from diffjax import data as data_lib
from diffjax.models.ops import Dropout

__all__ = ["DigitsNet", "Evaluator", "digits_evaluator", "train_digits_evaluator"]

VERSION = 1  # bump when the network or its training changes (new cache file)
TRAIN = dict(seed=1234, steps=2000, batch_size=128, learning_rate=1e-3, weight_decay=1e-4, dropout=0.3, shift=1)


class DigitsNet(nn.Module):
    """conv32-conv32-pool-conv64-conv64-pool, dense 64 (the features), dropout, dense 10 (the logits)."""

    num_classes: int = 10
    feature_dim: int = 64
    dropout: float = 0.3

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        for width in (32, 64):
            x = nn.silu(nn.Conv(width, (3, 3))(x))
            x = nn.silu(nn.Conv(width, (3, 3))(x))
            x = nn.avg_pool(x, (2, 2), (2, 2))
        feats = nn.silu(nn.Dense(self.feature_dim, name="features")(x.reshape(x.shape[0], -1)))
        h = Dropout(self.dropout)(feats, deterministic=not train)
        return nn.Dense(self.num_classes, name="logits")(h), feats


def _to_input(images) -> jax.Array:
    """uint8 images (N, 8, 8, 1) in 0..255 -> [-1, 1] at the bin centres (``data.to_data_range``)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (8, 8, 1):
        raise ValueError(f"images must have shape (N, 8, 8, 1) (8x8 digits, NHWC); got {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 pixels in [0, 255] (as python -m diffjax.generate writes them); "
                         f"got dtype {images.dtype}")
    return jnp.asarray(data_lib.to_data_range(images.astype(np.float32), 8))


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """A trained feature network: ``logits(images)``, ``features(images)`` of uint8 NHWC images."""

    params: dict
    module: DigitsNet
    info: dict  # training settings and the measured test accuracy

    def _apply(self, images, batch_size: int = 1000):
        x = _to_input(images)
        outs = [_forward(self.module, self.params, x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        return (np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs]))

    def logits(self, images) -> np.ndarray:
        return self._apply(images)[0]

    def features(self, images) -> np.ndarray:
        return self._apply(images)[1]

    def accuracy(self, images, labels) -> float:
        """Fraction of images classified as ``labels`` (the conditional accuracy of guided samples)."""
        labels = np.asarray(labels)
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},); got {labels.shape}")
        return float(np.mean(np.argmax(self.logits(images), -1) == labels))


@functools.partial(jax.jit, static_argnums=0)
def _forward_jit(module, params, x):
    return module.apply(params, x)


def _forward(module, params, x):
    logits, feats = _forward_jit(module, params, x)
    return np.asarray(logits), np.asarray(feats)


def _split_arrays(split: str, data_dir: Optional[str]):
    batches = list(data_lib.eval_batches("digits", split=split, batch_size=10_000, data_dir=data_dir))
    return (np.concatenate([b["x"] for b in batches]).astype(np.uint8),
            np.concatenate([b["label"] for b in batches]).astype(np.int32))


def train_digits_evaluator(data_dir: Optional[str] = None, **overrides) -> Evaluator:
    """Train the evaluator on the digits train split (settings ``TRAIN`` updated by ``overrides``)."""
    cfg = {**TRAIN, **overrides}
    images, labels = _split_arrays("train", data_dir)
    module = DigitsNet(dropout=cfg["dropout"])
    key = jax.random.PRNGKey(cfg["seed"])
    k_init, k_run = jax.random.split(key)
    x_all, y_all = _to_input(images), jnp.asarray(labels)
    params = module.init(k_init, x_all[:1])
    tx = optax.adamw(optax.cosine_decay_schedule(cfg["learning_rate"], cfg["steps"]), weight_decay=cfg["weight_decay"])
    s = cfg["shift"]

    def batch(key):
        k_idx, k_shift, k_noise = jax.random.split(key, 3)
        idx = jax.random.randint(k_idx, (cfg["batch_size"],), 0, len(x_all))
        x = x_all[idx] + jax.random.uniform(k_noise, x_all[idx].shape, minval=-1.0, maxval=1.0) / 255.0
        padded = jnp.pad(x, ((0, 0), (s, s), (s, s), (0, 0)), constant_values=-1.0)  # background is -1
        dy, dx = jax.random.randint(k_shift, (2,), 0, 2 * s + 1)
        return jax.lax.dynamic_slice(padded, (0, dy, dx, 0), x.shape), y_all[idx]

    def loss_fn(params, x, y, key):
        logits, _ = module.apply(params, x, train=True, rngs={"dropout": key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, opt, i):
        k_batch, k_drop = jax.random.split(jax.random.fold_in(k_run, i))
        x, y = batch(k_batch)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y, k_drop)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    # a Python loop of jitted steps: XLA:CPU runs these (flax) convolution gradients slowly inside lax.scan
    # (BENCHMARKS.md, "Model ops on XLA:CPU")
    opt = tx.init(params)
    for i in range(cfg["steps"]):
        params, opt, loss = step(params, opt, i)
    evaluator = Evaluator(params, module, {"version": VERSION, **cfg, "final_train_loss": float(loss)})
    test_images, test_labels = _split_arrays("test", data_dir)
    evaluator.info["test_accuracy"] = evaluator.accuracy(test_images, test_labels)
    return evaluator


def default_cache_dir() -> str:
    return os.path.join(os.path.dirname(data_lib.default_data_dir()), "evaluators")


def digits_evaluator(cache_dir: Optional[str] = None, data_dir: Optional[str] = None) -> Evaluator:
    """The digits evaluator, trained on first use and cached as ``digits_cnn_v{VERSION}.msgpack`` (+ .json)."""
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, f"digits_cnn_v{VERSION}")
    module = DigitsNet(dropout=TRAIN["dropout"])
    if os.path.exists(path + ".msgpack") and os.path.exists(path + ".json"):
        template = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
        with open(path + ".msgpack", "rb") as f:
            params = serialization.from_bytes(template, f.read())
        with open(path + ".json") as f:
            return Evaluator(params, module, json.load(f))
    evaluator = train_digits_evaluator(data_dir)
    os.makedirs(cache_dir, exist_ok=True)
    for suffix, payload, mode in ((".msgpack", serialization.to_bytes(evaluator.params), "wb"),
                                  (".json", json.dumps(evaluator.info, indent=2), "w")):
        tmp = f"{path}{suffix}.tmp{os.getpid()}"
        with open(tmp, mode) as f:
            f.write(payload)
        os.replace(tmp, path + suffix)
    return evaluator
