"""The default main job: a small U-Net on scikit-learn's 8x8 digits (embedded, offline), minutes on CPU.

    python -m diffjax.main --config experiments/configs/digits.py --workdir runs/digits
"""

from diffjax.config import base


def get_config():
    return base()
