"""The hashing objective (Eq. 2-4) against slow loop versions and explicit formulas."""
from __future__ import annotations

import pytest
import torch

from pretrain.train.losses import hash_objective, hash_regularizers, relaxed_hamming, triplet_hash_loss


def slow_triplet(b, b_pos, cluster, margin=None, mining="hardest", skip=None):
    """Loop version: for every anchor, every other-cluster candidate among anchors and positives
    (not skipped); hardest = the largest violation; semihard = the largest violation among the
    candidates farther than the positive (the nearest of them), the largest of all where there is none."""
    B, K = b.shape
    rho = K / 2 if margin is None else margin
    cand = [(b[j], int(cluster[j])) for j in range(B)] + [(b_pos[j], int(cluster[j])) for j in range(B)]
    losses, negatives = [], []
    for i in range(B):
        h_pos = (K - float(b[i] @ b_pos[i])) / 2
        options = []  # (violation, distance, candidate)
        for j, (c, cl) in enumerate(cand):
            if cl == int(cluster[i]) or (skip is not None and skip[i, j]):
                continue
            h = (K - float(b[i] @ c)) / 2
            options.append((rho + h_pos - h, h, j))
        beyond = [o for o in options if o[1] > h_pos]
        if not options:
            negatives.append(-1)
            continue
        pick = max(beyond) if mining == "semihard" and beyond else max(options)
        negatives.append(pick[2])
        losses.append(max(0.0, pick[0]))
    return (sum(losses) / len(losses) if losses else 0.0), negatives


def random_codes(B, K, n_clusters, seed):
    g = torch.Generator().manual_seed(seed)
    b = torch.tanh(2 * torch.randn(B, K, generator=g, dtype=torch.float64))
    b_pos = torch.tanh(2 * torch.randn(B, K, generator=g, dtype=torch.float64))
    return b, b_pos, torch.randint(0, n_clusters, (B,), generator=g)


def test_relaxed_hamming_is_hamming_on_binary_codes():
    b1 = torch.tensor([[1.0, -1, 1, 1], [-1, -1, -1, -1]])
    b2 = torch.tensor([[1.0, 1, 1, -1], [-1, -1, -1, -1], [1.0, -1, 1, 1]])
    assert torch.equal(relaxed_hamming(b1, b2), torch.tensor([[2.0, 3, 0], [3, 0, 3]]))
    assert torch.equal(relaxed_hamming(b1, b2), (b1[:, None] != b2[None]).sum(-1).float())


@pytest.mark.parametrize("seed,n_clusters,margin", [(0, 3, None), (1, 5, None), (2, 2, 1.5), (3, 8, 10.0)])
def test_triplet_loss_matches_loop_version(seed, n_clusters, margin):
    b, b_pos, cluster = random_codes(24, 16, n_clusters, seed)
    loss, info = triplet_hash_loss(b, b_pos, cluster, margin)
    want, negatives = slow_triplet(b, b_pos, cluster, margin)
    assert loss.item() == pytest.approx(want, abs=1e-6)
    # ties are measure-zero with continuous codes, so the chosen negatives must agree exactly
    assert info["negatives"].tolist() == negatives


@pytest.mark.parametrize("seed,n_clusters,margin", [(0, 3, None), (1, 5, 4.0), (2, 8, 10.0)])
def test_semihard_negatives_match_loop_version(seed, n_clusters, margin):
    b, b_pos, cluster = random_codes(24, 16, n_clusters, seed)
    loss, info = triplet_hash_loss(b, b_pos, cluster, margin, mining="semihard")
    want, negatives = slow_triplet(b, b_pos, cluster, margin, mining="semihard")
    assert loss.item() == pytest.approx(want, abs=1e-6) and info["negatives"].tolist() == negatives
    hardest = triplet_hash_loss(b, b_pos, cluster, margin)[1]["negatives"]
    assert not torch.equal(hardest, info["negatives"])  # the option changes which negatives are taken


@pytest.mark.parametrize("mining", ["hardest", "semihard"])
def test_skipped_candidates_are_never_negatives(mining):
    b, b_pos, cluster = random_codes(20, 16, 5, seed=9)
    cand_cluster = torch.cat([cluster, cluster])
    skip = (cluster[:, None] + cand_cluster[None, :]) % 3 == 0  # some cluster pairs are near-duplicates
    loss, info = triplet_hash_loss(b, b_pos, cluster, mining=mining, skip=skip)
    want, negatives = slow_triplet(b, b_pos, cluster, mining=mining, skip=skip)
    assert loss.item() == pytest.approx(want, abs=1e-6) and info["negatives"].tolist() == negatives
    chosen = info["negatives"]
    rows = torch.nonzero(chosen >= 0).flatten()
    assert not skip[rows, chosen[rows]].any() and len(rows) > 0
    free = triplet_hash_loss(b, b_pos, cluster, mining=mining)[1]["negatives"]
    assert skip[torch.arange(20), free].any()  # without the mask some of them would have been taken


def test_a_lone_other_cluster_is_every_anchors_negative():
    b, b_pos, _ = random_codes(6, 8, 2, seed=4)
    cluster = torch.tensor([0, 0, 0, 0, 0, 1])  # anchors 0-4 have only anchor 5 and its positive (11)
    loss, info = triplet_hash_loss(b, b_pos, cluster)
    want, negatives = slow_triplet(b, b_pos, cluster)
    assert loss.item() == pytest.approx(want, abs=1e-6) and info["negatives"].tolist() == negatives
    assert set(info["negatives"][:5].tolist()) <= {5, 11} and info["valid"].item() == 1.0


@pytest.mark.parametrize("n_clusters", [1, 4])
def test_gradients_are_finite(n_clusters):
    b, b_pos, cluster = random_codes(10, 8, n_clusters, seed=5)
    b.requires_grad_(True)
    b_pos.requires_grad_(True)
    loss, info = triplet_hash_loss(b, b_pos, cluster)
    loss.backward()
    assert torch.isfinite(b.grad).all() and torch.isfinite(b_pos.grad).all()
    if n_clusters == 1:  # nobody has a negative: zero loss that still backpropagates
        assert loss.item() == 0 and loss.requires_grad and info["valid"].item() == 0
        assert (info["negatives"] == -1).all() and (b.grad == 0).all()


def test_hardest_negative_is_the_most_violating_not_the_first():
    anchor = torch.tensor([1.0, 1, 1, 1])
    b = torch.stack([anchor, -anchor, torch.tensor([1.0, 1, -1, -1]), torch.tensor([1.0, 1, 1, -1])])
    b_pos = torch.stack([torch.tensor([1.0, 1, 1, -1]), -anchor, torch.tensor([1.0, 1, -1, -1]), -anchor])
    cluster = torch.tensor([0, 1, 2, 3])
    # anchor 0's candidates from other clusters: anchors 1, 2, 3 (H = 4, 2, 1), positives 5, 6, 7
    # (H = 4, 2, 4): anchor 3 at index 3 is the nearest, hence the largest hinge K/2 + 1 - 1 = 2.
    loss, info = triplet_hash_loss(b, b_pos, cluster)
    assert info["negatives"][0].item() == 3
    h = relaxed_hamming(b, torch.cat([b, b_pos]))
    assert h[0, 3] == 1 and (h[0, [1, 2, 5, 6, 7]] > 1).all()
    want, negatives = slow_triplet(b, b_pos, cluster)
    assert negatives[0] == 3 and loss.item() == pytest.approx(want)


def test_regularizers_match_explicit_formulas():
    g = torch.Generator().manual_seed(6)
    d, K, B = 10, 4, 32
    W = torch.randn(d, K, generator=g, dtype=torch.float64)
    f = torch.randn(B, d, generator=g, dtype=torch.float64)
    f = f - f.mean(0)
    alpha, beta, gamma = 0.7, 1.3, 0.01
    var = torch.trace(W.T @ f.T @ f @ W) / B
    decor_k = torch.linalg.matrix_norm(W.T @ W - torch.eye(K, dtype=W.dtype)) ** 2
    decor_d = torch.linalg.matrix_norm(W @ W.T - torch.eye(d, dtype=W.dtype)) ** 2
    decay = gamma * torch.linalg.matrix_norm(W) ** 2

    total, info = hash_regularizers(W, f, alpha=alpha, beta=beta, gamma=gamma)
    torch.testing.assert_close(total, -alpha * var + beta * decor_k + decay)
    torch.testing.assert_close(info["variance"], var)
    torch.testing.assert_close(info["variance_term"], -alpha * var)
    torch.testing.assert_close(info["decorrelation_term"], beta * decor_k)
    torch.testing.assert_close(info["decay_term"], decay)

    total_p, info_p = hash_regularizers(W, f, alpha=alpha, beta=beta, gamma=gamma, printed=True)
    torch.testing.assert_close(total_p, alpha * var + beta * decor_d + decay)
    torch.testing.assert_close(info_p["variance_term"], alpha * var)
    torch.testing.assert_close(info_p["decorrelation_term"], beta * decor_d)
    # orthonormal columns: the K x K term vanishes, the printed d x d one cannot (rank K < d)
    Q = torch.linalg.qr(W).Q
    assert hash_regularizers(Q, f, printed=False)[1]["decorrelation_term"] < 1e-20
    assert hash_regularizers(Q, f, printed=True)[1]["decorrelation_term"] == pytest.approx(d - K)


@pytest.mark.parametrize("printed,grows", [(False, True), (True, False)])
def test_gradient_step_direction_on_projected_variance(printed, grows):
    g = torch.Generator().manual_seed(7)
    d, K = 12, 3
    f = torch.randn(64, d, generator=g) * torch.linspace(0.2, 3, d)  # anisotropic features
    f = f - f.mean(0)
    W = torch.linalg.qr(torch.randn(d, K, generator=g)).Q.requires_grad_(True)
    total, info = hash_regularizers(W, f, printed=printed)
    total.backward()
    with torch.no_grad():
        after = hash_regularizers(W - 1e-3 * W.grad, f, printed=printed)[1]["variance"]
    assert (after > info["variance"]) == grows


def test_hash_objective_is_triplet_plus_regularizers():
    b, b_pos, cluster = random_codes(8, 4, 3, seed=8)
    W, f = torch.randn(6, 4, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    total, info = hash_objective(b, b_pos, cluster, W, f, gamma=0.1)
    triplet, _ = triplet_hash_loss(b, b_pos, cluster)
    reg, _ = hash_regularizers(W, f, gamma=0.1)
    torch.testing.assert_close(total, triplet + reg)
    assert {"active", "h_pos", "h_neg", "negatives", "variance", "decorrelation_term", "triplet",
            "total"} <= set(info)


def test_similar_pairs_are_the_clusters_with_close_mean_features():
    import numpy as np

    from pretrain.train.similar import SkipPairs, similar_pairs

    rng = np.random.default_rng(0)
    dirs = np.eye(4)[[0, 0, 1, 2, 3]] + 0.05 * rng.normal(size=(5, 4))  # clusters 0 and 1 share a direction
    cluster = np.repeat(np.arange(5), 30)
    feats = dirs[cluster] + 0.1 * rng.normal(size=(150, 4))
    pairs, cos = similar_pairs(feats, cluster, 5, threshold=0.8, block=2)  # blocks smaller than C
    assert pairs.tolist() == [[0, 1]] and cos[0] > 0.9
    skip = SkipPairs(pairs, 5, "cpu")
    mask = skip.mask(torch.tensor([0, 1, 2]), torch.tensor([1, 0, 2, 4]))
    assert mask.tolist() == [[True, False, False, False], [False, True, False, False], [False] * 4]
    assert len(SkipPairs(np.zeros((0, 2)), 5, "cpu")) == 0
