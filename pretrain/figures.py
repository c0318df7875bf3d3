"""Figures as plain PNGs (no plotting library needed): image grids of patches."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from infra.storage import atomic_write_bytes, to_path


def grid(images: np.ndarray, cols: int = 8, pad_px: int = 2, fill: int = 255) -> np.ndarray:
    """images: (n, H, W, 3) uint8 -> one (rows*(H+pad)-pad, cols*(W+pad)-pad, 3) uint8 grid."""
    n, h, w, _ = images.shape
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    out = np.full((rows * (h + pad_px) - pad_px, cols * (w + pad_px) - pad_px, 3), fill, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        out[r * (h + pad_px) : r * (h + pad_px) + h, c * (w + pad_px) : c * (w + pad_px) + w] = img
    return out


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Writes an (H, W, 3) uint8 image as PNG, atomically."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return to_path(path)


def line_plots(path: str | Path, series: dict[str, list[float]], *, xlabel: str, title: str = "") -> Path | None:
    """One small panel per named series (its values at x = 0, 1, ...), side by side, as PNG.
    Nothing is written (None) when there is no series."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not series:
        return None
    fig = Figure(figsize=(2.6 * len(series), 2.4), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, values) in enumerate(series.items()):
        ax = fig.add_subplot(1, len(series), i + 1)
        ax.plot(range(len(values)), values, marker="o")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_xticks(range(len(values)))
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return to_path(path)
