"""Sampling trajectories: ``diffjax.sample(..., save_at=...)`` returns a ``Trajectory``; pictures of them.

``save_at`` names grid indices (0 = x_T at t_start, -1 = the last grid time), or ``"all"``. Matplotlib is
imported inside the plotting functions only.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import numpy as np

__all__ = ["Trajectory", "check_save_at", "trajectory_image", "plot_trajectory", "plot_nfe_error"]


class Trajectory(NamedTuple):
    """The states of a sampler at the saved grid times.

    t: (K,) the times; x: (K, *x_T.shape) the sampler's state there (x_T first if index 0 is saved; the
    sample itself at a final sigma = 0; for UniPC the predictor's output); x0: (K, *x_T.shape) the model's
    E[x_0 | x_t] at each saved state (one evaluation each, not counted in ``nfe``; the sample itself at
    sigma = 0).
    """

    t: jax.Array
    x: jax.Array
    x0: jax.Array


def check_save_at(save_at, num_times: int) -> tuple:
    """``"all"`` or grid indices (negative from the end) -> a tuple of distinct increasing indices; ValueError
    naming ``save_at`` otherwise."""
    if isinstance(save_at, str):
        if save_at != "all":
            raise ValueError(f"save_at must be 'all' or a sequence of grid indices; got {save_at!r}")
        return tuple(range(num_times))
    arr = np.asarray(save_at)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"save_at must be 'all' or a 1-D sequence of integer grid indices; got {save_at!r}")
    idx = arr.tolist()
    if not idx or any(not -num_times <= i < num_times for i in idx):
        raise ValueError(f"save_at: indices must lie in [-{num_times}, {num_times - 1}] (the grid has {num_times} "
                         f"times); got {list(idx)}")
    return tuple(sorted({i % num_times for i in idx}))


def trajectory_image(traj: Trajectory, field: str = "x0", num_examples: int = 8, data_range=(-1.0, 1.0)):
    """A uint8 picture of image trajectories: one row per example, one column per saved time, of ``field``
    ("x" or "x0") with values in ``data_range``."""
    from diffjax.training.plots import image_grid

    if field not in ("x", "x0"):
        raise ValueError(f"field must be 'x' or 'x0'; got {field!r}")
    imgs = np.asarray(getattr(traj, field))
    if imgs.ndim != 5:
        raise ValueError(f"trajectory_image needs images: {field} of shape (K, batch, H, W, C); got {imgs.shape}")
    k, b = imgs.shape[:2]
    m = min(num_examples, b)
    lo, hi = data_range
    rows = np.swapaxes(imgs[:, :m], 0, 1).reshape((m * k,) + imgs.shape[2:])
    return image_grid((rows - lo) / (hi - lo) * 2.0 - 1.0, ncols=k)


def plot_trajectory(traj: Trajectory, path: str, field: str = "x", title: str = "trajectory"):
    """Save a picture of a trajectory: an image grid (``trajectory_image``) for images, else one scatter panel
    of the first two coordinates per saved time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vals = np.asarray(getattr(traj, field))
    if vals.ndim == 5:
        from diffjax.training.plots import save_png

        save_png(trajectory_image(traj, field), path, scale=2)
        return
    if vals.ndim != 3 or vals.shape[-1] < 2:
        raise ValueError(f"plot_trajectory needs (K, batch, >=2) points or (K, batch, H, W, C) images; "
                         f"got {vals.shape}")
    k = vals.shape[0]
    fig, axes = plt.subplots(1, k, figsize=(2.2 * k, 2.4), squeeze=False)
    lim = float(np.nanmax(np.abs(vals[..., :2]))) * 1.05
    for ax, t, v in zip(axes[0], np.asarray(traj.t), vals):
        ax.scatter(v[:, 0], v[:, 1], s=1, alpha=0.5)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(f"t = {t:.3g}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_nfe_error(curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: str, ylabel: str = "error",
                   title: str = "", logy: bool = True):
    """Save error against NFE, one line per label: ``curves[label] = (nfes, errors)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, (nfe, err) in curves.items():
        if len(nfe) != len(err):
            raise ValueError(f"curve {label!r}: {len(nfe)} NFE values but {len(err)} errors")
        order = np.argsort(nfe)
        ax.plot(np.asarray(nfe)[order], np.asarray(err)[order], marker="o", ms=3, label=label)
    ax.set_xlabel("NFE")
    ax.set_ylabel(ylabel)
    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
