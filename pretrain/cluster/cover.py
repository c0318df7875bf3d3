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
best cluster and score, per cluster its top-n scores and rows within the chunk. The driver folds each
chunk's result into one running top-n as it arrives (`CoverFold`), so it holds O(patches) numbers, not
chunks x clusters x top_n (at 12.8M patches and 30k clusters, 196 chunks of 154 MB). A task scores its
rows in slices of at most SCORE_BUDGET (row, cluster) pairs, so its memory does not grow with the
number of clusters.
"""
from __future__ import annotations

import numpy as np
import torch

from pretrain.cluster.svm import keep_top, pick_device, rows

SCORE_BUDGET = 1 << 26  # (row, cluster) scores a task holds at once: 256 MB of float32


def cover_chunk(feats, index: np.ndarray, weights: np.ndarray, bias: np.ndarray, top_n: int, *,
                device: str = "auto", chunk: int = 65536) -> dict:
    """Scores feats[index] with every cluster. index: (n,) int64 global rows ->
    {"best": (n,) int64 cluster, "best_score": (n,) float32, "top_index": (C, t) int64 global rows,
    "top_score": (C, t) float32}, t = min(top_n, n), each cluster's best rows in this chunk."""
    dev = pick_device(device)
    index = np.asarray(index, np.int64)
    w = torch.from_numpy(np.concatenate([weights, bias[:, None]], 1).astype(np.float32)).to(dev)
    t = min(top_n, len(index))
    chunk = max(256, min(chunk, SCORE_BUDGET // max(len(w), 1)))
    best, best_score = [], []
    top_s = torch.full((len(w), 0), -torch.inf, device=dev)
    top_i = torch.zeros((len(w), 0), dtype=torch.int64, device=dev)
    for lo in range(0, len(index), chunk):
        part = index[lo : lo + chunk]
        s = w @ rows(feats, part, dev).T  # (C, n_part): contiguous per cluster, as the top-n wants it
        score, which = s.max(0)
        best.append(which.cpu().numpy())
        best_score.append(score.cpu().numpy())
        if t:
            top_s, top_i = keep_top(top_s, top_i, s, torch.from_numpy(part).to(dev), t)
    return {"best": np.concatenate(best).astype(np.int64), "best_score": np.concatenate(best_score),
            "top_index": top_i.cpu().numpy(), "top_score": top_s.cpu().numpy().astype(np.float32)}


class CoverFold:
    """`cover_chunk` results folded in as they arrive, in any order: `add(i, part)` for chunk i (it
    empties `part`, so a mapper's list of results keeps nothing), then `result()`, the keys of
    `merge_chunks`. Each fold keeps a cluster's top_n of its kept and new scores (O(patches) a fold)."""

    def __init__(self, top_n: int):
        self.top_n, self.best, self.top_s, self.top_i = top_n, {}, None, None

    def add(self, i: int, part: dict) -> None:
        self.best[i] = (part.pop("best"), part.pop("best_score"))
        s, idx = part.pop("top_score"), part.pop("top_index")
        if self.top_s is not None:
            s, idx = np.concatenate([self.top_s, s], 1), np.concatenate([self.top_i, idx], 1)
        if s.shape[1] > self.top_n:
            keep = np.argpartition(-s, self.top_n - 1, axis=1)[:, : self.top_n]
            s, idx = np.take_along_axis(s, keep, 1), np.take_along_axis(idx, keep, 1)
        self.top_s, self.top_i = s, idx

    def result(self) -> dict:
        """best, best_score over the chunks in chunk order; top_index/top_score best first (ties: lower
        row first; the scores, which the coverage rule uses, do not depend on the order of the folds)."""
        chunks = [self.best[i] for i in sorted(self.best)]
        order = np.lexsort((self.top_i, -self.top_s), axis=1)
        return {"best": np.concatenate([b for b, _ in chunks]), "best_score": np.concatenate([s for _, s in chunks]),
                "top_index": np.take_along_axis(self.top_i, order, 1),
                "top_score": np.take_along_axis(self.top_s, order, 1)}


def merge_chunks(parts: list[dict], top_n: int) -> dict:
    """`cover_chunk` results over disjoint row chunks (in row order) -> the same keys over all rows,
    with top_index/top_score each cluster's top-n over all of them (best first)."""
    fold = CoverFold(top_n)
    for i, part in enumerate(parts):
        fold.add(i, dict(part))
    return fold.result()


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
