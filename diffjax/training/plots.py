"""Pictures a person wants to look at after a run: sample grids, scatter plots, the loss curve."""

from __future__ import annotations

import csv
import math

import numpy as np

__all__ = ["to_uint8", "image_grid", "save_png", "scatter", "loss_curve"]


def to_uint8(x, data_range=(-1.0, 1.0)):
    """Images in ``data_range`` -> uint8 [0, 255] (clipped), the inverse of the data pipeline's scaling."""
    lo, hi = data_range
    return np.clip(np.round((np.asarray(x, np.float32) - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def image_grid(x, ncols: int | None = None, pad: int = 1):
    """(N, H, W, C) images in [-1, 1] -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) uint8 grid."""
    x = to_uint8(x)
    if x.ndim != 4:
        raise ValueError(f"images must have shape (N, H, W, C); got {x.shape}")
    n, h, w, c = x.shape
    if c == 1:
        x = np.repeat(x, 3, axis=-1)
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = x[i]
    return grid


def save_png(grid, path: str, scale: int = 1):
    """Write a uint8 HWC image, upscaled by an integer factor (nearest neighbour)."""
    from PIL import Image

    img = Image.fromarray(np.asarray(grid))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def scatter(x, path: str, title: str = "samples"):
    """Scatter plot of the first two coordinates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.asarray(x)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.5)
    ax.set_aspect("equal")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def loss_curve(history_csv: str, path: str, window: int = 50):
    """Training loss per step (faint) and its running mean over ``window`` steps, log-scaled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(history_csv) as f:
        rows = list(csv.DictReader(f))
    by_step = {int(r["step"]): float(r["loss"]) for r in rows}  # a resumed run re-logs steps: last wins
    steps = np.array(sorted(by_step))
    loss = np.array([by_step[s] for s in steps])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, alpha=0.3, lw=0.8, label="loss")
    if len(loss) >= window:
        ax.plot(steps[window - 1:], np.convolve(loss, np.ones(window) / window, mode="valid"), lw=1.5,
                label=f"running mean ({window})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if np.all(loss > 0):
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
