"""Coverage: after merging, the final SVMs fire on every patch and each patch may join one cluster.

The discovery loop keeps each cluster's top-m firings on a held-out half (m = 5): tight clusters, but
together they hold a small share of the data (about 15% of digits), and a CNN trained on them sees
little of it. Here every patch i is scored by every cluster's SVM, s_c(i) = w_c . x_i + b_c, and

    i joins c*(i) = argmax_c s_c(i)   when   rank of i among all patches by s_c* <= top_n
                                      or     s_c*(i) > min_score

so a patch goes to the cluster that fires on it best, and only where that cluster is confident about
it relative to the rest of the data (its top n) or in absolute terms (a score threshold; 1 is the
SVM's positive margin). A patch joins at most one cluster. The discovery's default n is the clusters'
fair share of the data, patches / clusters (on digits 41, which covers 71% of the patches).

Work is split into row chunks (`cover_chunk`, one task each) that return small arrays: per patch its
best cluster and score, per cluster its top-n scores and rows within the chunk.
"""
from __future__ import annotations

import numpy as np
import torch

from pretrain.cluster.svm import pick_device, rows


def cover_chunk(feats, index: np.ndarray, weights: np.ndarray, bias: np.ndarray, top_n: int, *,
                device: str = "auto", chunk: int = 65536) -> dict:
    """Scores feats[index] with every cluster. index: (n,) int64 global rows ->
    {"best": (n,) int64 cluster, "best_score": (n,) float32, "top_index": (C, t) int64 global rows,
    "top_score": (C, t) float32}, t = min(top_n, n), each cluster's best rows in this chunk."""
    dev = pick_device(device)
    index = np.asarray(index, np.int64)
    w = torch.from_numpy(np.concatenate([weights, bias[:, None]], 1).astype(np.float32)).to(dev)
    t = min(top_n, len(index))
    best, best_score = [], []
    top_s = torch.full((len(w), 0), -torch.inf, device=dev)
    top_i = torch.zeros((len(w), 0), dtype=torch.int64, device=dev)
    for lo in range(0, len(index), chunk):
        part = index[lo : lo + chunk]
        s = rows(feats, part, dev) @ w.T  # (n_part, C)
        score, which = s.max(1)
        best.append(which.cpu().numpy())
        best_score.append(score.cpu().numpy())
        if t:
            both = torch.cat([top_s, s.T], 1)
            top_s, pick = both.topk(min(t, both.shape[1]), dim=1)
            top_i = torch.cat([top_i, torch.from_numpy(part).to(dev).expand(len(w), -1)], 1).gather(1, pick)
    return {"best": np.concatenate(best).astype(np.int64), "best_score": np.concatenate(best_score),
            "top_index": top_i.cpu().numpy(), "top_score": top_s.cpu().numpy().astype(np.float32)}


def merge_chunks(parts: list[dict], top_n: int) -> dict:
    """`cover_chunk` results over disjoint row chunks (in row order) -> the same keys over all rows,
    with top_index/top_score each cluster's top-n over all of them (best first)."""
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("best", "best_score")}
    idx = np.concatenate([p["top_index"] for p in parts], 1)
    score = np.concatenate([p["top_score"] for p in parts], 1)
    order = np.argsort(-score, axis=1, kind="stable")[:, :top_n]
    out["top_index"] = np.take_along_axis(idx, order, 1)
    out["top_score"] = np.take_along_axis(score, order, 1)
    return out


def assign(index: np.ndarray, fired: dict, *, top_n: int, min_score: float) -> tuple[list, list]:
    """The coverage rule (module docstring). index: (n,) the rows scored, in the order of fired["best"].
    -> members, scores: per cluster, its rows (best first) and their scores; some may be empty."""
    n_clusters, scored = fired["top_score"].shape
    if scored < min(top_n, len(index)):
        raise ValueError(f"coverage needs each cluster's top {top_n} scores, got {scored}")
    if top_n > 0 and scored:
        # the n-th best score of each cluster (its last one when it scored fewer rows)
        floor = fired["top_score"][:, min(top_n, scored) - 1]
    else:
        floor = np.full(n_clusters, np.inf, np.float32)
    best, score = fired["best"], fired["best_score"]
    keep = (score >= floor[best]) | (score > min_score)
    rows_, clusters, scores = np.asarray(index)[keep], best[keep], score[keep]
    order = np.lexsort((-scores, clusters))  # by cluster, best first within it
    bounds = np.searchsorted(clusters[order], np.arange(n_clusters + 1))
    members = [rows_[order[bounds[c] : bounds[c + 1]]] for c in range(n_clusters)]
    member_scores = [scores[order[bounds[c] : bounds[c + 1]]] for c in range(n_clusters)]
    return members, member_scores
