"""Figures as plain PNGs (no plotting library needed): image grids of patches."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from shards.fsutil import atomic_write_bytes


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
    return Path(path)
