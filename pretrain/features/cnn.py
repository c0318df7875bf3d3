"""CNN features of patches, for the clustering rounds after the first (paper sec. 3.1: the clustering
and CNN feature learning alternate; CNN features replace the init features).

A trained trunk (`pretrain.models.weights`) maps each un-augmented patch to one layer's activations
(fc7 by default); they are PCA-whitened to the clustering dimension like the init features, so the
stage-2 code runs unchanged on them. The fitted encoder records the model file's checksum, so a
retrained model is never paired with a stale whitening.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from pretrain.features.fisher import FisherEncoder, fit_whitening
from pretrain.models.weights import load_trunk
from pretrain.models.inputs import to_input

BATCH = 256


@lru_cache(maxsize=2)
def _trunk(model_path: str, model_sha256: str):  # the checksum is part of the cache key
    # a bucket URI is read through this node's cache, keyed (and checked) by the checksum
    trunk, _ = load_trunk(model_path, "cuda" if torch.cuda.is_available() else "cpu", sha256=model_sha256)
    return trunk


@torch.no_grad()
def cnn_features(patches: np.ndarray, *, model_path: str, model_sha256: str, layer: str) -> np.ndarray:
    """patches: (N, P, P, 3) uint8 -> (N, F) float32 activations of `layer` (e.g. "fc7")."""
    trunk = _trunk(model_path, model_sha256)
    device = next(trunk.parameters()).device
    out = []
    for s in range(0, len(patches), BATCH):
        x = to_input(torch.from_numpy(np.ascontiguousarray(patches[s : s + BATCH])).to(device))
        out.append(trunk.features(x, layer).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def fit_cnn_encoder(sample_patches: np.ndarray, *, model_path: str, model_sha256: str, layer: str, out_dim: int,
                    seed: int, whiten_reg: float = 1.0) -> FisherEncoder:
    """sample_patches: (N, P, P, 3) uint8 -> a fitted kind="cnn" encoder (whitening of `layer`)."""
    raw = cnn_features(sample_patches, model_path=model_path, model_sha256=model_sha256, layer=layer)
    white_mean, white_proj = fit_whitening(raw, out_dim, seed=seed, reg=whiten_reg)
    settings = dict(model_path=model_path, model_sha256=model_sha256, layer=layer, out_dim=out_dim, seed=seed,
                    whiten_reg=whiten_reg, fit_patches=len(sample_patches))
    none1, none2 = np.zeros(0, np.float32), np.zeros((0, 0), np.float32)  # no descriptor PCA, no GMM
    return FisherEncoder("cnn", settings, none1, none2, none2, none2, none1, white_mean, white_proj)
