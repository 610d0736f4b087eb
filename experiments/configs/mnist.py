"""MNIST (TFDS, prepared beforehand in array_record format), a DDPM-style U-Net at 28x28.

    python -m diffjax.main --config experiments/configs/mnist.py --workdir runs/mnist
"""

from diffjax.config import base


def get_config():
    c = base()
    c.data.dataset = "mnist"
    c.model.ch = 64
    c.model.ch_mult = (1, 2, 2)  # 28 -> 14 -> 7
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (14,)
    c.model.num_classes = 10
    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 1000
    c.optim.ema_decay = 0.9999
    c.training.batch_size = 128
    c.training.num_steps = 100_000
    c.training.log_every = 100
    c.training.checkpoint_every = 5000
    c.eval.num_examples = 10_000
    c.eval.batch_size = 500
    return c
