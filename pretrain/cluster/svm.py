"""Batched linear SVMs: every cluster's one-vs-rest SVM trained together as one problem.

For each cluster c, with members P_c and the natural-world negatives N shared by all clusters:

    min_w  0.5 ||w_c||^2 + C sum_{i in P_c} max(0, 1 - w_c.x_i)^2 + C sum_{j in N} max(0, 1 + w_c.x_j)^2

with a constant feature 1 appended to x, so the bias is regularised like the weights (what
`sklearn.svm.LinearSVC` solves with its default `intercept_scaling=1`). The paper uses C = 0.1.

The solver is liblinear's primal method, truncated Newton, batched over clusters: conjugate gradient
on the generalised Hessian I + 2C X_A^T X_A (A: margin violators), so every CG step is two GEMMs
over all clusters at once, then a per-cluster backtracking line search. Negatives are shared, so
their scores for all clusters are one (q, C) matrix; each member row belongs to one cluster.

Hard-negative mining (`train_svms`) keeps a cache of negatives shared by all clusters. Negatives
outside the cache that score below -1 for every cluster add nothing to any objective, so when a scan
of all of N finds no violator outside the cache, the result is the SVM over all of N.

`exclude` leaves some negatives out of some clusters' problems: merging trains SVMs between the
clusters (paper sec. 3.1), where the negatives are the other clusters' members, so each cluster's own
members are shared negatives it must not see. Excluded (negative, cluster) pairs get a score far
below -1: no hinge, no gradient, no Hessian term, exactly as if the row were absent for that cluster.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def rows(feats, index: np.ndarray, device: torch.device) -> torch.Tensor:
    """feats[index] as float32 with a constant 1 column appended: (len(index), d + 1)."""
    index = np.asarray(index, np.int64)
    x = torch.from_numpy(np.asarray(feats[np.sort(index)] if len(index) else feats[:0], np.float32))
    if len(index):  # memmaps read faster in order; restore the order asked for
        x = x[torch.from_numpy(np.argsort(np.argsort(index, kind="stable"), kind="stable"))]
    return torch.cat([x, torch.ones(len(x), 1)], 1).to(device)


FAR = -1e4  # the score of an excluded (negative, cluster) pair: well past the margin at -1


class _Problem:
    """Objective, gradient and Hessian-vector products of all clusters' SVMs.

    pos: (p, D) member rows, pos_cluster: (p,) their clusters, neg: (q, D) shared negatives,
    excl: None or (rows (e,), clusters (e,)) int64 pairs of negatives a cluster does not see."""

    def __init__(self, pos, pos_cluster, neg, n_clusters: int, c: float, excl=None):
        self.pos, self.pc, self.neg, self.k, self.c, self.excl = pos, pos_cluster, neg, n_clusters, c, excl

    def subset(self, clusters: torch.Tensor) -> "_Problem":
        """The problem of some clusters only (their members re-indexed), sharing the negatives."""
        keep = torch.zeros(self.k, dtype=torch.bool, device=self.pc.device)
        keep[clusters] = True
        rows = keep[self.pc]
        renumber = torch.full((self.k,), -1, dtype=torch.int64, device=self.pc.device)
        renumber[clusters] = torch.arange(len(clusters), device=self.pc.device)
        excl = None
        if self.excl is not None:
            kept = keep[self.excl[1]]
            excl = (self.excl[0][kept], renumber[self.excl[1][kept]])
        return _Problem(self.pos[rows], renumber[self.pc[rows]], self.neg, len(clusters), self.c, excl)

    def _per_cluster(self, values: torch.Tensor) -> torch.Tensor:  # (p,) -> (C,) sums
        return torch.zeros(self.k, dtype=values.dtype, device=values.device).index_add_(0, self.pc, values)

    def margins(self, w):
        """(q, C) negative scores (FAR where excluded) and (p,) member scores."""
        zn = self.neg @ w.T
        if self.excl is not None:
            zn[self.excl] = FAR
        return zn, (self.pos * w[self.pc]).sum(1)

    def loss(self, w, zn, zp):
        hn, hp = (1 + zn).clamp(min=0), (1 - zp).clamp(min=0)
        return 0.5 * (w * w).sum(1) + self.c * ((hn * hn).sum(0) + self._per_cluster(hp * hp))

    def grad(self, w, zn, zp):
        hn, hp = (1 + zn).clamp(min=0), (1 - zp).clamp(min=0)
        pos_term = torch.zeros_like(w).index_add_(0, self.pc, hp[:, None] * self.pos)
        return w + 2 * self.c * (hn.T @ self.neg - pos_term)

    def hess_vec(self, v, active_neg, active_pos):
        """Generalised Hessian times v, per cluster: (C, D) -> (C, D)."""
        vn = (self.neg @ v.T) * active_neg
        vp = (self.pos * v[self.pc]).sum(1) * active_pos
        pos_term = torch.zeros_like(v).index_add_(0, self.pc, vp[:, None] * self.pos)
        return v + 2 * self.c * (vn.T @ self.neg + pos_term)


def _cg(prob: _Problem, g, active_neg, active_pos, max_iter: int, eta: float = 0.1):
    """Batched conjugate gradient for H s = -g, each cluster stopping on its own residual."""
    s = torch.zeros_like(g)
    r = -g.clone()
    p = r.clone()
    rr = (r * r).sum(1)
    stop = eta * eta * rr
    for _ in range(max_iter):
        live = rr > stop
        if not live.any():
            break
        hp = prob.hess_vec(p, active_neg, active_pos)
        alpha = torch.where(live, rr / (p * hp).sum(1).clamp(min=1e-30), torch.zeros_like(rr))
        s += alpha[:, None] * p
        r -= alpha[:, None] * hp
        rr_new = (r * r).sum(1)
        p = r + (rr_new / rr.clamp(min=1e-30))[:, None] * p
        rr = torch.where(live, rr_new, rr)
    return s


def fit_svms(pos, pos_cluster, neg, n_clusters: int, *, c: float = 0.1, tol: float = 1e-4,
             max_newton: int = 50, max_cg: int = 50, w0: torch.Tensor | None = None,
             excl: tuple | None = None) -> tuple[torch.Tensor, dict]:
    """Trains all clusters' SVMs. pos: (p, D) float32 member rows (last column 1), pos_cluster: (p,)
    int64, neg: (q, D) shared negatives, excl: (rows, clusters) pairs a cluster does not see.
    Returns w: (C, D) float32 and stats (newton steps, converged).

    A cluster stops when its gradient norm is below `tol` times its norm at w = 0 (liblinear's rule);
    later Newton steps work on the clusters still going only, so their GEMMs shrink."""
    prob = _Problem(pos, pos_cluster, neg, n_clusters, c, excl)
    w = torch.zeros(n_clusters, pos.shape[1], device=pos.device) if w0 is None else w0.clone()
    g0 = prob.grad(torch.zeros_like(w), *prob.margins(torch.zeros_like(w))).norm(dim=1)
    live = torch.arange(n_clusters, device=w.device)
    steps = 0
    for steps in range(1, max_newton + 1):
        sub = prob if len(live) == n_clusters else prob.subset(live)
        wl = w[live]
        zn, zp = sub.margins(wl)
        g = sub.grad(wl, zn, zp)
        going = g.norm(dim=1) > tol * g0[live]
        if not going.any():
            live, steps = live[:0], steps - 1
            break
        if not going.all():  # drop the converged clusters from this and later steps
            live, g, wl = live[going], g[going], wl[going]
            sub = prob.subset(live)
            zn, zp = sub.margins(wl)
        s = _cg(sub, g, (zn > -1).float(), (zp < 1).float(), max_cg)
        w[live] = wl + _line_search(sub, wl, s, g, zn, zp)[:, None] * s
    return w, {"newton_steps": steps, "converged": n_clusters - len(live), "clusters": n_clusters}


def _line_search(prob: _Problem, w, s, g, zn, zp, shrink: float = 0.5, tries: int = 30):
    """Per-cluster Armijo backtracking along s; the margins along s cost one GEMM, then each trial
    step is elementwise."""
    sn, sp = prob.margins(s)
    f0 = prob.loss(w, zn, zp)
    slope = (g * s).sum(1)
    t = torch.ones(len(w), device=w.device)
    ok = torch.zeros(len(w), dtype=torch.bool, device=w.device)
    for _ in range(tries):
        ft = prob.loss(w + t[:, None] * s, zn + t * sn, zp + t[prob.pc] * sp)
        ok |= ft <= f0 + 1e-4 * t * slope
        if ok.all():
            break
        t = torch.where(ok, t, t * shrink)
    return torch.where(ok, t, torch.zeros_like(t))


@dataclass
class SvmResult:
    weights: np.ndarray  # (C, d) float32
    bias: np.ndarray  # (C,) float32
    stats: dict


def train_svms(feats, members: list[np.ndarray], negatives: np.ndarray, *, c: float = 0.1,
               cache_size: int = 20000, mining_rounds: int = 5, tol: float = 1e-4, chunk: int = 65536,
               device: str = "auto", seed: int = 0, exclude: list[np.ndarray] | None = None) -> SvmResult:
    """One SVM per cluster: members (global row indices into feats) vs the negatives, with
    hard-negative mining over a shared cache. feats: (n, d) array-like (a float16 memmap is fine).
    exclude: per cluster, global rows left out of its negatives (e.g. its own members)."""
    dev = pick_device(device)
    k = len(members)
    if k == 0:
        return SvmResult(np.zeros((0, feats.shape[1]), np.float32), np.zeros(0, np.float32), {"clusters": 0})
    pos = rows(feats, np.concatenate(members), dev)
    pc = torch.from_numpy(np.repeat(np.arange(k), [len(m) for m in members])).to(dev)
    negatives = np.unique(np.asarray(negatives, np.int64))  # sorted, as every cache below
    rng = np.random.default_rng(seed)
    cache = negatives if len(negatives) <= cache_size else np.sort(rng.choice(negatives, cache_size // 2,
                                                                               replace=False))
    w, stats, rounds, missed = None, {}, 0, 0
    for rounds in range(1, mining_rounds + 1):
        w, stats = fit_svms(pos, pc, rows(feats, cache, dev), k, c=c, tol=tol, w0=w,
                            excl=_excluded(cache, exclude, dev))
        if len(cache) == len(negatives):
            break
        outside = np.setdiff1d(negatives, cache, assume_unique=True)
        worst = _max_scores(feats, outside, w, dev, chunk, exclude)
        missed = int((worst > -1).sum())  # violators outside the cache: 0 means exact
        if missed == 0 or rounds == mining_rounds:
            break
        in_cache = _max_scores(feats, cache, w, dev, chunk, exclude)
        keep = cache[in_cache > -1] if len(cache) + missed > cache_size else cache
        room = cache_size - len(keep)
        if room <= 0:  # every cached negative is a support vector: the cache is too small
            break
        hard = outside[np.argsort(-worst, kind="stable")[: min(room, missed)]]
        cache = np.sort(np.concatenate([keep, hard]))
    w = w.float().cpu().numpy()
    stats = stats | {"mining_rounds": rounds, "negatives_cached": int(len(cache)),
                     "negatives": int(len(negatives)), "violators_outside_cache": missed}
    return SvmResult(np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, -1]), stats)


def _excluded(index: np.ndarray, exclude: list[np.ndarray] | None, dev) -> tuple | None:
    """(positions in the sorted `index`, clusters) int64 tensors of the excluded pairs it holds."""
    if exclude is None:
        return None
    cluster = np.repeat(np.arange(len(exclude)), [len(e) for e in exclude])
    flat = np.concatenate(exclude).astype(np.int64) if len(exclude) else np.zeros(0, np.int64)
    at = np.minimum(np.searchsorted(index, flat), max(len(index) - 1, 0))
    hit = (index[at] == flat) if len(index) else np.zeros(len(flat), bool)
    return torch.from_numpy(at[hit]).to(dev), torch.from_numpy(cluster[hit]).to(dev)


def _max_scores(feats, index: np.ndarray, w: torch.Tensor, dev, chunk: int,
                exclude: list[np.ndarray] | None = None) -> np.ndarray:
    """(len(index),) each row's highest score over the clusters that see it (sorted `index`)."""
    out = []
    for i in range(0, len(index), chunk):
        part = index[i : i + chunk]
        s = rows(feats, part, dev) @ w.T  # (chunk, C)
        excl = _excluded(part, exclude, dev)
        if excl is not None:
            s[excl] = FAR
        out.append(s.amax(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def fire(feats, index: np.ndarray, weights: np.ndarray, bias: np.ndarray, top_k: int, *,
         chunk: int = 65536, device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Each cluster's `top_k` highest-scoring rows among feats[index].
    Returns top_index: (C, k) int64 global row indices and top_score: (C, k) float32, best first."""
    dev = pick_device(device)
    index = np.asarray(index, np.int64)
    w = torch.from_numpy(np.concatenate([weights, bias[:, None]], 1).astype(np.float32)).to(dev)
    k = min(top_k, len(index))
    best_s = torch.full((len(w), 0), -torch.inf, device=dev)
    best_i = torch.zeros((len(w), 0), dtype=torch.int64, device=dev)
    for i in range(0, len(index), chunk):
        part = torch.from_numpy(index[i : i + chunk]).to(dev)
        s = w @ rows(feats, index[i : i + chunk], dev).T  # (C, chunk), contiguous per cluster
        best_s, best_i = keep_top(best_s, best_i, s, part, k)
    return best_i.cpu().numpy(), best_s.cpu().numpy()


def keep_top(best_s: torch.Tensor, best_i: torch.Tensor, s: torch.Tensor, part: torch.Tensor, k: int):
    """Each cluster's k best of its kept scores best_s (C, j) with rows best_i (C, j) and new scores
    s (C, m) of the rows `part` (m,) -> best_s, best_i (C, min(k, j + m)), best first. The new rows'
    indices are looked up, not broadcast to (C, m) (that int64 copy cost more than the scores)."""
    both = torch.cat([best_s, s], 1)
    best_s, pick = both.topk(min(k, both.shape[1]), dim=1)
    j = best_i.shape[1]
    if j == 0:
        return best_s, part[pick]
    return best_s, torch.where(pick < j, best_i.gather(1, pick.clamp(max=j - 1)), part[(pick - j).clamp(min=0)])
