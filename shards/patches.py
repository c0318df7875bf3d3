"""Square patches at random positions and scales (paper sec. 4.1: 96x96 patches from ImageNet).

Boxes are drawn in source-image coordinates, so every patch can be traced back to (source key, box).
The draw depends only on (seed, source key): the same image gives the same patches whatever shard
or Ray task it lands in.
"""
from __future__ import annotations

import zlib

import cv2
import numpy as np


def image_rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


def sample_boxes(
    height: int, width: int, n: int, *, patch_px: int, scale_range: tuple[float, float],
    rng: np.random.Generator,
) -> np.ndarray:
    """Returns (n, 4) int32 square boxes x0, y0, x1, y1 (x1, y1 exclusive).

    The side is a fraction in `scale_range` of the shorter image side, at least `patch_px` when the
    image allows it. An image whose shorter side is at most `patch_px` (CIFAR, digits) gives one
    centred square box over its shorter side: small inputs keep their content and are resized.
    """
    short = min(height, width)
    if short <= patch_px:
        y0, x0 = (height - short) // 2, (width - short) // 2
        return np.array([[x0, y0, x0 + short, y0 + short]], np.int32)
    lo, hi = scale_range
    sides = np.round(rng.uniform(lo, hi, n) * short).astype(np.int64)
    sides = np.clip(sides, patch_px, short)
    x0 = np.floor(rng.random(n) * (width - sides + 1)).astype(np.int64)
    y0 = np.floor(rng.random(n) * (height - sides + 1)).astype(np.int64)
    return np.stack([x0, y0, x0 + sides, y0 + sides], axis=1).astype(np.int32)


def crop_patches(image: np.ndarray, boxes: np.ndarray, patch_px: int) -> np.ndarray:
    """image: (H, W, 3) uint8, boxes: (n, 4) -> (n, patch_px, patch_px, 3) uint8."""
    out = np.empty((len(boxes), patch_px, patch_px, 3), np.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        crop = image[y0:y1, x0:x1]
        # INTER_AREA averages when shrinking (no aliasing); linear when enlarging small inputs.
        interp = cv2.INTER_AREA if crop.shape[0] >= patch_px else cv2.INTER_LINEAR
        out[i] = cv2.resize(crop, (patch_px, patch_px), interpolation=interp)
    return out


def image_patches(
    image: np.ndarray, key: str, *, n: int, patch_px: int, scale_range: tuple[float, float], seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (boxes (m, 4) int32, patches (m, patch_px, patch_px, 3) uint8), m = n or 1."""
    h, w = image.shape[:2]
    boxes = sample_boxes(h, w, n, patch_px=patch_px, scale_range=scale_range, rng=image_rng(seed, key))
    return boxes, crop_patches(image, boxes, patch_px)
