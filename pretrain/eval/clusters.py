"""Cluster quality against labels the training never saw (paper sec. 4.2: purity), and the montage
of the top clusters' members (paper Fig. 3).

Purity: the share of cluster members that carry their cluster's majority label. NMI: normalised
mutual information between cluster and label over the same memberships (a patch in two clusters
counts twice). Patches without a label (-1) are left out of both.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import normalized_mutual_info_score

from pretrain.figures import grid


def _memberships(members: list[np.ndarray], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cluster = np.repeat(np.arange(len(members)), [len(m) for m in members])
    label = labels[np.concatenate(members)] if members else np.zeros(0, np.int64)
    known = label >= 0
    return cluster[known], label[known]


def purity(members: list[np.ndarray], labels: np.ndarray) -> float:
    """members: per cluster (m_c,) int row indices; labels: (n,) int, -1 = unknown -> purity in [0, 1]."""
    cluster, label = _memberships(members, labels)
    if len(label) == 0:
        return float("nan")
    table = np.zeros((cluster.max() + 1, label.max() + 1), np.int64)
    np.add.at(table, (cluster, label), 1)
    return float(table.max(1).sum() / len(label))


def nmi(members: list[np.ndarray], labels: np.ndarray) -> float:
    cluster, label = _memberships(members, labels)
    return float(normalized_mutual_info_score(label, cluster)) if len(label) else float("nan")


def montage(patches_of, members: list[np.ndarray], n_clusters: int, n_members: int, pad_px: int = 2) -> np.ndarray:
    """One row per cluster (best first), its first `n_members` members (best first); short rows are
    left white. patches_of: indices -> (n, P, P, 3) uint8 (e.g. PatchStore.get)."""
    rows = members[:n_clusters]
    cols = max(1, min(n_members, max((len(m) for m in rows), default=1)))
    picks = [m[:cols] for m in rows]
    tiles = patches_of(np.concatenate(picks)) if picks else np.zeros((0, 1, 1, 3), np.uint8)
    blank = np.full((cols * len(rows),) + tiles.shape[1:], 255, np.uint8)
    at = np.concatenate([r * cols + np.arange(len(p)) for r, p in enumerate(picks)]) if picks else []
    blank[np.asarray(at, np.int64)] = tiles
    return grid(blank, cols=cols, pad_px=pad_px)
