"""The digits main job with a Diffusion Transformer (Peebles & Xie 2023) in place of the U-Net.

    python -m diffjax.main --config experiments/configs/digits_dit.py --workdir runs/digits_dit

``digits.py`` (cosine schedule, five steps per call, the same optimizer and budget) with
``model.name = "dit"``: patch 2 on the 8x8x1 images (16 tokens), 6 adaLN-Zero blocks of width 96
with 4 heads, 256 sinusoidal time features: 1,057,444 parameters, beside the digits U-Net's
1,065,889. Dropout 0.1 as in the U-Net's digits recipe (the paper's DiTs use none). The recipe
is the U-Net's, not tuned for the transformer; ``--config.model.num_classes=10`` makes it
class-conditional (with a learned null class for classifier-free guidance).

Against the U-Net at equal wall clock: ``experiments/benchmarks/bench_dit.py`` (BENCHMARKS.md, "DiT vs
U-Net on digits"). Its short recipe search timed the alternatives at ~1M parameters on 2 CPU cores:
patch 1 (64 tokens) costs ~4.5x the step time of patch 2 (16 tokens), and 14 blocks of width 64
~1.7x, for about the same parameters, so patch 2 at width 96 buys the most steps per second; the
learning-rate (1e-3 vs 2e-3) and dropout (0 vs 0.1) variants were trained there but not scored, so
the optimizer and dropout stay the U-Net's.
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
    c.training.num_steps = 600  # digits.py's before 2026-12-07, as measured
    return c
