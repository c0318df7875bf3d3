"""Merging clusters whose detectors fire on the same patches (paper sec. 3.1, change 1).

Each cluster's SVM fires on the discovery set; a cluster's firing set is its top-k detections. The
similarity of two clusters is the share of firings they have in common, |F_a & F_b| / k. The most
overlapping pair is merged while that share is above the threshold (paper: 0.4); a merged cluster
fires where either part fires most confidently (its top-k of the union, by score), so firing sets
keep size k and a growing cluster does not swallow its neighbours by size alone.
"""
from __future__ import annotations

import heapq
from collections import defaultdict

import numpy as np


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
