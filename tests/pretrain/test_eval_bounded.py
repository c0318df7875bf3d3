"""Stage 5 in bounded memory: the seeded scoring subset, top-N precision against the full ranking, the
chunked row scans against their whole-array versions, and the eval stage run on shards whose records'
JSON is unreadable (labels come from the metadata arrays)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pretrain.eval.attributes import extreme_picks
from pretrain.eval.retrieval import code_stats, eval_subset, evaluate_retrieval, pack_codes
from pretrain.eval.scan import extreme_rows, read_rows, score_stats


def class_labels():
    """5000 rows: classes of 2000, 1500, 900, 2 and 1 rows (the rest unlabelled), shuffled."""
    labels = np.r_[np.zeros(2000), np.ones(1500), np.full(900, 2), [3, 3], [4], -np.ones(597)].astype(np.int64)
    return np.random.default_rng(0).permutation(labels)


def test_subset_is_seeded_bounded_and_keeps_every_class_its_queries():
    labels = class_labels()
    rows = eval_subset(labels, queries_per_class=10, gallery_max=300, seed=1)
    queries = 10 + 10 + 10 + 1  # class 3 gives 1 query, the singleton none
    assert len(rows) == queries + 300 and np.all(np.diff(rows) > 0) and np.all(labels[rows] >= 0)
    counts = np.bincount(labels[rows], minlength=5)
    assert counts[:3].min() >= 11 and counts[3] == 2  # queries + one relevant gallery item per class
    assert np.array_equal(rows, eval_subset(labels, queries_per_class=10, gallery_max=300, seed=1))
    assert not np.array_equal(rows, eval_subset(labels, queries_per_class=10, gallery_max=300, seed=2))
    # the subset of the subset is all of it (the stage picks rows, evaluate_retrieval picks them again)
    assert len(eval_subset(labels[rows], queries_per_class=10, gallery_max=300, seed=1)) == len(rows)
    # under the bound: every labelled row, as the unbounded protocol
    assert np.array_equal(eval_subset(labels, queries_per_class=10, gallery_max=5000),
                          np.flatnonzero(labels >= 0))
    with pytest.raises(ValueError, match="gallery_max=2 is below the 4 classes"):
        eval_subset(labels, queries_per_class=10, gallery_max=2)
    codes = pack_codes(np.random.default_rng(3).integers(0, 2, (5000, 16)))
    out = evaluate_retrieval(codes, labels, queries_per_class=10, repeats=2, gallery_max=300, seed=1)
    assert out["queries"] == queries and out["gallery"] == 300


def test_top_n_precision_equals_the_full_ranking_precision():
    # 8-bit codes over 1200 items: Hamming distances tie everywhere, also across the N-th place
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, 1200)
    codes = pack_codes((rng.random((1200, 8)) < 0.3 + 0.1 * labels[:, None]).astype(np.uint8))
    kw = dict(queries_per_class=15, repeats=3, precision_at=(1, 7, 50), seed=4)
    full = evaluate_retrieval(codes, labels, **kw)
    top = evaluate_retrieval(codes, labels, with_map=False, **kw)
    assert "map" not in top and "map" in full
    for n in kw["precision_at"]:
        assert top[f"precision@{n}"] == full[f"precision@{n}"]
        assert top[f"precision@{n}_std"] == full[f"precision@{n}_std"]


def test_row_scans_match_the_whole_array_versions(tmp_path):
    rng = np.random.default_rng(2)
    scores = rng.integers(-3, 4, (1000, 12)).astype(np.float16)  # few values: ties decide the extremes
    scores[:, 5] = 1  # a constant bit
    path = tmp_path / "scores.npy"
    np.save(path, scores)
    stats, share = score_stats(path, chunk=64)
    whole = code_stats(scores > 0)
    assert stats == pytest.approx(whole, abs=1e-12) and np.array_equal(share, (scores > 0).mean(0))
    bits = [0, 5, 11]
    assert np.array_equal(extreme_rows(path, bits, per_side=8, chunk=37), extreme_picks(scores, bits, 8))
    assert np.array_equal(extreme_rows(path, bits, per_side=8, chunk=1000), extreme_picks(scores, bits, 8))
    rows = np.sort(rng.choice(1000, 100, replace=False))
    assert np.array_equal(read_rows(path, rows, chunk=7), scores[rows])
    assert np.array_equal(read_rows(path, np.arange(1000), chunk=300), scores)  # runs of rows: one read each
    with pytest.raises(IndexError):
        read_rows(path, np.array([5, 1000]))
    small = tmp_path / "small.npy"
    np.save(small, scores[:5])
    assert np.array_equal(extreme_rows(small, bits, per_side=8, chunk=2), extreme_picks(scores[:5], bits, 8))


def _spoil_record_json(root):
    """Overwrites every record's JSON payload in place (tar headers intact): unparseable for anyone."""
    from shards.shardset import record_offsets

    for tar in sorted(root.glob("shard-*.tar")):
        offs = record_offsets(tar)
        with open(tar, "r+b") as f:
            for off, size in offs.members["json"]:
                f.seek(int(off))
                f.write(b"\x00" * int(size))


def test_eval_stage_bounded_with_the_records_json_unreadable(shard_copy, tmp_path):
    from infra import layout
    from infra.layout import RunLayout
    from infra.rundir import RunDir
    from infra.storage import atomic_write_bytes
    from pretrain.config import load_config
    from pretrain.eval.stage import eval_stage

    _spoil_record_json(shard_copy)
    run = RunDir(tmp_path / "run")
    lay = RunLayout(run.path)
    rng = np.random.default_rng(0)
    for name, arr in (("codes", pack_codes(rng.integers(0, 2, (60, 16)))),
                      ("scores", rng.normal(size=(60, 16)).astype(np.float16))):
        import io

        buf = io.BytesIO()
        np.save(buf, arr)
        atomic_write_bytes(getattr(lay, name)(16), buf.getvalue())
    run.run_stage(layout.hash_stage(16), lambda: {lay.codes(16): None, lay.scores(16): None}, config={}, inputs={})
    cfg = load_config(None, ["hash.code_bits=16", "hash.extra_bits=[]", "eval.queries_per_class=3", "eval.repeats=2",
                             "eval.precision_at=[10]", "eval.gallery_max=20", "eval.baseline_fit_max=24",
                             "eval.figure_queries=2"])
    eval_stage(cfg, run, shard_copy)
    found = json.loads(lay.retrieval.read_text())
    assert found["protocol"]["gallery_max"] == 20 and found["protocol"]["baseline_fit_max"] == 24
    assert found["protocol"]["subset"] == {"labelled": 60, "scored": 26, "queries": 6, "gallery": 20, "classes": 2,
                                           "baseline_fit": 24, "seed": 0, "bounded": True}
    methods = [r["method"] for r in found["results"]]
    assert methods == ["ours", "LSH", "PCAH", "ITQ", "SH"]
    assert all(r["gallery"] == 20 and r["queries"] == 6 for r in found["results"])
    assert lay.figure("attributes_k16").is_file() and lay.figure("retrieval_k16").is_file()
