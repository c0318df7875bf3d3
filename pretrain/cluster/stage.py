"""The clustering stage as a run-directory step: config -> DiscoveryParams -> `clusters/roundR.npz`.

`clusters/roundR.npz` (loads with allow_pickle=False) is what the training stage reads:
    member_index (M,) int64   global patch rows (shards.json order), cluster c's members are
    offsets (C+1,) int64      member_index[offsets[c]:offsets[c+1]], best first
    member_key (M,) str       the members' patch keys "source@x0,y0,x1,y1" (survive a re-shard)
    member_score (M,) float32 each member's score by its cluster's final SVM (with coverage), or on
                              the held-out half it was found in (without)
    weights (C, d), bias (C,) float32  the cluster SVMs on the round's features
    rank_score (C,) float32   mean score of the top members; clusters are sorted by it
Clusters are the training stage's classes; it samples members uniformly per cluster and makes the
paper's 20 augmented views of each from the patch pixels (PatchStore.get(member_index)).
`clusters/roundR.json` summarises the run (counts per step, SVM statistics, coverage, and purity/NMI
per step when the shards carry labels, which only score).

`cluster.method=kmeans` replaces the discovery with k-means on the round's features, cut to
`cluster.kmeans_coverage` (the k-means+CNN ablation of the paper's Table 5).
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import fields
from typing import Callable

import numpy as np

from pretrain.cluster.discover import Clusters, ClusteringError, Discovery, DiscoveryParams
from pretrain.cluster.kmeans import nearest_members
from pretrain.config import Config, config_hash, to_dict
from pretrain.eval.clusters import montage, nmi, purity
from pretrain.figures import save_png
from infra import layout, storage
from infra.layout import RunLayout
from infra.rundir import RunDir, StageResult
from infra.storage import atomic_write_json, atomic_write_npz
from shards.shardset import ShardError
from shards.store import PatchStore

log = logging.getLogger(__name__)

NOT_HASHED = ("gpus_per_task", "montage_clusters", "montage_members")


def round_seed(seed: int, round_: int) -> int:
    """The clustering seed of a round: the run's seed in round 0, a fresh split in each later one."""
    return seed if round_ == 0 else int(np.random.SeedSequence([seed, round_]).generate_state(1)[0]) % 2**31


def discovery_params(cfg: Config, round_: int = 0) -> DiscoveryParams:
    names = {f.name for f in fields(DiscoveryParams)}
    kw = {k: v for k, v in to_dict(cfg.cluster).items() if k in names}
    seed = round_seed(cfg.run.seed, round_) if cfg.cluster.reseed_split else cfg.run.seed
    return DiscoveryParams(**kw, seed=seed, device="auto")


def natural_rows(store: PatchStore, pattern: str) -> np.ndarray:
    """Global rows of the patches whose source key matches the glob `pattern` (the natural world). The
    glob is tested once per source image, on the shards' metadata arrays."""
    sources, image = store.sources()
    hit = np.fromiter((fnmatch.fnmatchcase(s, pattern) for s in sources.tolist()), bool, len(sources))
    rows = np.flatnonzero(hit[image])
    if len(rows) == 0 or len(rows) == len(image):
        raise ClusteringError(f"cluster.natural_world {pattern!r} matches {len(rows)} of {len(image)} patches "
                              f"(source keys look like {str(sources[0])!r}); it must name some but not all")
    log.info("natural world: %d of %d patches match %r", len(rows), len(image), pattern)
    return rows


def write_clusters(path, clusters: Clusters, store: PatchStore, top_m: int) -> np.ndarray:
    """Writes the cluster file (module docstring); returns the members' labels (-1: none). Keys and
    labels come from the shards' metadata arrays."""
    keys = np.array(store.keys(clusters.member_index), dtype=np.str_)
    labels = store.labels(clusters.member_index)
    rank = np.array([s[:top_m].mean() for s in clusters.scores()], np.float32)
    atomic_write_npz(path, member_index=clusters.member_index, offsets=clusters.offsets, member_key=keys,
                     member_score=clusters.member_score, weights=clusters.weights, bias=clusters.bias,
                     rank_score=rank)
    return labels


def evaluate(clusters: Clusters, member_labels: np.ndarray) -> dict:
    """Purity and NMI over the members (labels only score, never train); {} without labels."""
    if (member_labels < 0).all():
        return {}
    local = np.split(np.arange(len(member_labels)), clusters.offsets[1:-1])  # positions in member_labels
    return {"purity": purity(local, member_labels), "nmi": nmi(local, member_labels)}


def _step_scores(disc: Discovery, step, store: PatchStore) -> dict:
    if not isinstance(step, int) or not disc.step_path(step).is_file():
        return {}
    clusters, _ = Clusters.load(disc.step_path(step))
    return evaluate(clusters, store.labels(clusters.member_index))


def _kmeans_clusters(cfg: Config, features, seed: int) -> tuple[Clusters, list[dict]]:
    """cluster.method=kmeans: k-means on all patches of the round's features, cut to kmeans_coverage."""
    c = cfg.cluster
    x = np.asarray(np.load(storage.local_copy(features), mmap_mode="r"), np.float32)
    members, scores, w, b = nearest_members(x, min(c.kmeans_clusters, len(x)), c.kmeans_coverage, seed=seed,
                                            niter=c.kmeans_iters, init=c.kmeans_init)
    keep = [i for i, m in enumerate(members) if len(m) >= c.min_members]
    rank = sorted(keep, key=lambda i: (-float(np.mean(scores[i][: c.top_m])), i))
    clusters = Clusters.from_lists([members[i] for i in rank], [scores[i] for i in rank], weights=w[rank],
                                   bias=b[rank])
    coverage = len(np.unique(clusters.member_index)) / len(x)
    return clusters, [{"step": "kmeans", "clusters": len(clusters), "coverage": coverage,
                       "mean_members": float(np.diff(clusters.offsets).mean())}]


def cluster_stage(cfg: Config, run: RunDir, shards_root, mapper: Callable, *, round_: int = 0,
                  features_stage: str = layout.FEATURES, start_stage: str | None = None,
                  force: bool = False) -> StageResult:
    """Stage 2 for one round: discriminative clustering of `features/roundR.npy`. With `start_stage`
    (a later round of the alternation), the discovery starts from that stage's clusters, not k-means."""
    name, lay = layout.cluster_stage(round_), RunLayout(run.path)
    features = lay.features(round_)
    # resources and figures do not change the clusters: changing them must not redo hours of work
    config = {k: v for k, v in to_dict(cfg.cluster).items() if k not in NOT_HASHED} | {"seed": cfg.run.seed,
                                                                                       "round": round_}
    inputs = {"features": run.outputs_fingerprint(features_stage)}
    if start_stage:
        inputs["start"] = run.outputs_fingerprint(start_stage)
    out, summary_path, work_dir = lay.clusters(round_), lay.cluster_summary(round_), lay.cluster_work(round_)

    def work():
        params = discovery_params(cfg, round_)
        store = PatchStore(shards_root)
        if cfg.cluster.method == "kmeans":
            clusters, steps = _kmeans_clusters(cfg, features, params.seed)
            disc = None
        else:
            key = config_hash({"config": config, "inputs": inputs})
            natural = natural_rows(store, cfg.cluster.natural_world) if cfg.cluster.natural_world else None
            start = None
            if start_stage:
                with np.load(storage.local_copy(lay.clusters(round_ - 1)), allow_pickle=False) as z:
                    start = np.split(z["member_index"], z["offsets"][1:-1])
            disc = Discovery(features, work_dir, params, mapper, key=key, natural_rows=natural,
                             start=start)
            clusters = disc.run()
            steps = disc.history
        labels = write_clusters(out, clusters, store, params.top_m)
        sizes = np.diff(clusters.offsets)
        scores = evaluate(clusters, labels)
        if scores and disc is not None:  # labelled shards: how purity moved step by step (init, rounds, merge)
            steps = [h | _step_scores(disc, h["step"], store) for h in steps]
        elif scores:
            steps = [h | scores for h in steps]
        covered = len(np.unique(clusters.member_index))
        summary = {"round": round_, "clusters": len(clusters), "members": int(sizes.sum()),
                   "coverage": covered / len(store),
                   "members_per_cluster": {"mean": float(sizes.mean()), "min": int(sizes.min()),
                                           "max": int(sizes.max())},
                   "patches": len(store), "steps": steps, **scores}
        atomic_write_json(summary_path, summary)
        try:
            fig = montage(store.get, clusters.members(), cfg.cluster.montage_clusters, cfg.cluster.montage_members)
            save_png(lay.figure(f"clusters_round{round_}"), fig)
        except ShardError as exc:  # a figure never stops a run
            log.warning("cluster montage skipped: %s", exc)
        log.info("clusters round %d: %d clusters, %d members (coverage %.2f)%s", round_, len(clusters), sizes.sum(),
                 summary["coverage"],
                 f", purity {summary['purity']:.3f}, NMI {summary['nmi']:.3f}" if "purity" in summary else "")
        return {out: None, summary_path: None}

    result = run.run_stage(name, work, config=config, inputs=inputs, force=force)
    storage.rmtree(work_dir)  # recorded: the resume state is done with
    return result
