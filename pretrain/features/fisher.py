"""Improved Fisher vectors of local descriptors and the PCA-whitening to the clustering dimension.

Paper sec. 3.1 / [36] (Perronnin et al. 2010): 134-D local descriptors (descriptors.py) -> PCA to
`desc_pca_dim` -> diagonal GMM with K components -> improved FV (signed sqrt + L2, length 2*K*D)
-> PCA-whitening to `out_dim` (<= 256, what the FAISS k-means of stage 2 wants).

FV layout, checked against cyvlfeat 0.7.1 (tests/pretrain/test_features.py): [u_1 .. u_K, v_1 .. v_K],
all K first-order blocks (D values each, components in `gmm()` order) and then all K second-order
blocks; not [u_k; v_k] interleaved per component.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from cyvlfeat.fisher import fisher
from cyvlfeat.gmm.cygmm import cy_gmm
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from threadpoolctl import ThreadpoolController

from pretrain.features.descriptors import DESC_DIM, frame_grid, local_descriptors, work_array
from infra.storage import local_copy, npz_bytes, open_read, put_part

log = logging.getLogger(__name__)

FORMAT = "discoattr-encoder/1"
MAX_OUT_DIM = 256
MAX_FIT_DESCRIPTORS = 200_000  # descriptor PCA + GMM sample; more adds time, not quality
MAX_KMEANS_POINTS = 50_000  # GMM initialisation sample
ENCODE_BATCH = 64  # patches per batch; bounds the reused work arrays (~21 MB at 96px)
GMM_ITERATIONS = 100


@dataclass(frozen=True, eq=False)
class FisherEncoder:
    """Everything `encode` needs, fitted on a sample. kind "fv": descriptor PCA + GMM + whitening;
    kind "hog": whitening only (the descriptor and GMM arrays are empty)."""

    kind: str  # "fv" or "hog"
    settings: dict  # the fit's arguments (step_px, bin_px or cell_px, dims, seed, fit_patches, ...)
    desc_mean: np.ndarray  # (134,) float32
    desc_components: np.ndarray  # (134, D) float32, principal axes as columns
    gmm_means: np.ndarray  # (K, D) float32
    gmm_covars: np.ndarray  # (K, D) float32, diagonal variances
    gmm_priors: np.ndarray  # (K,) float32
    white_mean: np.ndarray  # (F,) float32, mean of the raw features
    white_proj: np.ndarray  # (F, out_dim) float32, PCA axes / sqrt(eigenvalue + regulariser)

    @property
    def out_dim(self) -> int:
        return self.white_proj.shape[1]

    def save(self, path: str | Path) -> dict:
        """Writes an `.npz` (atomically; a path or a bucket URI) that loads with allow_pickle=False
        -> its record {key, size, sha256}."""
        return put_part(path, npz_bytes(format=np.array(FORMAT), kind=np.array(self.kind),
                                        settings=np.array(json.dumps(self.settings, sort_keys=True)),
                                        **{name: getattr(self, name) for name in _ARRAYS}))

    @classmethod
    def load(cls, path: str | Path, sha256: str | None = None) -> "FisherEncoder":
        """A path, or a URI through this node's cache (keyed by `sha256` when given, and checked)."""
        with np.load(local_copy(path, sha256), allow_pickle=False) as z:
            if "format" not in z or str(z["format"]) != FORMAT:
                raise ValueError(f"{path} is not a {FORMAT} encoder file")
            return cls(kind=str(z["kind"]), settings=json.loads(str(z["settings"])),
                       **{name: z[name] for name in _ARRAYS})

    @staticmethod
    def read_info(path: str | Path) -> tuple[str, dict, int]:
        """(kind, settings, out_dim) of an encoder file, reading only its small members (a few ranged
        reads on a bucket, not the whole file)."""
        with open_read(path, block_size=1 << 16) as f, np.load(f, allow_pickle=False) as z:
            if "format" not in z.files or str(z["format"]) != FORMAT:
                raise ValueError(f"{path} is not a {FORMAT} encoder file")
            with z.zip.open("white_proj.npy") as m:
                version = np.lib.format.read_magic(m)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape = read(m)[0]
            return str(z["kind"]), json.loads(str(z["settings"])), int(shape[1])


_ARRAYS = ("desc_mean", "desc_components", "gmm_means", "gmm_covars", "gmm_priors", "white_mean",
           "white_proj")


def fit_whitening(x: np.ndarray, out_dim: int, *, seed: int, reg: float) -> tuple[np.ndarray, np.ndarray]:
    """x: (N, F) float32 -> (mean (F,), projection (F, out_dim')) float32, out_dim' = min(out_dim,
    N - 1, F). Each axis is scaled by 1/sqrt(eigenvalue + reg * mean kept eigenvalue): the
    regulariser keeps the weakest kept directions (mostly noise) from being blown up to unit
    variance. reg = 1 (the default) beat 0.1 on digits HOG: k-means purity 0.957 vs 0.941 (128-D, k=50)."""
    if not 1 <= out_dim <= MAX_OUT_DIM:
        raise ValueError(f"out_dim must be in 1..{MAX_OUT_DIM}, got {out_dim}")
    if reg < 0:
        raise ValueError(f"whitening regulariser must be >= 0, got {reg}")
    n, f = x.shape
    if n < 2:
        raise ValueError(f"fitting the whitening needs at least 2 sample patches, got {n}")
    if out_dim > min(n - 1, f):
        log.warning("out_dim %d clipped to %d (%d sample patches, %d-D features)", out_dim,
                    min(n - 1, f), n, f)
        out_dim = min(n - 1, f)
    pca = PCA(n_components=out_dim, random_state=seed).fit(x)
    eig = pca.explained_variance_
    scale = 1.0 / np.sqrt(eig + reg * eig.mean() + 1e-12)  # 1e-12: a zero-variance sample
    return pca.mean_.astype(np.float32), (pca.components_.T * scale).astype(np.float32)


def whiten(raw: np.ndarray, enc: FisherEncoder) -> np.ndarray:
    """raw: (N, F) float32 -> (N, out_dim) float32."""
    out = raw @ enc.white_proj  # (x - m) W = x W - m W: no (N, F) temporary
    out -= enc.white_mean @ enc.white_proj
    return out


def _fit_gmm(y: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """y: (M, D) float32 -> GMM means (K, D), covars (K, D), priors (K,) float32, from a seeded
    k-means start (VLFeat's own 'rand'/'kmeans' starts draw from a process-global RNG)."""
    rng = np.random.default_rng(seed)
    sub = y[rng.choice(len(y), min(len(y), MAX_KMEANS_POINTS), replace=False)]
    km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(sub)
    counts = np.bincount(km.labels_, minlength=k).astype(np.float64)
    sq = np.zeros((k, y.shape[1]))
    np.add.at(sq, km.labels_, (sub - km.cluster_centers_[km.labels_]) ** 2)
    # per-cluster variance, falling back to the global one for (near-)singleton clusters
    covars = np.where(counts[:, None] > 1, sq / np.maximum(counts[:, None], 1), sub.var(0))
    covars = np.maximum(covars, 1e-6 * sub.var(0).max())
    priors = np.maximum(counts, 1) / np.maximum(counts, 1).sum()
    # cyvlfeat 0.7.1's gmm() cannot take a custom start (it calls bool() on the init arrays), so
    # call its extension function directly with the same arguments gmm() would pass
    means, covars, priors, _, _ = cy_gmm(
        np.ascontiguousarray(y, np.float32), k, GMM_ITERATIONS, b"custom", 1, 0, covariance_bound=None,
        init_priors=priors.astype(np.float32), init_means=km.cluster_centers_.astype(np.float32),
        init_covars=covars.astype(np.float32))
    return means.astype(np.float32), covars.astype(np.float32), priors.astype(np.float32)


@lru_cache(maxsize=1)
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()  # inspects the loaded libraries once (~4 ms)


def _one_blas_thread():
    """A context running BLAS on one thread. Idle OpenBLAS workers spin-wait and take the cores that
    VLFeat's OpenMP dsift/fisher run on next (measured 0.86 -> 0.78 ms per 96px patch on 2 cores),
    and our per-batch GEMMs are too small to gain from threads."""
    return _blas_controller().limit(limits=1, user_api="blas")


def _fisher_of_descriptors(desc: np.ndarray, enc: FisherEncoder, out: np.ndarray) -> np.ndarray:
    """desc: (N, F, 134) float32 -> improved FVs written into out: (N, 2*K*D) float32."""
    n, n_frames, _ = desc.shape
    # one GEMM projects the whole batch; (x - m) W = x W - m W
    y = np.matmul(desc.reshape(-1, DESC_DIM), enc.desc_components,
                  out=work_array("fisher.y", (n * n_frames, enc.desc_components.shape[1])))
    y -= enc.desc_mean @ enc.desc_components
    means, covars, priors = enc.gmm_means, enc.gmm_covars, enc.gmm_priors
    for i in range(n):
        out[i] = fisher(y[i * n_frames:(i + 1) * n_frames], means, covars, priors, improved=True)
    return out


def fisher_vectors(patches: np.ndarray, enc: FisherEncoder) -> np.ndarray:
    """patches: (N, P, P, 3) uint8 -> (N, 2*K*D) float32 improved Fisher vectors."""
    if enc.kind != "fv":
        raise ValueError(f"fisher_vectors needs a kind='fv' encoder, got {enc.kind!r}")
    step, size = enc.settings["step_px"], enc.settings["bin_px"]
    out = np.empty((len(patches), 2 * enc.gmm_means.size), np.float32)
    n_frames = len(frame_grid(patches.shape[1], step, size))
    with _one_blas_thread():
        for s in range(0, len(patches), ENCODE_BATCH):
            batch = patches[s:s + ENCODE_BATCH]
            desc = work_array("fisher.desc", (len(batch), n_frames, DESC_DIM))
            local_descriptors(batch, step, size, out=desc)
            _fisher_of_descriptors(desc, enc, out[s:s + len(batch)])
    return out


def fit_fisher_encoder(sample_patches: np.ndarray, *, step_px: int, bin_px: int, desc_pca_dim: int,
                       gmm_components: int, out_dim: int, seed: int, whiten_reg: float = 1.0
                       ) -> FisherEncoder:
    """sample_patches: (N, P, P, 3) uint8 -> a fitted kind="fv" encoder (deterministic given seed)."""
    desc = np.concatenate([local_descriptors(sample_patches[s:s + ENCODE_BATCH], step_px, bin_px)
                           for s in range(0, len(sample_patches), ENCODE_BATCH)])  # (N, F, 134)
    flat = desc.reshape(-1, DESC_DIM)
    rng = np.random.default_rng(seed)
    if len(flat) > MAX_FIT_DESCRIPTORS:
        flat = flat[np.sort(rng.choice(len(flat), MAX_FIT_DESCRIPTORS, replace=False))]
    if not 1 <= desc_pca_dim <= min(DESC_DIM, len(flat)):
        raise ValueError(f"desc_pca_dim must be in 1..{min(DESC_DIM, len(flat))}, got {desc_pca_dim}")
    if not 1 <= gmm_components <= len(flat) // 2:
        raise ValueError(f"gmm_components must be in 1..{len(flat) // 2} for {len(flat)} descriptors, "
                         f"got {gmm_components}")
    pca = PCA(n_components=desc_pca_dim, random_state=seed).fit(flat)
    components = pca.components_.T.astype(np.float32)
    y = (flat - pca.mean_.astype(np.float32)) @ components
    means, covars, priors = _fit_gmm(y, gmm_components, seed)
    settings = dict(step_px=step_px, bin_px=bin_px, desc_pca_dim=desc_pca_dim,
                    gmm_components=gmm_components, out_dim=out_dim, seed=seed, whiten_reg=whiten_reg,
                    fit_patches=len(sample_patches))
    no_whitening = np.zeros(0, np.float32), np.zeros((0, 0), np.float32)
    enc = FisherEncoder("fv", settings, pca.mean_.astype(np.float32), components, means, covars,
                        priors, *no_whitening)
    raw = np.empty((len(desc), 2 * means.size), np.float32)
    with _one_blas_thread():
        for s in range(0, len(desc), ENCODE_BATCH):
            _fisher_of_descriptors(desc[s:s + ENCODE_BATCH], enc, raw[s:s + ENCODE_BATCH])
    white_mean, white_proj = fit_whitening(raw, out_dim, seed=seed, reg=whiten_reg)
    return replace(enc, white_mean=white_mean, white_proj=white_proj)


def fisher_vector_reference(x: np.ndarray, means: np.ndarray, covars: np.ndarray,
                            priors: np.ndarray) -> np.ndarray:
    """VLFeat's improved FV written out (tests only). x: (N, D), means/covars: (K, D), priors: (K,)
    -> (2*K*D,) float64 laid out [u_1..u_K, v_1..v_K] with

      q_ik = posterior of Gaussian k for x_i,   z_ik = (x_i - mu_k) / sigma_k,
      u_k = sum_i q_ik z_ik / (N sqrt(pi_k)),   v_k = sum_i q_ik (z_ik^2 - 1) / (N sqrt(2 pi_k)),

    then signed square root and L2 normalisation."""
    x, means, covars, priors = (np.asarray(a, np.float64) for a in (x, means, covars, priors))
    log_p = (-0.5 * ((x[:, None, :] - means) ** 2 / covars).sum(2)
             - 0.5 * np.log(2 * np.pi * covars).sum(1) + np.log(priors))  # (N, K)
    q = np.exp(log_p - log_p.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    z = (x[:, None, :] - means) / np.sqrt(covars)  # (N, K, D)
    n = len(x)
    u = np.einsum("nk,nkd->kd", q, z) / (n * np.sqrt(priors))[:, None]
    v = np.einsum("nk,nkd->kd", q, z**2 - 1) / (n * np.sqrt(2 * priors))[:, None]
    fv = np.concatenate([u.ravel(), v.ravel()])
    fv = np.sign(fv) * np.sqrt(np.abs(fv))
    return fv / max(np.linalg.norm(fv), 1e-12)
