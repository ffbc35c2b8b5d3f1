"""Loss history (JSON) and a loss-curve PNG.

matplotlib (the `train` extra) draws the curve when installed; without it a plain line plot is
rasterised with numpy and written with imageio, so a run always leaves a picture behind.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over up to `window` values (same length as the input)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or window <= 1:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, v.size + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _tmp_beside(path: Path) -> Path:
    return path.with_name(f".{path.stem}.{secrets.token_hex(4)}{path.suffix}")


def save_loss_history(losses: Sequence[float], path: str | os.PathLike) -> Path:
    """Write {"step": [...], "loss": [...]} atomically."""
    path = Path(path)
    tmp = _tmp_beside(path)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"step": list(range(1, len(losses) + 1)), "loss": [float(x) for x in losses]}, f)
    os.replace(tmp, path)
    return path


def save_loss_curve(
    losses: Sequence[float], path: str | os.PathLike, title: str = "training loss"
) -> Path:
    """Plot loss per step (and a moving average) to a PNG, atomically."""
    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        _plot_matplotlib(losses, tmp, title)
    except ImportError:
        _plot_plain(losses, tmp)
    os.replace(tmp, path)
    return path


def _plot_matplotlib(losses: Sequence[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(losses) + 1)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    smooth = len(losses) >= 10
    ax.plot(steps, losses, lw=0.8, alpha=0.45 if smooth else 1.0, label="loss")
    if smooth:
        window = max(2, len(losses) // 20)
        ax.plot(steps, moving_average(losses, window), lw=1.6, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if len(losses) and min(losses) > 0 and max(losses) / min(losses) > 50:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _plot_plain(losses: Sequence[float], path: Path, size: tuple[int, int] = (320, 480)) -> None:
    """Axes and a polyline drawn into a white canvas, written as PNG with imageio."""
    import imageio.v3 as iio

    h, w = size
    img = np.full((h, w, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 40, w - 10, 10, h - 30
    img[top:bottom, left] = 0
    img[bottom, left:right] = 0
    v = np.asarray(losses, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size:
        lo, hi = float(v.min()), float(v.max())
        span = hi - lo or 1.0
        n = max(v.size - 1, 1)
        # Dense interpolation so consecutive points join into a line.
        xs = np.linspace(0, v.size - 1, max(4 * (right - left), v.size))
        ys = np.interp(xs, np.arange(v.size), v)
        px = (left + 1 + xs / n * (right - left - 2)).astype(int)
        py = (bottom - 1 - (ys - lo) / span * (bottom - top - 2)).astype(int)
        img[py, px] = (31, 119, 180)
    iio.imwrite(path, img, extension=".png")
