"""The digits main job with a Diffusion Transformer (Peebles & Xie 2023) in place of the U-Net.

    python -m diffjax.main --config experiments/configs/digits_dit.py --workdir runs/digits_dit

``digits.py`` (cosine schedule, five steps per call, the same optimizer and budget) with
``model.name = "dit"``: patch 2 on the 8x8x1 images (16 tokens), 6 adaLN-Zero blocks of width 96
with 4 heads, 256 sinusoidal time features: 1,057,444 parameters, beside the digits U-Net's
1,065,889. Dropout 0.1 as in the U-Net's digits recipe (the paper's DiTs use none). The recipe
is the U-Net's, not tuned for the transformer; ``--config.model.num_classes=10`` makes it
class-conditional (with a learned null class for classifier-free guidance).
"""

import os

import ml_collections
from ml_collections import config_dict

from diffjax.config import load


def get_config():
    c = load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.py"))
    c.model = ml_collections.ConfigDict({
        "name": "dit",
        "patch_size": 2,
        "hidden_size": 96,
        "depth": 6,
        "num_heads": 4,
        "mlp_ratio": 4.0,
        "dropout": 0.1,
        "freq_dim": 256,
        "num_classes": config_dict.placeholder(int),
        "dtype": config_dict.placeholder(str),
        "kernels": "auto",
    })
    return c
