"""Clusters that should not be each other's negatives in the hashing loss (paper Eq. 2, b-).

Discovery keeps several clusters per concept when merging leaves them apart (on digits about three
per digit). The triplet loss then takes a sibling's code as the hardest negative and pushes codes of
one concept apart. `hash.skip_similar` names such pairs by the cosine similarity of the clusters'
mean features (the trunk's fc7 that W hashes, centred by W's mean); pairs at or above the threshold
are left out of each other's negatives.

Measured on digits (final clusters of a 3-round run, 33 clusters): of the pairs with cosine >= 0.4,
94% are two clusters of the same digit, and they are 71% of all same-digit pairs; each cluster's
nearest cluster is one of the same digit for 85% of clusters. The firing overlap of the final SVMs
(the share of common top firings, merging's similarity) named 3 pairs, 1 of them same-digit: those
SVMs fire on their own members first, so it cannot see siblings.
"""
from __future__ import annotations

import numpy as np
import torch


def similar_pairs(feats: np.ndarray, cluster: np.ndarray, n_clusters: int, threshold: float,
                  block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """feats: (n, d) float centred features of cluster members, cluster: (n,) int64 their clusters ->
    pairs (P, 2) int64 (a < b) whose mean features have cosine >= threshold, and that cosine (P,)."""
    d = feats.shape[1]
    sums = np.zeros((n_clusters, d), np.float64)
    np.add.at(sums, cluster, feats)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    cent = (sums / np.maximum(norms, 1e-12)).astype(np.float32)  # (C, d) unit mean directions
    pairs, cos = [], []
    for lo in range(0, n_clusters, block):  # (block, C) at a time: 30k clusters never make a C x C matrix
        s = cent[lo : lo + block] @ cent.T
        a, b = np.nonzero(s >= threshold)
        a = a + lo
        keep = a < b
        pairs.append(np.stack([a[keep], b[keep]], 1))
        cos.append(s[a[keep] - lo, b[keep]])
    return np.concatenate(pairs).astype(np.int64), np.concatenate(cos).astype(np.float32)


class SkipPairs:
    """The pairs as sorted keys a * C + b (both orders), for a per-batch mask."""

    def __init__(self, pairs: np.ndarray, n_clusters: int, device):
        self.c = n_clusters
        pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
        keys = np.sort(np.r_[pairs[:, 0] * self.c + pairs[:, 1], pairs[:, 1] * self.c + pairs[:, 0]])
        self.keys = torch.from_numpy(keys).to(device)

    def __len__(self) -> int:
        return len(self.keys) // 2

    def mask(self, anchor: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """anchor: (B,), cand: (M,) int64 clusters -> (B, M) bool, True where the pair is skipped."""
        q = anchor[:, None] * self.c + cand[None, :]
        if len(self.keys) == 0:
            return torch.zeros_like(q, dtype=torch.bool)
        at = torch.searchsorted(self.keys, q).clamp(max=len(self.keys) - 1)
        return self.keys[at] == q
