"""Figures: reconstruction / uncertainty panels and calibration plots (matplotlib, Agg).

Images follow ``docs/conventions.md``: row index increases with y, so 2D images are shown
with ``origin="lower"``. 3D volumes are shown as their three central slices.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .io.atomic import atomic_write

__all__ = ["central_slices", "save_panel", "save_figure_atomic"]


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def central_slices(volume) -> list[tuple[str, np.ndarray]]:
    """``[("z = k", (H, W)), ("y = k", (D, W)), ("x = k", (D, H))]`` through the centre of a
    ``(D, H, W)`` volume; a 2D image is returned as one slice."""
    v = _np(volume)
    if v.ndim == 2:
        return [("", v)]
    if v.ndim != 3:
        raise ValueError(f"expected a 2D image or 3D volume, got shape {v.shape}")
    d, h, w = v.shape
    return [
        (f"z={d // 2}", v[d // 2]),
        (f"y={h // 2}", v[:, h // 2, :]),
        (f"x={w // 2}", v[:, :, w // 2]),
    ]


def save_figure_atomic(fig, path: str | os.PathLike, **kwargs) -> Path:
    """Save a matplotlib figure through a temporary file and an atomic rename."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, **kwargs))


def save_panel(
    path: str | os.PathLike,
    images: Mapping[str, object],
    *,
    calibration: tuple[Sequence[float], Sequence[float]] | None = None,
    cmaps: Mapping[str, str] | None = None,
    title: str | None = None,
) -> Path:
    """A row per central slice, a column per named image (e.g. ``reconstruction``, ``std``,
    ``|error|``), plus an optional calibration curve (expected vs observed coverage).
    Colour limits are shared along each column. Written atomically; returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not images:
        raise ValueError("save_panel needs at least one image")
    cmaps = dict(cmaps or {})
    names = list(images)
    slices = {k: central_slices(v) for k, v in images.items()}
    n_rows = len(next(iter(slices.values())))
    n_cols = len(names) + (1 if calibration is not None else 0)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 3.0 * n_rows), squeeze=False)
    for c, name in enumerate(names):
        vals = np.concatenate([s.ravel() for _, s in slices[name]])
        lo, hi = np.percentile(vals, [0.5, 99.5]) if vals.size else (0, 1)
        default = "gray" if "std" not in name and "error" not in name else "magma"
        for r, (label, img) in enumerate(slices[name]):
            ax = axes[r, c]
            im = ax.imshow(img, origin="lower", cmap=cmaps.get(name, default), vmin=lo, vmax=hi)
            ax.set_title(f"{name} {label}".strip(), fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if calibration is not None:
        expected, observed = (np.asarray(v, dtype=float) for v in calibration)
        ax = axes[0, -1]
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
        ax.plot(expected, observed, "o-", ms=3, label="observed")
        ax.set_xlabel("expected coverage")
        ax.set_ylabel("observed coverage")
        ax.set_title("calibration", fontsize=9)
        ax.legend(fontsize=8)
        ax.set_aspect("equal")
        for r in range(1, n_rows):
            axes[r, -1].axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        return save_figure_atomic(fig, path, dpi=110)
    finally:
        plt.close(fig)
