"""HOG init features: the paper's choice for small (CIFAR-like) inputs and the k-means+HOG baseline.

VLFeat's UoCTTI HOG (31 values per cell) on the colour patch, flattened per patch, then the same
PCA-whitening as the Fisher vectors; the encoder is a FisherEncoder of kind "hog" with no GMM.
"""
from __future__ import annotations

import numpy as np
from cyvlfeat.hog import hog

from pretrain.features.fisher import FisherEncoder, fit_whitening

HOG_DIM = 31  # UoCTTI: 18 directed + 9 undirected orientations + 4 texture energies


def hog_features(patches: np.ndarray, cell_px: int) -> np.ndarray:
    """patches: (N, P, P, 3) uint8 -> (N, C*C*31) float32, C ~ P / cell_px cells a side, row-major."""
    if patches.ndim != 4 or patches.shape[3] != 3 or patches.dtype != np.uint8:
        raise ValueError(f"patches must be (N, P, P, 3) uint8, got {patches.shape} {patches.dtype}")
    size = patches.shape[1]
    if not 1 <= cell_px <= size // 2:
        raise ValueError(f"cell_px must be in 1..{size // 2} for {size}px patches, got {cell_px}")
    rgb = patches.astype(np.float32) / 255.0
    n_cells = hog(np.zeros((size, size, 3), np.float32), cell_px).shape[0]  # VLFeat rounds P / cell_px
    out = np.empty((len(patches), n_cells * n_cells * HOG_DIM), np.float32)
    for i, image in enumerate(rgb):
        out[i] = hog(image, cell_px).ravel()
    return out


def fit_hog_encoder(sample_patches: np.ndarray, *, cell_px: int, out_dim: int, seed: int,
                    whiten_reg: float = 1.0) -> FisherEncoder:
    """sample_patches: (N, P, P, 3) uint8 -> a fitted kind="hog" encoder (whitening only)."""
    raw = hog_features(sample_patches, cell_px)
    white_mean, white_proj = fit_whitening(raw, out_dim, seed=seed, reg=whiten_reg)
    settings = dict(cell_px=cell_px, out_dim=out_dim, seed=seed, whiten_reg=whiten_reg,
                    fit_patches=len(sample_patches))
    none1, none2 = np.zeros(0, np.float32), np.zeros((0, 0), np.float32)  # no descriptor PCA, no GMM
    return FisherEncoder("hog", settings, none1, none2, none2, none2, none1, white_mean, white_proj)
