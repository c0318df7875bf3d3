"""The clustering stage as a run-directory step: config -> DiscoveryParams -> `clusters/roundR.npz`.

`clusters/roundR.npz` (loads with allow_pickle=False) is what the training stage reads:
    member_index (M,) int64   global patch rows (shards.json order), cluster c's members are
    offsets (C+1,) int64      member_index[offsets[c]:offsets[c+1]], best first
    member_key (M,) str       the members' patch keys "source@x0,y0,x1,y1" (survive a re-shard)
    member_score (M,) float32 each member's SVM score on the half it was found in (held out)
    weights (C, d), bias (C,) float32  the cluster SVMs on the round's features
    rank_score (C,) float32   mean held-out score of the top members; clusters are sorted by it
Clusters are the training stage's classes; it samples members uniformly per cluster and makes the
paper's 20 augmented views of each from the patch pixels (PatchStore.get(member_index)).
`clusters/roundR.json` summarises the run (counts per step, SVM statistics, purity/NMI if labelled).
"""
from __future__ import annotations

import fnmatch
import logging
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Callable

import numpy as np

from pretrain.cluster.discover import Clusters, ClusteringError, Discovery, DiscoveryParams
from pretrain.config import Config, config_hash, to_dict
from pretrain.eval.clusters import montage, nmi, purity
from pretrain.figures import save_png
from pretrain.rundir import RunDir, StageResult
from shards.fsutil import atomic_write_json, atomic_write_npz
from shards.shardset import ShardError, patch_key
from shards.store import PatchStore

log = logging.getLogger(__name__)

NOT_HASHED = ("gpus_per_task", "montage_clusters", "montage_members")


def discovery_params(cfg: Config) -> DiscoveryParams:
    names = {f.name for f in fields(DiscoveryParams)}
    kw = {k: v for k, v in to_dict(cfg.cluster).items() if k in names}
    return DiscoveryParams(**kw, seed=cfg.run.seed, device="auto")


def natural_rows(store: PatchStore, pattern: str) -> np.ndarray:
    """Global rows of the patches whose source key matches the glob `pattern` (the natural world)."""
    keys = [m["key"] for m in store.meta(np.arange(len(store)))]
    rows = np.flatnonzero([fnmatch.fnmatchcase(k, pattern) for k in keys])
    if len(rows) == 0 or len(rows) == len(keys):
        raise ClusteringError(f"cluster.natural_world {pattern!r} matches {len(rows)} of {len(keys)} patches "
                              f"(source keys look like {keys[0]!r}); it must name some but not all")
    log.info("natural world: %d of %d patches match %r", len(rows), len(keys), pattern)
    return rows


def write_clusters(path: Path, clusters: Clusters, store: PatchStore, top_m: int) -> np.ndarray:
    """Writes the cluster file (module docstring); returns the members' labels (-1: none)."""
    meta = store.meta(clusters.member_index)
    keys = np.array([patch_key(m["key"], m["box"]) for m in meta], dtype=np.str_)
    labels = np.array([m["label"] for m in meta], np.int64)
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


def cluster_stage(cfg: Config, run: RunDir, shards_root: Path, mapper: Callable, *, round_: int = 0,
                  features_stage: str = "features", force: bool = False) -> StageResult:
    """Stage 2 for one round: discriminative clustering of `features/roundR.npy`."""
    name = f"cluster_round{round_}"
    features = run.path / "features" / f"round{round_}.npy"
    # resources and figures do not change the clusters: changing them must not redo hours of work
    config = {k: v for k, v in to_dict(cfg.cluster).items() if k not in NOT_HASHED} | {"seed": cfg.run.seed}
    inputs = {"features": run.outputs_fingerprint(features_stage)}
    out = run.path / "clusters" / f"round{round_}.npz"

    def work():
        params = discovery_params(cfg)
        key = config_hash({"config": config, "inputs": inputs})
        store = PatchStore(shards_root)
        natural = natural_rows(store, cfg.cluster.natural_world) if cfg.cluster.natural_world else None
        disc = Discovery(features, out.with_suffix(".work"), params, mapper, key=key, natural_rows=natural)
        clusters = disc.run()
        labels = write_clusters(out, clusters, store, params.top_m)
        sizes = np.diff(clusters.offsets)
        scores = evaluate(clusters, labels)
        steps = disc.history
        if scores:  # labelled shards: how purity moved step by step (k-means, rounds, merge)
            steps = [h | _step_scores(disc, h["step"], store) for h in steps]
        summary = {"round": round_, "clusters": len(clusters), "members": int(sizes.sum()),
                   "members_per_cluster": {"mean": float(sizes.mean()), "min": int(sizes.min()),
                                           "max": int(sizes.max())},
                   "patches": disc.n, "steps": steps, **scores}
        atomic_write_json(out.with_suffix(".json"), summary)
        try:
            fig = montage(store.get, clusters.members(), cfg.cluster.montage_clusters, cfg.cluster.montage_members)
            save_png(run.path / "figures" / f"clusters_round{round_}.png", fig)
        except ShardError as exc:  # a figure never stops a run
            log.warning("cluster montage skipped: %s", exc)
        log.info("clusters round %d: %d clusters, %d members%s", round_, len(clusters), sizes.sum(),
                 f", purity {summary['purity']:.3f}, NMI {summary['nmi']:.3f}" if "purity" in summary else "")
        return {str(out): None, str(out.with_suffix(".json")): None}

    result = run.run_stage(name, work, config=config, inputs=inputs, force=force)
    shutil.rmtree(out.with_suffix(".work"), ignore_errors=True)  # recorded: the resume state is done with
    return result
