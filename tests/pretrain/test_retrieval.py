"""Stage 5 retrieval: packed codes and FAISS Hamming search against numpy, AP against hand-computed
values and a loop version, the query/gallery protocol, the hashing baselines (ITQ, SH, ...) and the
retrieval figures. `pytest -s` prints the baselines' mAP on scikit-learn's digits."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits, make_blobs

from pretrain.eval.attributes import GREEN, RED, bit_extremes, pick_bits, retrieval_grid
from pretrain.eval.hashing_baselines import (BASELINES, fit_itq, fit_lsh, fit_pcah, fit_sh, itq_rotation,
                                             pca_directions, quantization_loss)
from pretrain.eval.retrieval import (HammingIndex, average_precision, baseline_rows, code_stats,
                                     evaluate_retrieval, pack_codes, precision_at, retrieval_table,
                                     split_queries, unpack_codes)


def random_bits(n, k, seed=0):
    return np.random.default_rng(seed).integers(0, 2, (n, k), dtype=np.uint8)


@pytest.mark.parametrize("k", [8, 12, 64])
def test_pack_unpack_roundtrip(k):
    bits = random_bits(50, k)
    packed = pack_codes(bits)
    assert packed.shape == (50, -(-k // 8)) and packed.dtype == np.uint8
    assert np.array_equal(unpack_codes(packed, k), bits)
    assert np.array_equal(pack_codes(bits.astype(bool)), packed)


def test_hamming_index_matches_numpy_popcount():
    db, q = random_bits(300, 32, seed=1), random_bits(7, 32, seed=2)
    ref = (db[None] != q[:, None]).sum(2)  # (Q, N) Hamming distances
    dist, idx = HammingIndex(pack_codes(db)).search(pack_codes(q), 300)
    assert dist.dtype == np.int32 and idx.dtype == np.int64 and dist.shape == idx.shape == (7, 300)
    assert np.all(np.diff(dist, axis=1) >= 0)
    assert np.array_equal(np.take_along_axis(ref, idx, 1), dist)
    assert np.array_equal(np.sort(idx, 1), np.tile(np.arange(300), (7, 1)))
    # ties in row order (what makes a top-N search a prefix of the whole ranking), heap or counting
    assert np.array_equal(idx, np.argsort(ref, axis=1, kind="stable"))
    for k in (10, 300):
        assert np.array_equal(HammingIndex(pack_codes(db), counting=True).search(pack_codes(q), k)[1], idx[:, :k])


def test_hamming_index_rejects_unpacked_codes_and_odd_lengths():
    with pytest.raises(ValueError, match="pack_codes"):
        HammingIndex(random_bits(5, 16).astype(bool))
    with pytest.raises(ValueError, match="multiple of 8"):
        HammingIndex(pack_codes(random_bits(5, 12)), bits=12)


def test_average_precision_hand_values():
    rel = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]], bool)
    np.testing.assert_allclose(average_precision(rel), [(1 + 2 / 3) / 2, 0.5, 1.0, 0.0, 0.25])
    np.testing.assert_allclose(precision_at(rel, 2), [0.5, 0.5, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(precision_at(rel, 10), [0.5, 0.25, 0.5, 0.0, 0.25])


def test_average_precision_matches_loop():
    rel = np.random.default_rng(3).random((20, 40)) < 0.3
    for row, ap in zip(rel, average_precision(rel)):
        ranks = np.flatnonzero(row) + 1
        want = np.mean([(i + 1) / r for i, r in enumerate(ranks)]) if len(ranks) else 0.0
        assert ap == pytest.approx(want)


def test_split_queries_per_class_disjoint_and_clamped():
    labels = np.r_[np.zeros(30), np.ones(4), [2], -np.ones(5)].astype(int)
    queries, gallery = split_queries(labels, 10, np.random.default_rng(0))
    assert np.bincount(labels[queries], minlength=3).tolist() == [10, 3, 0]
    assert not set(queries) & set(gallery)
    assert sorted(np.r_[queries, gallery]) == list(range(35))


def class_codes(labels, k=16):
    """A distinct random K-bit code per class: perfect hashing."""
    table = random_bits(labels.max() + 1, k, seed=5)
    return table[labels]


def test_perfect_codes_give_map_one():
    labels = np.repeat(np.arange(6), 40)
    labels[::17] = -1
    out = evaluate_retrieval(pack_codes(class_codes(np.maximum(labels, 0))), labels, queries_per_class=5,
                             repeats=3, precision_at=(10, 30))
    assert out["map"] == 1.0 and out["precision@10"] == 1.0 and out["precision@30"] == 1.0
    assert out["queries"] == 30 and out["gallery"] == (labels >= 0).sum() - 30 and out["repeats"] == 3


def test_random_codes_give_the_class_prior():
    labels = np.repeat(np.arange(5), 300)
    out = evaluate_retrieval(pack_codes(random_bits(1500, 32, seed=4)), labels, queries_per_class=20,
                             repeats=2)
    assert out["map"] == pytest.approx(0.2, abs=0.02)
    assert out["precision@100"] == pytest.approx(0.2, abs=0.03)


def test_queries_are_not_in_their_own_gallery():
    # one class of 2 items per pair and unique codes: a query found in the gallery would rank itself
    # first at distance 0, giving AP >= 1/2 even with random codes
    labels = np.repeat(np.arange(200), 2)
    out = evaluate_retrieval(pack_codes(random_bits(400, 64, seed=6)), labels, queries_per_class=1, repeats=2)
    assert out["queries"] == 200 and out["gallery"] == 200 and out["map"] < 0.1


def blobs(std=4.0):
    x, y = make_blobs(n_samples=1000, centers=5, n_features=20, cluster_std=std, random_state=0)
    return x.astype(np.float32), y


def test_itq_rotation_lowers_quantization_loss():
    x, _ = blobs()
    mean, comps, _ = pca_directions(x, 16)
    v = (x - mean) @ comps
    r, history = itq_rotation(v, n_iter=30, seed=1)
    np.testing.assert_allclose(r @ r.T, np.eye(16), atol=1e-10)
    assert len(history) == 31 and np.all(np.diff(history) <= 1e-9 * history[0])
    assert history[-1] < quantization_loss(v, np.eye(16))  # PCAH is ITQ with R = I
    codes = fit_itq(x, 16, seed=1, n_iter=30).encode(x)
    assert np.array_equal(codes, v @ r > 0)  # proj = P @ R on centred features


def test_itq_beats_lsh_on_blobs():
    x, y = blobs()
    scores = {name: evaluate_retrieval(pack_codes(BASELINES[name](x, 16, seed=0).encode(x)), y,
                                       queries_per_class=20, repeats=2)["map"] for name in ("ITQ", "LSH")}
    assert scores["ITQ"] > scores["LSH"] + 0.1, scores


def test_spectral_hashing_picks_smallest_eigenvalues():
    # dim 0 four times wider than dim 1: its modes 1 and 2 ((1/4)^2, (2/4)^2) beat dim 1's mode 1 (1)
    rng = np.random.default_rng(0)
    x = np.c_[rng.uniform(0, 4, 2000), rng.uniform(0, 1, 2000)].astype(np.float32)
    sh = fit_sh(x, 2)
    assert sh.dims.tolist() == [0, 0] and sh.omegas == pytest.approx([np.pi / 4, np.pi / 2], rel=0.01)
    u = (x - sh.mean) @ sh.pcs[:, 0]
    rel = (u - u.min()) / (u.max() - u.min())
    codes = sh.encode(x)
    assert np.array_equal(codes[:, 0], rel < 0.5)  # the first mode splits the range in halves


def test_spectral_codes_well_formed():
    x, _ = blobs()
    codes = fit_sh(x, 16).encode(x)
    assert codes.shape == (1000, 16) and codes.dtype == bool
    assert np.all(codes.any(0)) and not np.all(codes.all(0))
    assert len({c.tobytes() for c in codes.T}) == 16  # no two bits the same function


@pytest.mark.parametrize("fit", [fit_pcah, fit_itq, fit_sh])
def test_more_bits_than_dims_raises(fit):
    x = np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="bits=16"):
        fit(x, 16)
    assert fit_lsh(x, 16).encode(x).shape == (100, 16)


def test_code_stats_balanced_and_correlated():
    four = np.array([[(i >> j) & 1 for j in range(4)] for i in range(16)], np.uint8)
    stats = code_stats(four)
    assert stats["balance_min"] == stats["balance_max"] == 0.5 and stats["balance_dev"] == 0
    assert stats["mean_abs_corr"] == pytest.approx(0.0)
    dup = code_stats(np.c_[four[:, :1], four[:, :1]])
    assert dup["mean_abs_corr"] == pytest.approx(1.0)


def test_digits_baselines():
    x, y = load_digits(return_X_y=True)
    rows = baseline_rows(x.astype(np.float32), y, (16, 32), queries_per_class=10, repeats=3)
    print("\n" + retrieval_table(rows))
    got = {(r["method"], r["bits"]): r["map"] for r in rows}
    assert len(got) == 8 and all(0.1 < m < 1 for m in got.values()), got
    assert got["ITQ", 16] > got["LSH", 16]


def test_retrieval_table_bolds_best_per_bits():
    rows = [{"method": "A", "bits": 16, "map": 0.5, "precision@100": 0.2},
            {"method": "B", "bits": 16, "map": 0.4, "precision@100": 0.3},
            {"method": "A", "bits": 32, "map": 0.6, "precision@100": 0.1},
            {"method": "B", "bits": 32, "skipped": "too many bits"}]
    lines = retrieval_table(rows).splitlines()
    assert lines[0] == "| method | bits | mAP (%) | precision@100 (%) |"
    assert lines[2] == "| A | 16 | **50.00** | 20.00 |" and lines[3] == "| B | 16 | 40.00 | **30.00** |"
    assert lines[5] == "| B | 32 | - | - |"


def index_patches(idx, px=6):
    """Patch i is a flat grey of value i: tiles can be traced back to rows."""
    return np.repeat(np.asarray(idx, np.uint8)[:, None, None, None], px * px * 3).reshape(-1, px, px, 3)


def test_bit_extremes_layout():
    scores = np.c_[np.arange(40.0), -np.arange(40.0), np.zeros(40)] - 0.5
    img = bit_extremes(scores, index_patches, bits=[0, 1], per_side=3, pad_px=2)
    assert img.shape == (2 * 8 - 2, 7 * 8 - 2, 3)
    assert [img[0, c * 8, 0] for c in range(7)] == [0, 1, 2, 255, 37, 38, 39]
    assert [img[8, c * 8, 0] for c in range(7)] == [39, 38, 37, 255, 2, 1, 0]
    ramp = np.arange(40.0)
    assert pick_bits(np.c_[-np.ones(40), ramp - 28, ramp - 20.5], 2) == [2, 1]  # shares of > 0: 0, 0.275, 0.5


def test_retrieval_grid_frames_by_label():
    labels = np.array([0, 0, 1, 1, 0])
    ranked = {"ours": np.array([[1, 2], [3, 0]]), "lsh": np.array([[4, -1], [2, 1]])}
    img, methods = retrieval_grid(np.array([0, 2]), ranked, index_patches, labels, pad_px=2)
    assert methods == ["ours", "lsh"]
    step = 8
    assert img.shape == (5 * step - 2, 4 * step - 2, 3)  # 2 queries x 2 methods + 1 separator row
    assert tuple(img[0, 2 * step]) == GREEN and tuple(img[0, 3 * step]) == RED  # query 0: rows 1, 2
    assert tuple(img[3, 2 * step + 3]) == (1, 1, 1)  # the frame leaves the patch's inside alone
    assert tuple(img[step, 0]) == (255, 255, 255)  # query shown once per block
    assert tuple(img[step, 3 * step]) == (255, 255, 255)  # -1: nothing retrieved
    assert tuple(img[3 * step, 0]) == (2, 2, 2) and tuple(img[3 * step, 2 * step]) == GREEN


def test_pca_directions_of_wide_data_match_the_covariance_eigenvectors():
    """Fewer points than dimensions (96x96 pixels) take the SVD path; it must give the covariance's PCA."""
    from pretrain.eval.hashing_baselines import pca_directions

    x = np.random.default_rng(0).normal(size=(50, 80)) @ np.diag(np.linspace(0.1, 3, 80))
    _, vec, var = pca_directions(x, 5)
    xc = x - x.mean(0)
    w, v = np.linalg.eigh(xc.T @ xc / 49)
    top = np.argsort(w)[::-1][:5]
    v = v[:, top] * np.sign(v[:, top][np.abs(v[:, top]).argmax(0), np.arange(5)])
    np.testing.assert_allclose(vec, v, atol=1e-5)
    np.testing.assert_allclose(var, w[top], rtol=1e-8)
