"""Stage 2: k-means, the batched SVMs against scikit-learn, the discovery loop, merging, resume."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score
from sklearn.svm import LinearSVC

from pretrain.cluster.discover import Clusters, Discovery, DiscoveryParams, split_sets
from pretrain.cluster.kmeans import drop_empty, kmeans
from pretrain.cluster.merge import greedy_merge
from pretrain.cluster.svm import fire, train_svms
from infra.ray_edge import serial_map


def blobs(n_blobs: int, per: int, dim: int, spread: float = 0.1, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.uniform(-3, 3, size=(n_blobs, dim))
    x = np.concatenate([c + spread * rng.normal(size=(per, dim)) for c in centers]).astype(np.float32)
    return x, np.repeat(np.arange(n_blobs), per)


def test_kmeans_recovers_gaussian_blobs():
    x, y = blobs(5, 60, 8)
    centroids, labels = kmeans(x, 5, seed=1)
    assert centroids.shape == (5, 8) and labels.shape == (300,)
    assert normalized_mutual_info_score(y, labels) == pytest.approx(1.0)


def test_drop_empty_renumbers_labels():
    cents = np.arange(12, dtype=np.float32).reshape(4, 3)
    kept, labels = drop_empty(cents, np.array([3, 0, 3, 0]))
    assert np.array_equal(kept, cents[[0, 3]]) and np.array_equal(labels, [1, 0, 1, 0])


def test_kmeans_rejects_more_clusters_than_points():
    with pytest.raises(ValueError, match="k-means needs"):
        kmeans(np.zeros((3, 2), np.float32), 4)


def svm_problem(n_clusters=12, members=8, negatives=1500, dim=24, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, dim))
    pos = [c + 0.8 * rng.normal(size=(members, dim)) for c in centers]
    x = np.concatenate(pos + [rng.normal(size=(negatives, dim))]).astype(np.float32)
    member_rows = [np.arange(c * members, (c + 1) * members) for c in range(n_clusters)]
    return x, member_rows, np.arange(n_clusters * members, len(x))


def test_batched_svms_agree_with_linearsvc():
    x, members, neg = svm_problem()
    ours = train_svms(x, members, neg, c=0.1, tol=1e-5, device="cpu")
    held = np.random.default_rng(9).normal(size=(2000, x.shape[1])).astype(np.float32)
    held[:200] += x[members[0]].mean(0)  # some held-out points near cluster 0
    for c, m in enumerate(members):
        rows = np.concatenate([m, neg])
        y = np.r_[np.ones(len(m)), -np.ones(len(neg))]
        ref = LinearSVC(C=0.1, tol=1e-8, max_iter=100000, dual=False).fit(x[rows], y)
        w_ref = np.r_[ref.coef_[0], ref.intercept_]
        w_ours = np.r_[ours.weights[c], ours.bias[c]]
        assert np.linalg.norm(w_ours - w_ref) <= 1e-2 * np.linalg.norm(w_ref)
        agree = np.sign(held @ ours.weights[c] + ours.bias[c]) == ref.predict(held)
        assert agree.mean() >= 0.99


def test_hard_negative_mining_reaches_the_full_solution():
    x, members, neg = svm_problem(n_clusters=4, negatives=3000, seed=2)
    x[members[0]] += 4  # far from the negatives: few support vectors, so a small cache suffices
    full = train_svms(x, members[:1], neg, tol=1e-6, device="cpu")
    mined = train_svms(x, members[:1], neg, tol=1e-6, cache_size=400, mining_rounds=10, device="cpu")
    assert mined.stats["negatives_cached"] <= 400 and mined.stats["violators_outside_cache"] == 0
    np.testing.assert_allclose(mined.weights, full.weights, atol=1e-3)


def test_mining_with_a_cache_shared_by_many_clusters_reaches_the_full_solution():
    x, members, neg = svm_problem(n_clusters=6, negatives=4000, seed=5)
    for c, m in enumerate(members):
        x[m] += 3 * np.eye(x.shape[1])[c]  # each cluster off in its own direction
    full = train_svms(x, members, neg, tol=1e-6, device="cpu")
    mined = train_svms(x, members, neg, tol=1e-6, cache_size=1500, mining_rounds=10, device="cpu")
    assert mined.stats["negatives_cached"] <= 1500 and mined.stats["violators_outside_cache"] == 0
    np.testing.assert_allclose(mined.weights, full.weights, atol=1e-3)


def test_fire_with_small_chunks_and_more_rows_asked_than_there_are():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    w, b = rng.normal(size=(2, 4)).astype(np.float32), np.zeros(2, np.float32)
    idx, _ = fire(x, np.arange(50), w, b, 10, chunk=3, device="cpu")
    assert np.array_equal(idx[0], np.argsort(-(x @ w[0]))[:10])
    assert fire(x, np.arange(5), w, b, 10, device="cpu")[0].shape == (2, 5)


def test_fire_returns_each_clusters_top_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6)).astype(np.float16)
    w, b = rng.normal(size=(3, 6)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    where = np.sort(rng.choice(500, 300, replace=False))
    idx, score = fire(x, where, w, b, 7, chunk=64, device="cpu")
    s = x[where].astype(np.float32) @ w.T + b
    for c in range(3):
        best = where[np.argsort(-s[:, c])[:7]]
        assert np.array_equal(idx[c], best)
        np.testing.assert_allclose(score[c], np.sort(s[:, c])[::-1][:7], rtol=1e-5)


def test_greedy_merge_joins_duplicates_and_keeps_distinct_clusters():
    rows = np.array([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [10, 11, 12, 13, 14], [0, 1, 12, 13, 14], [20, 21, 22, 23, 24]])
    scores = np.tile(np.linspace(1, 0.5, 5), (5, 1))
    # 0 and 1 fire on the same rows; 3 shares 3 of 5 firings with 2 but only 2 of 5 (not > 0.4) with 0
    assert greedy_merge(rows, scores, 0.4) == [[0, 1], [2, 3], [4]]
    assert greedy_merge(rows, scores, 0.99) == [[0, 1], [2], [3], [4]]


@pytest.mark.parametrize("order", [[0, 1, 2], [1, 2, 0], [2, 0, 1]])
def test_greedy_merge_chains_whatever_the_numbering(order):
    """1 and 2 are duplicates; 0 shares 6 of 10 firings with them: all three end in one group."""
    rows = np.array([list(range(6)) + [50, 51, 52, 53], list(range(10)), list(range(10))])[order]
    assert greedy_merge(rows, np.tile(np.linspace(1, 0.1, 10), (3, 1)), 0.4) == [[0, 1, 2]]


def save_features(tmp_path, x: np.ndarray):
    path = tmp_path / "features.npy"
    np.save(path, x.astype(np.float16))
    return path


def blob_world(seed=0, n_blobs=5, per=80, noise=500, natural=1000, dim=16):
    """D: blobs + uniform noise; N: uniform noise only (the natural world has no blobs)."""
    x, y = blobs(n_blobs, per, dim, spread=0.15, seed=seed)
    rng = np.random.default_rng(seed + 1)
    x = np.concatenate([x, rng.uniform(-4, 4, size=(noise + natural, dim)).astype(np.float32)])
    x = (x - x.mean(0)) / x.std(0)
    labels = np.r_[y, -np.ones(noise + natural, np.int64)]
    return x, labels, np.arange(len(x) - natural, len(x))


@pytest.mark.parametrize("seed", [0, 1])
def test_discovery_keeps_the_blobs_and_drops_the_noise(tmp_path, seed):
    x, labels, natural = blob_world(seed)
    params = DiscoveryParams(min_discriminative=0.7, device="cpu", seed=seed)
    clusters = Discovery(save_features(tmp_path, x), tmp_path / "work", params, serial_map, key="k",
                         natural_rows=natural).run()
    found = set()
    for m in clusters.members():
        major = np.bincount(labels[m] + 1).argmax() - 1
        assert major >= 0 and (labels[m] == major).mean() >= 0.8, f"a noise cluster survived: {labels[m]}"
        found.add(major)
    assert len(found) >= 4  # at most one of the five blobs lost to pruning


def test_duplicated_clusters_are_merged(tmp_path):
    x, labels = blobs(3, 40, 8, seed=4)
    x = (x - x.mean(0)) / x.std(0)
    disc = Discovery(save_features(tmp_path, x), tmp_path / "work", DiscoveryParams(device="cpu"), serial_map, key="k")
    d = np.concatenate([disc.sets["D1"], disc.sets["D2"]])
    members = [d[labels[d] == b][:5] for b in range(3)]
    twice = members + [members[0].copy(), members[1].copy()]
    res = disc._blocks(Clusters.from_lists(twice, [np.zeros(5, np.float32)] * 5), negatives=["N1"], desc="svm")
    clusters = Clusters.from_lists(twice, [np.zeros(5, np.float32)] * 5, weights=res["weights"], bias=res["bias"])
    merged = disc._merge_and_finish(clusters)
    assert len(merged) == 3
    assert sorted(int(labels[m[0]]) for m in merged.members()) == [0, 1, 2]


def test_a_killed_discovery_resumes_at_its_step(tmp_path):
    x, labels, natural = blob_world(0, noise=200, natural=400)
    path = save_features(tmp_path, x)
    params = DiscoveryParams(min_discriminative=0.7, device="cpu")
    clean = Discovery(path, tmp_path / "clean", params, serial_map, key="k", natural_rows=natural).run()

    calls = []

    def dies_in_round_two(fn, args, **kw):
        calls.append(kw["desc"])
        if kw["desc"].startswith("svm round 2"):
            raise KeyboardInterrupt("killed")
        return serial_map(fn, args, **kw)

    with pytest.raises(KeyboardInterrupt):
        Discovery(path, tmp_path / "work", params, dies_in_round_two, key="k", natural_rows=natural).run()
    calls.clear()
    resumed = Discovery(path, tmp_path / "work", params, serial_map_log(calls), key="k", natural_rows=natural).run()
    assert calls[0].startswith("svm round 2") and "k-means" not in calls
    resumed_steps = [h["step"] for h in Clusters.load(tmp_path / "work" / "step5.npz")[1] if "clusters" in h]
    assert resumed_steps == [0, 1, 2, 3, 4, "merge", 5]  # the summary keeps the steps run before the kill
    for field in ("member_index", "offsets", "member_score", "weights", "bias"):
        np.testing.assert_array_equal(getattr(clean, field), getattr(resumed, field))
    # another key (config or features changed) starts over
    calls.clear()
    Discovery(path, tmp_path / "work", params, serial_map_log(calls), key="other", natural_rows=natural).run()
    assert calls[0] == "k-means"


def serial_map_log(calls: list):
    def mapper(fn, args, **kw):
        calls.append(kw["desc"])
        return serial_map(fn, args, **kw)
    return mapper


def test_split_sets_partition_and_natural_rows():
    s = split_sets(101, 0.5, seed=3)
    assert np.array_equal(np.sort(np.concatenate(list(s.values()))), np.arange(101))
    s = split_sets(10, 0.5, seed=3, natural_rows=np.array([7, 8, 9]))
    assert np.array_equal(np.sort(np.r_[s["N1"], s["N2"]]), [7, 8, 9])


def test_a_killed_cluster_stage_resumes_in_the_run_directory(tmp_path, shard_dir):
    """The stage through the manifest, no Ray: killed in round 3, rerun resumes there, then skips."""
    from pretrain import stages
    from pretrain.cluster.stage import cluster_stage
    from pretrain.config import load_config
    from infra.rundir import RunDir

    cfg = load_config(None, [f"data.shards_dir={shard_dir}", "data.patch_size_px=32", "train.arch=alexnet32",
                             "features.kind=hog", "features.hog_cell_px=8", "features.out_dim=8",
                             "cluster.init_divisor=2"])
    run = RunDir(tmp_path / "run")
    stages.shard_stage(cfg, run, stages.check_data(cfg), serial_map)
    stages.features_stage(cfg, run, serial_map)
    calls = []

    def dies_in_round_three(fn, args, **kw):
        if kw["desc"].startswith("svm round 3"):
            raise KeyboardInterrupt("killed")
        return serial_map_log(calls)(fn, args, **kw)

    with pytest.raises(KeyboardInterrupt):
        cluster_stage(cfg, run, shard_dir, dies_in_round_three)
    assert "cluster_round0" not in run.manifest()["stages"]
    calls.clear()
    result = cluster_stage(cfg, run, shard_dir, serial_map_log(calls))
    assert not result.skipped and calls[0].startswith("svm round 3")
    with np.load(run.path / "clusters" / "round0.npz", allow_pickle=False) as z:
        assert len(z["offsets"]) >= 2 and z["member_key"].dtype.kind == "U"
    assert cluster_stage(cfg, run, shard_dir, serial_map).skipped


def test_natural_world_by_source_key(tmp_path, shard_dir):
    """cluster.natural_world names N by source keys (e.g. a folder of web images), end to end."""
    from pretrain import stages
    from pretrain.cluster.discover import ClusteringError
    from pretrain.cluster.stage import cluster_stage, natural_rows
    from pretrain.config import load_config
    from infra.rundir import RunDir
    from shards.store import PatchStore

    store = PatchStore(shard_dir)
    rows = natural_rows(store, "coffee/*")
    keys = [m["key"] for m in store.meta(np.arange(len(store)))]
    assert len(rows) == 30 and all(keys[i].startswith("coffee/") for i in rows)
    with pytest.raises(ClusteringError, match="matches 0 of 60 patches"):
        natural_rows(store, "web/*")

    cfg = load_config(None, [f"data.shards_dir={shard_dir}", "data.patch_size_px=32", "train.arch=alexnet32",
                             "features.kind=hog", "features.hog_cell_px=8", "features.out_dim=8",
                             "cluster.natural_world=coffee/*", "cluster.init_divisor=2", "cluster.min_members=1"])
    run = RunDir(tmp_path / "run")
    stages.shard_stage(cfg, run, stages.check_data(cfg), serial_map)
    stages.features_stage(cfg, run, serial_map)
    cluster_stage(cfg, run, shard_dir, serial_map)
    with np.load(run.path / "clusters" / "round0.npz", allow_pickle=False) as z:
        assert all(k.startswith("cat/") for k in z["member_key"])  # members come from D only


def test_excluded_negatives_give_each_cluster_the_svm_without_them():
    """SVMs between clusters: the negatives are every cluster's members, each cluster's own left out."""
    x, members, neg = svm_problem(n_clusters=5, members=8, negatives=600, seed=3)
    for c, m in enumerate(members):
        x[m] += 3 * np.eye(x.shape[1])[c]  # each cluster off in its own direction: few support vectors
    shared = np.r_[np.concatenate(members), neg]
    ours = train_svms(x, members, shared, c=0.1, tol=1e-6, device="cpu", exclude=members)
    for c, m in enumerate(members):
        others = np.setdiff1d(shared, m)
        rows = np.r_[m, others]
        ref = LinearSVC(C=0.1, tol=1e-8, max_iter=100000, dual=False).fit(
            x[rows], np.r_[np.ones(len(m)), -np.ones(len(others))])
        w_ref = np.r_[ref.coef_[0], ref.intercept_]
        assert np.linalg.norm(np.r_[ours.weights[c], ours.bias[c]] - w_ref) <= 1e-2 * np.linalg.norm(w_ref)
    # the same with a mining cache smaller than the negatives
    mined = train_svms(x, members, shared, c=0.1, tol=1e-6, device="cpu", exclude=members, cache_size=500,
                       mining_rounds=20)
    assert mined.stats["violators_outside_cache"] == 0 and mined.stats["negatives_cached"] < len(shared)
    np.testing.assert_allclose(mined.weights, ours.weights, atol=1e-3)


def test_coverage_joins_a_patch_to_its_best_cluster_within_its_top_n():
    from pretrain.cluster.cover import assign, cover_chunk, merge_chunks

    # 1-D scores: cluster 0 scores x, cluster 1 scores -x; 10 patches at x = -4.5 ... 4.5
    x = np.linspace(-4.5, 4.5, 10, dtype=np.float32)[:, None]
    w, b = np.array([[1.0], [-1.0]], np.float32), np.zeros(2, np.float32)
    whole = cover_chunk(x, np.arange(10), w, b, top_n=3, device="cpu")
    parts = merge_chunks([cover_chunk(x, np.arange(lo, min(lo + 4, 10)), w, b, top_n=3, device="cpu")
                          for lo in range(0, 10, 4)], top_n=3)
    for key in whole:
        np.testing.assert_array_equal(parts[key], whole[key])
    members, scores = assign(np.arange(10), whole, top_n=3, min_score=np.inf)
    assert [m.tolist() for m in members] == [[9, 8, 7], [0, 1, 2]]  # best first
    np.testing.assert_allclose(scores[0], [4.5, 3.5, 2.5])
    members, _ = assign(np.arange(10), whole, top_n=3, min_score=1.0)  # or above the margin
    assert [m.tolist() for m in members] == [[9, 8, 7, 6], [0, 1, 2, 3]]
    wide = cover_chunk(x, np.arange(10), w, b, top_n=20, device="cpu")
    members, _ = assign(np.arange(10), wide, top_n=20, min_score=np.inf)  # everyone, once each
    assert sorted(np.concatenate(members).tolist()) == list(range(10))


def test_centroid_coverage_joins_each_patch_to_its_nearest_member_mean(tmp_path):
    x, labels = blobs(3, 60, 8, seed=9)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    disc = Discovery(save_features(tmp_path, x), tmp_path / "work",
                     DiscoveryParams(device="cpu", cover=True, cover_score="centroid", cover_top_n=1000), serial_map,
                     key="k")
    seeds = [np.flatnonzero(labels == b)[:5] for b in range(3)]
    clusters = Clusters.from_lists(seeds, [np.zeros(5, np.float32)] * 3, weights=np.zeros((3, 8), np.float32),
                                   bias=np.zeros(3, np.float32))
    covered = disc._cover(clusters)  # zero SVMs would put every patch in cluster 0
    assert len(covered) == 3 and sum(len(m) for m in covered.members()) == len(x)
    for m in covered.members():
        assert len(np.unique(labels[m])) == 1  # the blobs: each patch joined the mean of its own seeds
    assert not covered.weights.any()  # the SVMs stay the clusters' detectors


def test_nearest_members_cut_kmeans_clusters_to_the_coverage():
    from pretrain.cluster.kmeans import nearest_members

    x, y = blobs(4, 50, 6, seed=2)
    members, scores, w, b = nearest_members(x, 4, coverage=0.4, seed=0)
    assert sorted(len(m) for m in members) == [20, 20, 20, 20]
    for m, s in zip(members, scores):
        assert len(set(y[m])) == 1 and np.all(np.diff(s) <= 0)  # one blob each, nearest first
    assign_ = np.argmax(x @ w.T + b, 1)  # the linear scorer is nearest-centroid assignment
    nearest = np.argmin(((x[:, None] - w[None]) ** 2).sum(-1), 1)
    assert np.array_equal(assign_, nearest)


def test_a_refined_discovery_starts_from_the_given_clusters(tmp_path):
    """A later round of the alternation: the discovery starts from the previous clusters, not k-means."""
    x, labels = blobs(4, 100, 8, seed=6)
    x = (x - x.mean(0)) / x.std(0)
    path = save_features(tmp_path, x)
    start = [np.flatnonzero(labels == b)[:40] for b in range(4)]
    calls = []
    params = DiscoveryParams(device="cpu", cover=True, cover_top_n=60, seed=11)
    clusters = Discovery(path, tmp_path / "work", params, serial_map_log(calls), key="k", start=start).run()
    assert "k-means" not in calls and calls[-1] == "coverage"
    assert len(clusters) == 4
    for m in clusters.members():
        assert len(m) >= 50 and (labels[m] == np.bincount(labels[m]).argmax()).mean() == 1.0
