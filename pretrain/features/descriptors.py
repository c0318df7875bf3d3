"""Local descriptors for the Fisher-vector init features: dense SIFT plus a local colour statistic.

Paper sec. 3.1 starts from "SIFT + color" Fisher vectors [36]. Per patch we take VLFeat's dense SIFT
on the gray image (4x4 bins of `bin_px`, one frame every `step_px`) and, on the same frames, the mean
and standard deviation of R, G and B over the descriptor's 4x4-bin window: a 134-D descriptor.
Every patch of one size gives the same frames, so a batch is one (N, F, 134) array.
"""
from __future__ import annotations

import threading
from functools import lru_cache

import numpy as np
from cyvlfeat.sift import dsift

SIFT_DIM = 128
COLOR_DIM = 6  # mean R, G, B then std R, G, B
DESC_DIM = SIFT_DIM + COLOR_DIM

# VLFeat's float dsift descriptors have L2 norm 512 (the scale its uint8 descriptors are rounded
# from); on photo patches their total variance is ~0.5 * 512^2 over 128 dims. The 6 colour values
# (in [0, 1] times COLOR_SCALE = 512) then have a total variance of ~0.15 * 512^2, i.e. ~6x SIFT's
# per-dimension variance: the descriptor PCA keeps all of colour and the GMM sees both, while colour
# does not dominate the texture part. Unscaled, SIFT would outweigh colour ~500x and the PCA would
# drop colour altogether. (Scaling colour up rather than SIFT down saves a pass over 128 columns.)
COLOR_SCALE = 512.0

_WORK = threading.local()  # see work_array
_GRAY = np.array([0.299, 0.587, 0.114], np.float32) / 255.0  # ITU-R 601 luma, scaled to [0, 1]


@lru_cache(maxsize=16)
def frame_grid(size_px: int, step_px: int, bin_px: int) -> np.ndarray:
    """(F, 2) float32 (y, x) dsift frame centres for a size_px x size_px image (asked of VLFeat)."""
    frames, _ = dsift(np.zeros((size_px, size_px), np.float32), step=step_px, size=bin_px, fast=True,
                      float_descriptors=True)
    frames.setflags(write=False)  # shared by the cache
    return frames


@lru_cache(maxsize=16)
def _windows(size_px: int, step_px: int, bin_px: int):
    """Colour windows as 0/1 matrices: (rows (Fy, P), cols (Fx, P), frame -> row (F,), frame -> col
    (F,)). A frame's window is pixels [c - 2*bin_px, c + 2*bin_px) around its centre c in each
    direction, the extent of its 4x4 SIFT bins, clipped to the patch."""
    frames = frame_grid(size_px, step_px, bin_px)
    (ys, iy), (xs, ix) = (np.unique(c, return_inverse=True) for c in frames.T)
    pixel = np.arange(size_px)

    def window(centres):
        lo = np.rint(centres - 2 * bin_px)[:, None]
        return ((pixel >= lo) & (pixel < lo + 4 * bin_px)).astype(np.float64)

    return window(ys), window(xs), iy.ravel(), ix.ravel()


def work_array(name: str, shape: tuple, dtype=np.float32) -> np.ndarray:
    """A reused per-thread work array of `shape` (contents undefined), grown to the largest asked.
    Fresh multi-MB arrays cost a page fault per 4 KB on every batch, measured at ~0.1 ms per 96px
    patch on our VMs (as much as all the work besides dsift and fisher), so batch temporaries and
    batch outputs that are consumed at once live here."""
    pool = _WORK.__dict__
    size, key = int(np.prod(shape)), (name, np.dtype(dtype))
    if key not in pool or pool[key].size < size:
        pool[key] = np.empty(size, dtype)
    return pool[key][:size].reshape(shape)


def _window_sums(values: np.ndarray, rows: np.ndarray, cols: np.ndarray, iy, ix) -> np.ndarray:
    """values: (N, P, P, 3) float -> (N, F, 3) sums over each frame's window, in values.dtype.
    Two batched GEMMs (window rows, then window columns) beat integral images here, ~3x on 96px."""
    n, size = values.shape[:2]
    rows, cols = rows.astype(values.dtype), cols.astype(values.dtype)
    by_rows = np.matmul(rows, values.reshape(n, size, 3 * size),
                        out=work_array("by_rows", (n, len(rows), 3 * size), values.dtype))
    by_rows = by_rows.reshape(n * len(rows), size, 3).transpose(0, 2, 1)  # (N*Fy, 3, P), a view
    sums = np.matmul(by_rows, cols.T).reshape(n, len(rows), 3, len(cols))  # (N, Fy, 3, Fx)
    return sums.transpose(0, 1, 3, 2)[:, iy, ix]


def _color_stats(centred: np.ndarray, step_px: int, bin_px: int) -> np.ndarray:
    """centred: (N, P, P, 3) float, pixel values minus 128 -> (N, F, 6) float32 (see color_stats)."""
    rows, cols, iy, ix = _windows(centred.shape[1], step_px, bin_px)
    n = (rows.sum(1)[iy] * cols.sum(1)[ix])[None, :, None]  # (1, F, 1) pixels per window
    square = np.multiply(centred, centred, out=work_array("square", centred.shape, centred.dtype))
    s1 = _window_sums(centred, rows, cols, iy, ix).astype(np.float64)
    s2 = _window_sums(square, rows, cols, iy, ix).astype(np.float64)
    var = (n * s2 - s1 * s1) / (n * n * 255.0**2)
    return np.concatenate([(s1 / n + 128) / 255.0, np.sqrt(var)], axis=2).astype(np.float32)


def _centred_dtype(bin_px: int, size: int):
    # Centred on 128, |value| <= 128, so a window's sum of squares stays an exact integer in float32
    # up to 1024 pixels (2^24, i.e. bin_px <= 8); beyond that, sum in float64. Exact sums make the
    # variance numerator exact: never negative, and exactly 0 on a flat window.
    return np.float32 if min(4 * bin_px, size) ** 2 * 128**2 <= 2**24 else np.float64


def color_stats(patches: np.ndarray, step_px: int, bin_px: int) -> np.ndarray:
    """patches: (N, P, P, 3) uint8 -> (N, F, 6) float32: mean R, G, B and std R, G, B (scaled to
    [0, 1]) over the window of each dsift frame (see `_windows`)."""
    dtype = _centred_dtype(bin_px, patches.shape[1])
    centred = work_array("rgb", patches.shape, dtype)
    np.subtract(patches, dtype(128), out=centred)
    return _color_stats(centred, step_px, bin_px)


def local_descriptors(patches: np.ndarray, step_px: int, bin_px: int, out: np.ndarray | None = None
                      ) -> np.ndarray:
    """patches: (N, P, P, 3) uint8 -> (N, F, 134) float32: 128 dense SIFT dims (L2 norm 512), then the
    6 colour dims times COLOR_SCALE, one row per dsift frame (F is the same for all patches of size P).
    Written into `out` if given."""
    if patches.ndim != 4 or patches.shape[3] != 3 or patches.dtype != np.uint8:
        raise ValueError(f"patches must be (N, P, P, 3) uint8, got {patches.shape} {patches.dtype}")
    size = patches.shape[1]
    if min(step_px, bin_px) < 1 or 3 * bin_px >= size:
        raise ValueError(f"step_px={step_px}, bin_px={bin_px} give no SIFT frame on {size}px patches "
                         f"(need step_px >= 1 and 1 <= 3*bin_px < {size})")
    shape = (len(patches), len(frame_grid(size, step_px, bin_px)), DESC_DIM)
    out = np.empty(shape, np.float32) if out is None else out
    if out.shape != shape:
        raise ValueError(f"out has shape {out.shape}, expected {shape}")
    dtype = _centred_dtype(bin_px, size)
    rgb = work_array("rgb", patches.shape, dtype)
    np.copyto(rgb, patches)
    gray = np.matmul(rgb, _GRAY.astype(dtype), out=work_array("gray", patches.shape[:3], dtype))
    for i, image in enumerate(gray):  # (P, P) float in [0, 1]; dsift casts float64 to float32
        out[i, :, :SIFT_DIM] = dsift(image, step=step_px, size=bin_px, fast=True, float_descriptors=True)[1]
    rgb -= 128  # in place: no second multi-MB array
    out[:, :, SIFT_DIM:] = _color_stats(rgb, step_px, bin_px) * COLOR_SCALE
    return out
