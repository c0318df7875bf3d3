"""Merging clusters whose detectors fire on the same patches (paper sec. 3.1, change 1).

"The merging starts with training SVM classifiers again but between the clusters in D this time.
Using the firing score as a similarity metric, we greedily combine the most overlapping pair of
clusters (threshold 0.4) until no changes can be made." (`merge_clusters`)

So each cluster gets an SVM of its members against the members of every other cluster: two clusters
of one concept cannot be told apart that way and keep firing on each other's patches, while SVMs
trained against the natural world N fire on every instance of a concept and so on both clusters of
it and on a neighbouring concept alike (on digits, one chained merge of two different digits took
member purity from 0.983 to 0.962 that way). Each SVM then fires on D; a cluster's firing set is its
top-k detections, and the similarity of two clusters is the share of firings they have in common,
|F_a & F_b| / k. The most overlapping pair is merged while that share is above the threshold (paper:
0.4); a merged cluster fires where either part fires most confidently (its top-k of the union, by
score), so firing sets keep size k and a growing cluster does not swallow its neighbours by size alone.
"""
from __future__ import annotations

import heapq
from collections import defaultdict
from typing import Callable

import numpy as np


def merge_clusters(members: list[np.ndarray], scores: list[np.ndarray], between_svms: Callable, *,
                   threshold: float = 0.4) -> tuple[list[np.ndarray], list[np.ndarray], list[list[int]]]:
    """The paper's merge step. members, scores: per cluster, (m_c,) global rows and their scores.
    between_svms(members) -> (fire_index (C, k) int64, fire_score (C, k) float32): each cluster's SVM
    trained against the other clusters' members in D, and its top-k firings on D.
    -> merged members and scores (best first; a patch in several parts keeps its best score), and
    the groups of original cluster ids they came from."""
    fire_index, fire_score = between_svms(members)
    groups = greedy_merge(fire_index, fire_score, threshold)
    merged_m, merged_s = [], []
    for g in groups:
        idx, sc = np.concatenate([members[c] for c in g]), np.concatenate([scores[c] for c in g])
        order = np.argsort(-sc, kind="stable")
        uniq, first = np.unique(idx[order], return_index=True)
        best_first = np.argsort(first)
        merged_m.append(uniq[best_first])
        merged_s.append(sc[order][first][best_first])
    return merged_m, merged_s, groups


def _top(index: np.ndarray, score: np.ndarray, k: int) -> dict[int, float]:
    best: dict[int, float] = {}
    for i, s in zip(index.tolist(), score.tolist()):
        if s > best.get(i, -np.inf):
            best[i] = s
    return dict(sorted(best.items(), key=lambda kv: -kv[1])[:k])


def greedy_merge(fire_index: np.ndarray, fire_score: np.ndarray, threshold: float = 0.4) -> list[list[int]]:
    """fire_index, fire_score: (C, k) each cluster's top-k detections (global row, score).
    Returns groups of original cluster ids (each sorted; groups ordered by their smallest id)."""
    n, k = fire_index.shape
    firing = {c: _top(fire_index[c], fire_score[c], k) for c in range(n)}
    groups = {c: [c] for c in range(n)}
    where = defaultdict(set)  # patch -> clusters firing on it
    for c, f in firing.items():
        for i in f:
            where[i].add(c)
    version = dict.fromkeys(range(n), 0)
    heap: list = []

    def push_pairs(a: int) -> None:
        shared = defaultdict(int)
        for i in firing[a]:
            for b in where[i]:
                if b != a:
                    shared[b] += 1
        for b, count in shared.items():
            overlap = count / k
            if overlap > threshold:
                lo, hi = min(a, b), max(a, b)
                heapq.heappush(heap, (-overlap, lo, hi, version[lo], version[hi]))

    for c in range(n):
        push_pairs(c)
    while heap:
        _, a, b, va, vb = heapq.heappop(heap)
        if a not in groups or b not in groups or version[a] != va or version[b] != vb:
            continue  # a stale pair: one side has merged since it was scored
        for i in firing[b]:
            where[i].discard(b)
        for i in firing[a]:
            where[i].discard(a)
        both = {**firing[b], **{i: max(s, firing[b].get(i, -np.inf)) for i, s in firing[a].items()}}
        firing[a] = dict(sorted(both.items(), key=lambda kv: -kv[1])[:k])
        for i in firing[a]:
            where[i].add(a)
        groups[a] += groups.pop(b)
        del firing[b]
        version[a] += 1
        push_pairs(a)
    return sorted(sorted(g) for g in groups.values())
