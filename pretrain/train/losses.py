"""The attribute-hashing objective of Huang, Loy, Tang, CVPR 2016 (sec. 3.2, Eq. 2-4).

Relaxed codes b = 2 sigmoid(W^T f) - 1 in (-1, 1)^K (Eq. 3) come from `HashHead`. With them:

    H(b_i, b_j) = (K - b_i . b_j) / 2                                            (Eq. 4)
    eps_i       = max(0, rho + H(b_i, b_i+) - H(b_i, b_i-)),   rho = K / 2        (Eq. 2, the slack)
    objective   = mean_i eps_i - alpha tr(W^T F^T F W) / B + beta ||W^T W - I_K||_F^2 + gamma ||W||_F^2

b_i+ comes from the anchor's cluster; b_i- is the other-cluster code of the mini-batch that most
violates the triplet order (largest eps_i, i.e. smallest H(b_i, .)). Options, each measured on digits
(README): `mining="semihard"` takes the nearest negative farther than the positive (FaceNet), the
hardest where there is none; `skip` leaves out candidates from clusters that overlap the anchor's
(near-duplicates of one concept that merging left apart); `margin` sets rho.

Departures from the printed Eq. 2 (DESIGN.md "Attribute hashing"), both following the text and [46]:
the variance term enters with a minus sign (the printed `+alpha` would minimise the variance the text
says is maximised), and decorrelation uses the K x K matrix W^T W (the printed d x d W W^T has rank
<= K and cannot equal I_d for K < d). `printed=True` computes the printed form so the two can be
compared. The paper sums eps_i over the data; a mini-batch mean is the same objective up to scale.
"""
from __future__ import annotations

import torch


def relaxed_hamming(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """b1: (B, K), b2: (M, K) relaxed codes -> (B, M) float: H = (K - b1 b2^T) / 2 (Eq. 4).

    Equals the Hamming distance when the codes are in {-1, 1}.
    """
    return (b1.shape[1] - b1 @ b2.T) / 2


def triplet_hash_loss(b: torch.Tensor, b_pos: torch.Tensor, cluster: torch.Tensor,
                      margin: float | None = None, *, mining: str = "hardest",
                      skip: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The slack term of Eq. 2 with in-batch negative mining.

    b: (B, K) anchor codes, b_pos: (B, K) codes of a sample from the same cluster, cluster: (B,) int64
    cluster of anchor i (and of positive i). Candidate negatives are all 2B codes, cat([b, b_pos]),
    from a cluster other than the anchor's, and not masked by `skip` ((B, 2B) bool, True: not a
    negative of anchor i). margin: rho, K / 2 by default. mining: "hardest" (the paper) or "semihard".

    Returns the mean loss over anchors that have a candidate (a zero with a gradient path when none
    has) and detached logs: `active` (share of those anchors with a positive loss), `h_pos`, `h_neg`
    (mean distances), `valid` (share of anchors with a candidate), `negatives` ((B,) int64 index
    into cat([b, b_pos]) of each chosen negative, -1 where there is none).
    """
    B, K = b.shape
    rho = K / 2 if margin is None else margin
    cand = torch.cat([b, b_pos])  # (2B, K)
    cand_cluster = torch.cat([cluster, cluster])  # (2B,): a positive shares its anchor's cluster

    h_pos = (K - (b * b_pos).sum(1)) / 2  # (B,)
    h_all = relaxed_hamming(b, cand)  # (B, 2B)
    other = cand_cluster[None, :] != cluster[:, None]  # (B, 2B): allowed negatives
    if skip is not None:
        other = other & ~skip
    valid = other.any(1)  # (B,): False when no candidate is left (e.g. the whole batch is one cluster)

    # The hinge is decreasing in H(b_i, b_i-), so the most violating negative is the nearest one.
    h_neg, neg = h_all.masked_fill(~other, float("inf")).min(1)  # (B,), (B,)
    if mining == "semihard":  # the nearest negative beyond the positive, where there is one
        beyond = other & (h_all > h_pos[:, None].detach())
        h_semi, semi = h_all.masked_fill(~beyond, float("inf")).min(1)
        has = beyond.any(1)
        h_neg, neg = torch.where(has, h_semi, h_neg), torch.where(has, semi, neg)
    elif mining != "hardest":
        raise ValueError(f"mining must be hardest or semihard, got {mining!r}")
    h_neg = torch.where(valid, h_neg, torch.zeros_like(h_neg))  # no inf reaches the loss or its gradient
    loss_i = torch.relu(rho + h_pos - h_neg) * valid  # (B,)
    n_valid = valid.sum()
    loss = loss_i.sum() / n_valid.clamp(min=1)

    denom = n_valid.clamp(min=1).float()
    info = {
        "active": ((loss_i > 0) & valid).sum().float().div(denom).detach(),
        "h_pos": h_pos.mean().detach(),
        "h_neg": (h_neg * valid).sum().div(denom).detach(),
        "valid": valid.float().mean().detach(),
        "negatives": torch.where(valid, neg, torch.full_like(neg, -1)).detach(),
    }
    return loss, info


def hash_regularizers(weight: torch.Tensor, f: torch.Tensor, *, alpha: float = 1.0, beta: float = 1.0,
                      gamma: float = 5e-4, printed: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The regularizers of Eq. 2 on W. weight: (d, K) W; f: (B, d) zero-meaned features.

    printed=False (DESIGN.md): -alpha tr(W^T F^T F W) / B + beta ||W^T W - I_K||_F^2 + gamma ||W||_F^2.
    printed=True (Eq. 2 as printed): +alpha tr(W^T F^T F W) / B + beta ||W W^T - I_d||_F^2 + gamma ||W||_F^2.

    Returns the total (scalar) and detached logs: `variance` (tr(W^T F^T F W) / B, the projected
    variance, unsigned), `variance_term`, `decorrelation_term`, `decay_term` (as they enter the total).
    """
    d, K = weight.shape
    proj = f @ weight  # (B, K): W^T f_i for every sample
    variance = proj.pow(2).sum() / f.shape[0]  # tr(W^T F^T F W) / B
    if printed:
        gram = weight @ weight.T - torch.eye(d, device=weight.device, dtype=weight.dtype)  # (d, d)
        variance_term = alpha * variance
    else:
        gram = weight.T @ weight - torch.eye(K, device=weight.device, dtype=weight.dtype)  # (K, K)
        variance_term = -alpha * variance
    decorrelation_term = beta * gram.pow(2).sum()
    decay_term = gamma * weight.pow(2).sum()
    total = variance_term + decorrelation_term + decay_term
    info = {"variance": variance, "variance_term": variance_term,
            "decorrelation_term": decorrelation_term, "decay_term": decay_term}
    return total, {k: v.detach() for k, v in info.items()}


def hash_objective(b: torch.Tensor, b_pos: torch.Tensor, cluster: torch.Tensor, weight: torch.Tensor,
                   f: torch.Tensor, *, margin: float | None = None, alpha: float = 1.0, beta: float = 1.0,
                   gamma: float = 5e-4, printed: bool = False, mining: str = "hardest",
                   skip: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 2 in full: the triplet slack plus the regularizers on W.

    b, b_pos: (B, K) relaxed codes; cluster: (B,) int64; weight: (d, K) W; f: (N, d) zero-meaned
    features for the variance term (e.g. `HashHead.center` of the anchors' features); mining, skip:
    see `triplet_hash_loss`. Returns the total (scalar) and the merged logs of both parts plus
    `triplet` and `total`.
    """
    triplet, info = triplet_hash_loss(b, b_pos, cluster, margin, mining=mining, skip=skip)
    reg, reg_info = hash_regularizers(weight, f, alpha=alpha, beta=beta, gamma=gamma, printed=printed)
    total = triplet + reg
    return total, {**info, **reg_info, "triplet": triplet.detach(), "total": total.detach()}
