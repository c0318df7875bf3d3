"""The discovery loop (Singh et al. 2012, with the paper's merging, sec. 3.1), resumable and blockwise.

    D, N  = random halves of the patches (discovery set, natural world), each halved again
    init  : k-means on D1, |D1| / init_divisor clusters; or, in a later round of the cluster <-> CNN
            alternation, the previous round's clusters (their members in D1); clusters with
            < min_init_members dropped
    round : SVMs of the members (in D_t) vs N_t -> fire on the other half D_v -> each cluster's
            top_m firings above -1 are its new members; clusters with < min_members such firings
            are pruned (cross-validation); with min_discriminative > 0, also clusters whose top
            firings on D_v + N_v are not mostly in D (Singh et al.'s discriminativeness); swap halves
    merge : SVMs between the clusters in D fire on D; clusters with overlapping firings are merged
            (pretrain/cluster/merge.py)
    final : SVMs of the merged clusters vs all of N
    cover : the final SVMs fire on every patch; a patch joins its best cluster when it is within
            that cluster's top cover_top_n (default patches / clusters) or scores above cover_min_score
            (pretrain/cluster/cover.py); with cover_score=centroid the cosine to each cluster's mean
            member scores instead, top-n rule only; clusters ranked by their best members' scores

All SVM work runs in blocks of clusters through `mapper` (Ray tasks in the driver, in-process in
tests); a task gets paths and index lists, reads the features memmap itself (a bucket URI through its
node's cache, `infra.storage.local_copy`) and returns small arrays. After every step the state is saved
in `work_dir` (a path or a URI), so a killed run resumes at the step it was in.
"""
from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pretrain.cluster.cover import CoverFold, assign, cover_chunk
from pretrain.cluster.kmeans import kmeans
from pretrain.cluster.merge import merge_clusters
from pretrain.cluster.svm import fire, train_svms
from infra import storage
from infra.storage import atomic_write_json, atomic_write_npz, local_copy
from pretrain.parts import npy_shape

log = logging.getLogger(__name__)


class ClusteringError(ValueError):
    """The loop cannot go on (e.g. every cluster was pruned); the message is one line for the user."""


@dataclass(frozen=True)
class DiscoveryParams:
    natural_fraction: float = 0.5  # share of patches in the natural-world set N
    init_divisor: int = 4  # k-means on D1 with |D1| / init_divisor clusters (Singh et al.'s code)
    max_clusters: int = 30000
    min_init_members: int = 3
    rounds: int = 4
    top_m: int = 5  # top firings on the held-out half that become a cluster's members
    min_members: int = 3  # firings above -1 a cluster needs to survive a round
    # Prune a cluster unless this share of its top firings on held-out D + N falls in D (per patch,
    # so 0.5 means "fires on the natural world as often"). Only meaningful when N is a separate
    # natural-world set; with N a random half of the same data every cluster sits near 0.5.
    min_discriminative: float = 0.0
    discriminative_top: int = 15
    svm_c: float = 0.1  # the paper's C
    svm_tol: float = 1e-4
    cache_size: int = 100000  # hard-negative cache shared by a block's clusters
    mining_rounds: int = 3
    merge_threshold: float = 0.4  # the paper's overlap threshold
    merge_top: int = 20  # firings per cluster compared when merging
    cover: bool = False  # coverage: a patch joins its best cluster within that cluster's top n ...
    cover_top_n: int = 0  # ... (0: patches / clusters, each cluster's fair share) ...
    cover_min_score: float = 1.0  # ... or when it scores above this
    cover_score: str = "svm"  # svm: the final SVMs score the patches | centroid: cosine to the members' mean
    block_clusters: int = 2000  # clusters per task
    cover_rows: int = 65536  # patches per coverage task
    kmeans_iters: int = 20
    kmeans_init: str = "kmeans++"
    device: str = "auto"
    seed: int = 0


@dataclass
class Clusters:
    """Cluster c's members are member_index[offsets[c]:offsets[c+1]] (global patch rows)."""

    member_index: np.ndarray  # (M,) int64
    offsets: np.ndarray  # (C + 1,) int64
    member_score: np.ndarray  # (M,) float32: SVM score when the member was found (held-out half, or coverage)
    weights: np.ndarray | None = None  # (C, d) float32
    bias: np.ndarray | None = None  # (C,) float32

    @classmethod
    def from_lists(cls, members: list[np.ndarray], scores: list[np.ndarray], **kw) -> "Clusters":
        offsets = np.concatenate([[0], np.cumsum([len(m) for m in members])]).astype(np.int64)
        flat = np.concatenate(members).astype(np.int64) if members else np.zeros(0, np.int64)
        fs = np.concatenate(scores).astype(np.float32) if scores else np.zeros(0, np.float32)
        return cls(flat, offsets, fs, **kw)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def members(self) -> list[np.ndarray]:
        return np.split(self.member_index, self.offsets[1:-1])

    def scores(self) -> list[np.ndarray]:
        return np.split(self.member_score, self.offsets[1:-1])

    def save(self, path: Path, meta: dict | list | None = None) -> None:
        """Atomically, as .npz (a path or a URI); `meta` (JSON-able) rides along as text."""
        arrays = {k: v for k, v in asdict(self).items() if v is not None}
        atomic_write_npz(path, **arrays, meta_json=np.array(json.dumps(meta)))

    @classmethod
    def load(cls, path: Path) -> tuple["Clusters", dict | list | None]:
        with np.load(io.BytesIO(storage.to_path(path).read_bytes()), allow_pickle=False) as z:
            meta = json.loads(str(z["meta_json"])) if "meta_json" in z.files else None
            return cls(**{k: z[k] for k in z.files if k != "meta_json"}), meta


def split_sets(n: int, natural_fraction: float, seed: int, natural_rows: np.ndarray | None = None) -> dict:
    """Random D1, D2, N1, N2 (sorted global rows) partitioning range(n). N is `natural_rows` when
    given (a separate natural-world set), else a random `natural_fraction` of the rows."""
    rng = np.random.default_rng(seed)
    if natural_rows is None:
        perm = rng.permutation(n)
        n_nat = int(round(n * natural_fraction))
        d, nat = perm[n_nat:], perm[:n_nat]
    else:
        nat = rng.permutation(np.asarray(natural_rows, np.int64))
        d = rng.permutation(np.setdiff1d(np.arange(n), nat))
    halves = {"D1": d[: len(d) // 2], "D2": d[len(d) // 2 :], "N1": nat[: len(nat) // 2], "N2": nat[len(nat) // 2 :]}
    return {k: np.sort(v) for k, v in halves.items()}


def _features(features: str) -> np.ndarray:
    """The features memmap; a URI through this node's cache (fetched once per node)."""
    return np.load(local_copy(features), mmap_mode="r")


def _split(split: str):
    return np.load(local_copy(split), allow_pickle=False)


def kmeans_task(features: str, split: str, k: int, niter: int, init: str, seed: int) -> np.ndarray:
    """k-means labels of D1 (one task: at scale it wants a GPU node)."""
    with _split(split) as z:
        d1 = z["D1"]
    x = np.asarray(_features(features)[d1], np.float32)
    return kmeans(x, k, niter=niter, init=init, seed=seed)[1]


def block_task(spec: dict) -> dict:
    """One block of clusters: train SVMs (if `members`) and/or fire them (if `fire`).
    spec: features, split (paths), members (flat, offsets) or weights/bias, negatives (split keys, or
    "members": the rows in `negative_rows`, each cluster's own members left out), svm (train_svms
    arguments), fire: {name: (split keys, top_k)} -> name_index, name_score (C, k)."""
    feats = _features(spec["features"])
    with _split(spec["split"]) as z:
        sets = dict(z)
    out: dict = {}
    if "members" in spec:
        flat, offsets = spec["members"]
        members = np.split(flat, offsets[1:-1])
        if spec["negatives"] == "members":  # SVMs between clusters: the others' members are the negatives
            negatives, exclude = spec["negative_rows"], [np.unique(m) for m in members]
        else:
            negatives, exclude = np.concatenate([sets[key] for key in spec["negatives"]]), None
        res = train_svms(feats, members, negatives, exclude=exclude, **spec["svm"])
        out.update(weights=res.weights, bias=res.bias, stats=res.stats)
    else:
        out.update(weights=spec["weights"], bias=spec["bias"], stats={})
    for name, (keys, top_k) in spec.get("fire", {}).items():
        where = np.concatenate([sets[key] for key in keys])
        out[name + "_index"], out[name + "_score"] = fire(feats, where, out["weights"], out["bias"], top_k,
                                                          device=spec["svm"]["device"])
    return out


def cover_task(features: str, rows: np.ndarray, weights: np.ndarray, bias: np.ndarray, top_n: int,
               device: str) -> dict:
    """Coverage scores of the patches `rows` (sorted) against every cluster (pretrain/cluster/cover.py)."""
    return cover_chunk(_features(features), rows, weights, bias, top_n, device=device)


def member_means_task(features: str, member_index: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(C, d) float32: each cluster's mean member feature, L2-normalised (a cosine scorer)."""
    feats = _features(features)
    means = np.stack([np.asarray(feats[np.sort(m)], np.float32).mean(0)
                      for m in np.split(member_index, offsets[1:-1])])
    return means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)


class Discovery:
    """Runs the loop for one features file; `run()` returns the final ranked Clusters.

    `start`: member rows per cluster of the previous round (the alternation's refinement) instead of
    a k-means start.

    `features` and `work_dir` are local paths or bucket URIs: the driver reads only the features'
    header, the tasks read the features themselves (a URI through their node's cache)."""

    def __init__(self, features: Path, work_dir: Path, params: DiscoveryParams, mapper: Callable, key: str,
                 natural_rows: np.ndarray | None = None, start: list[np.ndarray] | None = None):
        self.features, self.work = storage.absolute(features), storage.absolute(work_dir)
        self.p, self.mapper = params, mapper
        self.start = start
        self.separate_natural = natural_rows is not None
        self.n = npy_shape(self.features)[0][0]
        stamp = self.work / "key.json"
        if not stamp.is_file() or json.loads(stamp.read_text()).get("key") != key:
            storage.rmtree(self.work)  # state from another config or other features: start over
        storage.makedirs(self.work)
        atomic_write_json(stamp, {"key": key})
        self.split_path = self.work / "split.npz"
        if not self.split_path.is_file():
            atomic_write_npz(self.split_path, **split_sets(self.n, params.natural_fraction, params.seed, natural_rows))
        with np.load(io.BytesIO(self.split_path.read_bytes()), allow_pickle=False) as z:
            self.sets = dict(z)
        self.history: list[dict] = []  # saved in each step file, so a resumed run keeps it
        self._svm_stats: list[dict] = []

    def _svm_spec(self) -> dict:
        p = self.p
        return {"c": p.svm_c, "tol": p.svm_tol, "cache_size": p.cache_size, "mining_rounds": p.mining_rounds,
                "device": p.device, "seed": p.seed}

    def _blocks(self, clusters: Clusters, **spec) -> dict:
        """Runs block_task over blocks of clusters; concatenates weights, bias, firings."""
        desc = spec.pop("desc")
        if spec.get("negatives") == "members":
            spec["negative_rows"] = np.unique(clusters.member_index)
        specs = []
        for lo in range(0, len(clusters), self.p.block_clusters):
            hi = min(lo + self.p.block_clusters, len(clusters))
            s = {"features": str(self.features), "split": str(self.split_path), "svm": self._svm_spec(), **spec}
            if clusters.weights is None or "negatives" in spec:
                off = clusters.offsets[lo : hi + 1]
                s["members"] = (clusters.member_index[off[0] : off[-1]], off - off[0])
            else:
                s.update(weights=clusters.weights[lo:hi], bias=clusters.bias[lo:hi])
            specs.append((s,))
        results = self.mapper(block_task, specs, desc=desc)
        out = {k: np.concatenate([r[k] for r in results]) for k in results[0] if k != "stats"}
        out["stats"] = [r["stats"] for r in results]
        missed = sum(st.get("violators_outside_cache", 0) for st in out["stats"])
        if missed:  # mining stopped before the cache held every violator: an approximate SVM
            log.warning("%s: %d negatives outside the mining cache still violate a margin; raise "
                        "cluster.cache_size or cluster.mining_rounds for the exact SVMs", desc, missed)
        return out

    def step_path(self, step: int) -> Path:
        return self.work / f"step{step}.npz"

    def _init(self) -> Clusters:
        d1 = self.sets["D1"]
        if self.start is not None:  # refine the previous round's clusters: their members in D1
            members = [np.intersect1d(m, d1) for m in self.start]
            members = [m for m in members if len(m) >= self.p.min_init_members]
            return Clusters.from_lists(members, [np.zeros(len(m), np.float32) for m in members])
        k = min(self.p.max_clusters, len(d1) // self.p.init_divisor)
        if k < 1:
            raise ClusteringError(f"clustering: {len(d1)} patches in D1 give no k-means cluster at "
                                  f"init_divisor {self.p.init_divisor}; give the run more patches")
        (labels,) = self.mapper(kmeans_task, [(str(self.features), str(self.split_path), k, self.p.kmeans_iters,
                                                self.p.kmeans_init, self.p.seed)], desc="k-means")
        order = np.argsort(labels, kind="stable")  # one pass, not one scan of D1 per cluster
        members = np.split(d1[order], np.cumsum(np.bincount(labels))[:-1])
        members = [m for m in members if len(m) >= self.p.min_init_members]
        return Clusters.from_lists(members, [np.zeros(len(m), np.float32) for m in members])

    def _round(self, clusters: Clusters, r: int) -> Clusters:
        train, held = ("1", "2") if r % 2 == 0 else ("2", "1")
        fires = {"member": (["D" + held], self.p.top_m)}
        if self.p.min_discriminative > 0:
            fires["disc"] = (["D" + held, "N" + held], self.p.discriminative_top)
        out = self._blocks(clusters, negatives=["N" + train], fire=fires, desc=f"svm round {r + 1}/{self.p.rounds}")
        keep = (out["member_score"] > -1).sum(1) >= self.p.min_members
        if self.p.min_discriminative > 0:
            keep &= self._discriminativeness(out["disc_index"], held) >= self.p.min_discriminative
        hits = [out["member_score"][c] > -1 for c in range(len(clusters))]
        keep = np.flatnonzero(keep)
        self._svm_stats = out["stats"]
        return Clusters.from_lists([out["member_index"][c][hits[c]] for c in keep],
                                   [out["member_score"][c][hits[c]] for c in keep],
                                   weights=out["weights"][keep], bias=out["bias"][keep])

    def _discriminativeness(self, top_index: np.ndarray, held: str) -> np.ndarray:
        """(C,) per-patch firing rate on D over the rate on D and N; 0.5: no preference for D."""
        d, n = self.sets["D" + held], self.sets["N" + held]
        in_d = np.isin(top_index, d).sum(1) / max(len(d), 1)
        in_n = np.isin(top_index, n).sum(1) / max(len(n), 1)
        return in_d / np.maximum(in_d + in_n, 1e-12)

    def _merge_and_finish(self, clusters: Clusters) -> Clusters:
        def between_svms(members: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            c = Clusters.from_lists(members, [np.zeros(len(m), np.float32) for m in members])
            fired = self._blocks(c, negatives="members", fire={"d": (["D1", "D2"], self.p.merge_top)},
                                 desc="merge: svms between clusters")
            return fired["d_index"], fired["d_score"]

        merged_m, merged_s, groups = merge_clusters(clusters.members(), clusters.scores(), between_svms,
                                                    threshold=self.p.merge_threshold)
        final = self._blocks(Clusters.from_lists(merged_m, merged_s), negatives=["N1", "N2"], desc="final svms")
        self.history.append({"step": "merge", "clusters_before": len(clusters), "clusters": len(merged_m),
                             "svm": final["stats"]})
        return Clusters.from_lists(merged_m, merged_s, weights=final["weights"], bias=final["bias"])

    def _cover(self, clusters: Clusters) -> Clusters:
        """The final SVMs fire on the patches; coverage (pretrain/cluster/cover.py), then ranking. With N a
        random half of the data every patch may join; a separate natural world never does (it is the
        rest of the world a concept is told apart from, not data to learn it from)."""
        p = self.p
        rows = np.arange(self.n) if not self.separate_natural else np.concatenate([self.sets["D1"], self.sets["D2"]])
        rows = np.sort(rows)
        top_n = p.cover_top_n or max(1, round(len(rows) / len(clusters)))
        spans = [rows[lo : lo + p.cover_rows] for lo in range(0, len(rows), p.cover_rows)]
        weights, bias, min_score = clusters.weights, clusters.bias, p.cover_min_score
        if p.cover_score == "centroid":
            weights, bias, min_score = self._member_means(clusters), np.zeros(len(clusters), np.float32), np.inf
        fold = CoverFold(top_n)  # folds each chunk as it arrives: the driver never holds them all
        self.mapper(cover_task, [(str(self.features), span, weights, bias, top_n, p.device) for span in spans],
                    desc="coverage", on_result=fold.add)
        fired = fold.result()
        if p.cover:
            members, scores = assign(rows, fired, top_n=top_n, min_score=min_score)
        else:
            members, scores = clusters.members(), clusters.scores()
        keep = [c for c in range(len(clusters)) if len(members[c]) >= p.min_members]
        rank = sorted(keep, key=lambda c: (-float(np.mean(scores[c][: p.top_m])), c))
        return Clusters.from_lists([members[c] for c in rank], [scores[c] for c in rank],
                                   weights=clusters.weights[rank], bias=clusters.bias[rank])

    def _member_means(self, clusters: Clusters) -> np.ndarray:
        """(C, d) float32: each cluster's mean member feature, L2-normalised (one task reads the features)."""
        (means,) = self.mapper(member_means_task, [(str(self.features), clusters.member_index, clusters.offsets)],
                               desc="coverage: member means")
        return means

    def run(self) -> Clusters:
        last = self.p.rounds + 2  # steps: 0 init, 1..rounds, rounds+1 merged and final, rounds+2 covered
        done = [s for s in range(last + 1) if self.step_path(s).is_file()]
        step = max(done) if done else -1
        if step >= 0:
            log.info("clustering: resuming after step %d of %d", step, last)
            clusters, self.history = Clusters.load(self.step_path(step))
        for s in range(step + 1, last + 1):
            if s == 0:
                clusters = self._init()
            elif s <= self.p.rounds:
                clusters = self._round(clusters, s - 1)
            elif s == self.p.rounds + 1:
                clusters = self._merge_and_finish(clusters)
            else:
                clusters = self._cover(clusters)
            if len(clusters) == 0:
                knobs = ("cluster.min_init_members or cluster.init_divisor" if s == 0 else "cluster.min_members"
                         + (" or cluster.min_discriminative" if self.p.min_discriminative > 0 else ""))
                raise ClusteringError(f"clustering: no cluster survived step {s}; lower {knobs} or give the "
                                      "run more patches")
            sizes = np.diff(clusters.offsets)
            self.history.append({"step": s, "clusters": len(clusters), "mean_members": float(sizes.mean()),
                                 "coverage": len(np.unique(clusters.member_index)) / self.n,
                                 **({"svm": self._svm_stats} if 1 <= s <= self.p.rounds else {})})
            clusters.save(self.step_path(s), meta=self.history)
            log.info("clustering step %d/%d: %d clusters, %.1f members each", s, last, len(clusters), sizes.mean())
        return clusters
