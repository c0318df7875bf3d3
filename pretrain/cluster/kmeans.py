"""k-means with FAISS (paper sec. 3.1: the discriminative clustering starts from k-means).

FAISS can leave clusters empty (DESIGN.md pitfalls); they are dropped and the labels renumbered so
that every label names a real cluster.
"""
from __future__ import annotations

import numpy as np


def faiss_gpus() -> int:
    """Number of GPUs a GPU build of FAISS can use here (0 for faiss-cpu)."""
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


INITS = ("kmeans++", "afkmc2", "random")  # afkmc2: k-means++ quality at a cost that suits 30k centroids


def kmeans(x: np.ndarray, k: int, *, niter: int = 20, seed: int = 0, init: str = "kmeans++",
           gpu: bool | None = None, max_points_per_centroid: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """x: (n, d) float -> centroids (k', d) float32, labels (n,) int64 in [0, k').

    k' <= k: empty clusters are dropped and labels renumbered in order of first centroid index.
    `gpu=None` uses a GPU index when a GPU build of FAISS sees one.
    """
    import faiss

    methods = {"kmeans++": "KMEANS_PLUS_PLUS", "afkmc2": "AFK_MC2", "random": "RANDOM"}
    if init not in methods:
        raise ValueError(f"k-means init must be one of {', '.join(INITS)}, got {init!r}")

    x = np.ascontiguousarray(x, dtype=np.float32)
    if not 1 <= k <= len(x):
        raise ValueError(f"k-means needs 1 <= k <= n points, got k={k}, n={len(x)}")
    gpu = faiss_gpus() > 0 if gpu is None else gpu
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, gpu=bool(gpu), verbose=False,
                      max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1,
                      init_method=getattr(faiss, "ClusteringInitMethod_" + methods[init]))
    km.train(x)
    _, assign = km.index.search(x, 1)
    return drop_empty(km.centroids, assign[:, 0].astype(np.int64))


def drop_empty(centroids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keeps the centroids that own at least one point; labels renumbered to 0..k'-1."""
    used = np.bincount(labels, minlength=len(centroids)) > 0
    renumber = np.cumsum(used) - 1
    return np.ascontiguousarray(centroids[used], np.float32), renumber[labels].astype(np.int64)


def nearest_members(x: np.ndarray, k: int, coverage: float = 1.0, *, seed: int = 0, niter: int = 20,
                    init: str = "kmeans++") -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    """k-means clusters as the discovery's cluster lists (the k-means+CNN ablation, paper Table 5), cut
    to `coverage`: each cluster keeps the share `coverage` of its points nearest its centroid.

    x: (n, d) float -> members (rows, nearest first), scores (their x.c - |c|^2 / 2), and the linear
    scorer of nearest-centroid assignment, weights (k', d) = centroids, bias (k',) = -|c|^2 / 2
    (argmax_c w_c.x + b_c = argmin_c |x - c|), so these clusters fit where SVM clusters go."""
    x = np.ascontiguousarray(x, np.float32)
    centroids, labels = kmeans(x, k, niter=niter, seed=seed, init=init)
    bias = -0.5 * (centroids * centroids).sum(1)
    score = (x * centroids[labels]).sum(1) + bias[labels]  # (n,): the own centroid's score
    members, scores = [], []
    for c in range(len(centroids)):
        rows = np.flatnonzero(labels == c)
        rows = rows[np.argsort(-score[rows], kind="stable")][: max(1, int(round(coverage * len(rows))))]
        members.append(rows)
        scores.append(score[rows].astype(np.float32))
    return members, scores, centroids, bias.astype(np.float32)
