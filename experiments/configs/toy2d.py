"""A 2-D toy run: an MLP denoiser on the 8-mode ring mixture (exact samples and density known).

    python -m diffjax.main --config experiments/configs/toy2d.py --workdir runs/toy2d
"""

import ml_collections
from ml_collections import config_dict

from diffjax.config import base


def get_config():
    c = base()
    c.data.dataset = "ring"
    c.data.dequantize = False
    c.model = ml_collections.ConfigDict({"name": "mlp", "width": 256, "depth": 4, "dropout": 0.0,
                                         "num_classes": config_dict.placeholder(int)})
    c.training.batch_size = 512
    c.training.num_steps = 2000
    c.optim.learning_rate = 1e-3
    c.sample.num_samples = 2000
    c.eval.num_examples = 1000
    c.eval.batch_size = 1000
    return c
