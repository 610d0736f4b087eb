"""Stride-1 SAME 2-D convolution (NHWC, HWIO) whose gradients are written as canonical convolutions.

Why: XLA:CPU runs a convolution fast (Eigen) only in its canonical form, batch-spatial-feature
(``b01f_01io->b01f``); autodiff of ``lax.conv_general_dilated`` produces the input gradient with a
reversed, transposed kernel (``b01f_01oi``) and the weight gradient with batch and feature swapped
(``f01b_i01o->01bf``), which a compiler pass rewrites into the canonical form by transposing the
operands. In jaxlib 0.10 that rewrite did not happen inside ``lax.scan``/``while`` bodies, and
the backward there fell back to a naive loop: one U-Net train step took ~10 s instead of 0.3 s
when several steps were fused with ``training.steps_per_call > 1`` (measured on the digits
U-Net). Here the two gradients are spelled out in canonical form with the same transposes, so the
program is the same outside loops and fast inside them. A custom VJP has no forward mode
(``jax.jvp``/``jax.linearize``, which the likelihood uses), so ``Conv`` takes this path only with
``train=True`` (the training step's reverse mode) and plain ``lax.conv_general_dilated`` otherwise:

  dx = conv(g, rot180(W) with in/out swapped),  padding (k - 1 - lo, k - 1 - hi)
  dW[i, j, c, d] = sum_{n,h,w} x_pad[n, h + i, w + j, c] g[n, h, w, d]
     = conv(lhs = x as (C, H, W, N): batch C, features N;  kernel = g as (H, W, N, D)), padding (lo, hi)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["Conv", "conv2d_same"]

_DN = ("NHWC", "HWIO", "NHWC")


def _pads(kh: int, kw: int):
    """SAME padding (lo, hi) per spatial axis for stride 1 (lo = (k - 1) // 2, as XLA's SAME)."""
    return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in (kh, kw))


def _conv(x, w, padding):
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_DN)


def conv2d_same(x, w):
    """Stride-1 SAME convolution of x (N, H, W, Cin) with w (kh, kw, Cin, Cout); canonical-form gradients."""
    if jnp.ndim(x) != 4 or jnp.ndim(w) != 4 or jnp.shape(w)[2] != jnp.shape(x)[-1]:
        raise ValueError(f"conv2d_same: x must be (N, H, W, Cin) and w (kh, kw, Cin, Cout) with the same Cin; "
                         f"got x {jnp.shape(x)}, w {jnp.shape(w)}")
    return _conv2d_same(x, w)


@jax.custom_vjp
def _conv2d_same(x, w):
    return _conv(x, w, _pads(*w.shape[:2]))


def _fwd(x, w):
    return _conv2d_same(x, w), (x, w)


def _bwd(res, g):
    x, w = res
    kh, kw = w.shape[:2]
    pads = _pads(kh, kw)
    w_t = jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2))  # rot180, (kh, kw, Cout, Cin)
    dx = _conv(g, w_t, tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip((kh, kw), pads)))
    dw = _conv(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3)), pads)  # (Cin, kh, kw, Cout)
    return dx, jnp.transpose(dw, (1, 2, 0, 3))


_conv2d_same.defvjp(_fwd, _bwd)


class Conv(nn.Module):
    """``flax.linen.Conv(features, (k, k), padding="SAME")`` (same parameters, same forward) on ``conv2d_same``."""

    features: int
    kernel_size: int = 3
    kernel_init: callable = nn.linear.default_kernel_init
    bias_init: callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x, train: bool = False):
        """``train=True``: ``conv2d_same`` (reverse mode only: a custom VJP has no forward mode); else plain lax."""
        if x.ndim != 4:
            raise ValueError(f"Conv expects NHWC input of rank 4; got shape {x.shape}")
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        dtype = jnp.result_type(x, kernel)
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        y = conv2d_same(x, kernel) if train else _conv(x, kernel, _pads(k, k))
        return y + bias
