"""The unsupervised hashing baselines of the paper's Table 2: LSH, PCAH, ITQ and spectral hashing.

Each `fit_*` learns from unlabelled features and returns an object whose `encode(x)` gives (N, K) bool
codes, a bit set where its projection is > 0. LSH, PCAH and ITQ are all linear on centred features,
`(x - mean) @ proj > 0`, so they share `Hasher`; ITQ's `proj` and `mean` also initialise the hashing
layer of stage 4 (the design's stand-in for the paper's [37]), so `proj` is exactly the map applied to
centred features. Spectral hashing thresholds sinusoids of PCA coordinates and has its own encoder.

PCAH, ITQ and SH take at most d directions from d-dimensional features and raise ValueError when asked
for more bits; the caller decides whether to skip or to reduce the code length. LSH works for any K.

References: Charikar 2002 / Andoni & Indyk 2006 (sign random projections); Gong & Lazebnik 2011 (ITQ);
Weiss, Torralba & Fergus 2008 (spectral hashing).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Hasher:
    """A linear hash: mean (d,) float32, proj (d, K) float32; code = (x - mean) @ proj > 0."""

    mean: np.ndarray
    proj: np.ndarray

    @property
    def bits(self) -> int:
        return self.proj.shape[1]

    def encode(self, x: np.ndarray) -> np.ndarray:
        """x: (N, d) float -> (N, K) bool."""
        return (np.asarray(x, np.float32) - self.mean) @ self.proj > 0


def _too_many_bits(name: str, bits: int, d: int) -> None:
    if bits > d:
        raise ValueError(f"{name} gives at most d={d} independent bits from {d}-D features, asked for bits={bits}")


def pca_directions(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x: (N, d) float -> mean (d,) float32, components (d, k) float32 (columns, by decreasing variance),
    variances (k,) float64. Each component's sign is fixed (largest |entry| positive) so fits repeat."""
    x = np.asarray(x, np.float64)
    mean = x.mean(0)
    xc = x - mean
    if xc.shape[1] > xc.shape[0]:  # fewer points than dimensions (e.g. 96x96 pixels): the SVD of the data
        _, sv, vt = np.linalg.svd(xc, full_matrices=False)  # costs n^2 d, the d x d covariance d^3
        var, vec = sv[:k] ** 2 / max(len(x) - 1, 1), vt[:k].T
        order = np.arange(vec.shape[1])
    else:
        var, vec = np.linalg.eigh(xc.T @ xc / max(len(x) - 1, 1))
        order = np.argsort(var, kind="stable")[::-1][:k]
    vec, var = vec[:, order], var[order]
    vec *= np.sign(vec[np.abs(vec).argmax(0), np.arange(vec.shape[1])])
    return mean.astype(np.float32), vec.astype(np.float32), var


def fit_lsh(x: np.ndarray, bits: int, seed: int = 0) -> Hasher:
    """Sign random projections: Gaussian directions (d, bits) on centred x: (N, d) float."""
    x = np.asarray(x, np.float32)
    proj = np.random.default_rng(seed).standard_normal((x.shape[1], bits)).astype(np.float32)
    return Hasher(mean=x.mean(0), proj=proj)


def fit_pcah(x: np.ndarray, bits: int, seed: int = 0) -> Hasher:
    """The top-`bits` principal directions of x: (N, d) float. `seed` is unused (uniform signature)."""
    _too_many_bits("PCAH", bits, x.shape[1])
    mean, comps, _ = pca_directions(x, bits)
    return Hasher(mean=mean, proj=comps)


def _signs(y: np.ndarray) -> np.ndarray:
    # sign(0) would be 0, no vertex of the hypercube; 0 maps to -1, matching `encode` (bit set only for > 0).
    return np.where(y > 0, 1.0, -1.0)


def quantization_loss(v: np.ndarray, r: np.ndarray) -> float:
    """ITQ's objective for a fixed rotation, min over B of ||B - V R||_F^2 (B = sign(V R)).
    v: (N, K) float centred PCA coordinates, r: (K, K) orthogonal -> float."""
    vr = np.asarray(v, np.float64) @ r
    return float(((_signs(vr) - vr) ** 2).sum())


def itq_rotation(v: np.ndarray, n_iter: int = 50, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """Gong & Lazebnik's alternation on v: (N, K) float PCA coordinates: B = sign(V R), then R from the
    orthogonal Procrustes problem min ||B - V R|| (SVD of V^T B = U S W^T, R = U W^T).
    Returns R: (K, K) float64 orthogonal, history: n_iter + 1 losses (`quantization_loss`), the first
    for the random initial rotation. Each step can only lower the loss, so history never increases."""
    v = np.asarray(v, np.float64)
    k = v.shape[1]
    # A random orthogonal start, as in the authors' code: the identity (PCAH) is a saddle for some data.
    r, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((k, k)))
    history = [quantization_loss(v, r)]
    for _ in range(n_iter):
        b = _signs(v @ r)
        u, _, wt = np.linalg.svd(v.T @ b)
        r = u @ wt
        history.append(quantization_loss(v, r))
    return r, history


def fit_itq(x: np.ndarray, bits: int, seed: int = 0, *, n_iter: int = 50) -> Hasher:
    """ITQ on x: (N, d) float: PCA to `bits` dims, then the rotation that best quantizes them.
    proj = P @ R: (d, bits) float32, so `Hasher.encode` applies both to centred features."""
    _too_many_bits("ITQ", bits, x.shape[1])
    mean, comps, _ = pca_directions(x, bits)
    v = (np.asarray(x, np.float32) - mean) @ comps
    r, _ = itq_rotation(v, n_iter=n_iter, seed=seed)
    return Hasher(mean=mean, proj=(comps.astype(np.float64) @ r).astype(np.float32))


@dataclass(frozen=True, eq=False)
class SpectralHasher:
    """Spectral hashing: mean (d,) and pcs (d, p) map x to PCA coordinates u (N, p); bit j is the sign of
    sin(pi/2 + omegas[j] * (u[:, dims[j]] - lo[dims[j]])); lo (p,) float, dims (K,) int, omegas (K,)."""

    mean: np.ndarray
    pcs: np.ndarray
    lo: np.ndarray
    dims: np.ndarray
    omegas: np.ndarray

    @property
    def bits(self) -> int:
        return len(self.dims)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """x: (N, d) float -> (N, K) bool."""
        u = (np.asarray(x, np.float32) - self.mean) @ self.pcs
        return np.sin(np.pi / 2 + self.omegas * (u[:, self.dims] - self.lo[self.dims])) > 0


def fit_sh(x: np.ndarray, bits: int, seed: int = 0) -> SpectralHasher:
    """Spectral hashing on x: (N, d) float. `seed` is unused (uniform signature).

    PCA to min(bits, d) dims; each dim is taken as uniform on its box [a, b] (the data's range), whose
    1-D Laplacian eigenfunctions are sin(pi/2 + k pi/(b - a) (u - a)) with eigenvalue ~ (k / (b - a))^2.
    The `bits` (dim, k >= 1) pairs of smallest eigenvalue are kept (k = 0 is the constant function).
    Asking for more bits than d raises ValueError, as for PCAH and ITQ, although SH could reuse dims."""
    _too_many_bits("SH", bits, x.shape[1])
    mean, pcs, _ = pca_directions(x, min(bits, x.shape[1]))
    u = (np.asarray(x, np.float32) - mean) @ pcs
    lo, hi = u.min(0), u.max(0)
    width = np.maximum(hi - lo, np.finfo(np.float32).eps)
    modes = np.arange(1, bits + 1)
    # every dim offers modes 1..bits; the `bits` smallest eigenvalues over all (dim, mode) pairs win
    dims, ks = np.meshgrid(np.arange(len(width)), modes, indexing="ij")
    eigen = (ks / width[dims]) ** 2
    pick = np.argsort(eigen.ravel(), kind="stable")[:bits]
    dims, ks = dims.ravel()[pick], ks.ravel()[pick]
    omegas = (np.pi * ks / width[dims]).astype(np.float32)
    return SpectralHasher(mean=mean, pcs=pcs, lo=lo.astype(np.float32), dims=dims, omegas=omegas)


BASELINES = {"LSH": fit_lsh, "PCAH": fit_pcah, "ITQ": fit_itq, "SH": fit_sh}
