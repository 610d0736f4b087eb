"""Noise-conditional classifier p_phi(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021 sec. 4).

``EncoderClassifier`` is ADM's ``EncoderUNetModel``: the U-Net's time-conditioned down path and
middle block (the same layers and names as ``UNet``), then GroupNorm, SiLU, spatial mean pooling
("adaptive" pooling in ADM) and a linear head to ``out_channels`` logits. It is not conditioned
on labels (``num_classes`` stays None): the labels are its output. For (B, D) data the ``MLP``
with ``out_dim`` = number of classes is the classifier (its zero-initialised head starts uniform).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from diffjax.models import ops
from diffjax.models.unet import UNet, _norm

__all__ = ["EncoderClassifier"]


class EncoderClassifier(UNet):
    """Logits (B, out_channels) of p_phi(y | x_t, t) from x (B, H, W, C) and t (B,) in schedule units.

    Fields as in ``UNet`` (``kernels`` and ``dtype`` included; logits in float32); ``out_channels``
    is the number of classes and must be set.
    ``mid_attn`` and ``attn_resolutions`` default off: the small images it is built for do not need them.
    """

    ch: int = 32
    ch_mult: tuple = (1, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple = ()
    mid_attn: bool = True
    dropout: float = 0.0
    scale_shift: bool = True  # ADM's classifier uses FiLM conditioning
    out_channels: int = None

    def _check_fields(self) -> None:
        if self.num_classes is not None:
            raise ValueError(f"EncoderClassifier predicts the class: num_classes must be None (the labels are its "
                             f"output, out_channels={self.out_channels} of them); got num_classes={self.num_classes}")
        if not (isinstance(self.out_channels, int) and self.out_channels >= 2):
            raise ValueError(f"EncoderClassifier needs out_channels = the number of classes (an int >= 2); "
                             f"got {self.out_channels!r}")
        super()._check_fields()

    @nn.compact
    def __call__(self, x, t, cond=None, *, train: bool = False):
        h, _, _, _ = self._encode(jnp.asarray(x), t, None, train)
        h = _norm(h.shape[-1], self.num_groups, "norm_out", "silu", self.kernels, self.dtype)(h, train)
        head = nn.Dense(self.out_channels, kernel_init=nn.initializers.zeros, dtype=ops.compute_dtype(self.dtype),
                        name="head")
        return head(jnp.mean(h, axis=(1, 2))).astype(jnp.float32)
