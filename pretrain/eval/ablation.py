"""The paper's Table 5 (ablations) as numbers and tables: what each method's codes and clusters score.

Methods (one row each; `scripts/ablation.py` makes their runs):
    ours            the pipeline: discovery <-> CNN rounds, then the triplet hashing fine-tune (Eq. 2)
    k-means+CNN     the same rounds and hashing with k-means clusters (cluster.method=kmeans), as many
                    and at the same coverage as ours
    k-means+HOG     no CNN: PCA+ITQ on the raw init descriptors (HOG, or the Fisher vectors)
    PCA+ITQ on fc7  the last round's trunk, no fine-tune: the hashing fine-tune's starting point
    printed Eq. 2   the fine-tune with Eq. 2 as printed (hash.printed_eq2)
Columns: mAP and precision@N at each code length (Hamming ranking, the eval stage's protocol), and
the purity of the method's clusters at ours' coverage. Every figure is a mean over seeds, with the
standard deviation over seeds.
"""
from __future__ import annotations

import numpy as np

from pretrain.eval.clusters import purity
from pretrain.eval.hashing_baselines import fit_itq
from pretrain.eval.retrieval import evaluate_retrieval, pack_codes
from pretrain.features.fisher import FisherEncoder, fisher_vectors
from pretrain.features.hog import hog_features
from pretrain.cluster.kmeans import nearest_members

METHODS = ("ours", "k-means+CNN", "k-means+HOG", "PCA+ITQ on fc7", "printed Eq. 2")


def init_descriptors(patches: np.ndarray, enc: FisherEncoder) -> np.ndarray:
    """patches: (N, P, P, 3) uint8 -> (N, F) float32 raw init descriptors (before whitening)."""
    if enc.kind == "hog":
        return hog_features(patches, enc.settings["cell_px"])
    return fisher_vectors(patches, enc)


def itq_scores(fit_x: np.ndarray, x: np.ndarray, labels: np.ndarray, bits: tuple[int, ...], *, seed: int,
               **protocol) -> dict[int, dict]:
    """PCA+ITQ at each K fitted on fit_x (m, d), coding x (n, d) with labels (n,) -> {K: evaluate_retrieval
    result}. With fit_x the hashing stage's own sample, these codes are its fine-tune's start."""
    return {k: evaluate_retrieval(pack_codes(fit_itq(fit_x, k, seed=seed).encode(x)), labels, seed=seed, **protocol)
            for k in bits}


def code_scores(codes: dict[int, np.ndarray], labels: np.ndarray, *, seed: int, **protocol) -> dict[int, dict]:
    """{K: (n, K/8) packed codes} -> {K: evaluate_retrieval result}."""
    return {k: evaluate_retrieval(c, labels, seed=seed, **protocol) for k, c in codes.items()}


def kmeans_purity(feats: np.ndarray, labels: np.ndarray, k: int, coverage: float, seed: int) -> float:
    """Purity of k-means with k clusters on feats (n, d), each cut to the share `coverage` nearest its
    centroid (labels < 0 left out of the score)."""
    members, *_ = nearest_members(np.asarray(feats, np.float32), min(k, len(feats)), coverage, seed=seed)
    return purity(members, labels)


def row(method: str, scores: dict[int, dict], purity_: float | None, precision_n: int) -> dict:
    """One seed's row: method, map<K>, p@<N>_<K> per code length, purity (None: no clusters)."""
    out = {"method": method, "purity": purity_}
    for k, s in sorted(scores.items()):
        out[f"map{k}"] = s["map"]
        out[f"p@{precision_n}_{k}"] = s[f"precision@{precision_n}"]
    return out


def over_seeds(per_seed: list[list[dict]]) -> list[dict]:
    """Rows of several seeds (same methods, same order) -> one row per method: each figure's mean and
    `<key>_std`, and `seeds`."""
    out = []
    for i, first in enumerate(per_seed[0]):
        rows = [rows_[i] for rows_ in per_seed]
        merged = {"method": first["method"], "seeds": len(rows)}
        for key in first:
            if key == "method":
                continue
            vals = [r[key] for r in rows if r.get(key) is not None]
            merged[key] = float(np.mean(vals)) if vals else None
            merged[f"{key}_std"] = float(np.std(vals)) if vals else None
        out.append(merged)
    return out


def _cell(r: dict, key: str, scale: float = 100, digits: int = 1) -> str:
    if r.get(key) is None:
        return "-"
    std = r.get(f"{key}_std")
    spread = f" ± {scale * std:.{digits}f}" if std is not None and r.get("seeds", 1) > 1 else ""
    return f"{scale * r[key]:.{digits}f}" + spread


def ablation_table(rows: list[dict], bits: tuple[int, ...], precision_n: int) -> str:
    """Markdown: method, mAP at each K, precision@N at each K (in %), purity at equal coverage."""
    head = ["method", *(f"mAP {k}" for k in bits), *(f"P@{precision_n} {k}" for k in bits), "purity"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], *(_cell(r, f"map{k}") for k in bits),
                 *(_cell(r, f"p@{precision_n}_{k}") for k in bits), _cell(r, "purity", 1, 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rounds_table(per_seed_reports: dict[str, list[list[dict]]]) -> str:
    """{method: per seed, the round reports} -> markdown: per method and round, the means over seeds of
    clusters, coverage, purity and the PCA+ITQ mAP on the round's fc7."""
    keys = ("clusters", "coverage", "purity", "itq_map")
    lines = ["| method | round | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for method, seeds in per_seed_reports.items():
        for r in range(min(len(s) for s in seeds)):
            cells = []
            for key in keys:
                vals = [s[r][key] for s in seeds if key in s[r]]
                if not vals:
                    cells.append("-")
                    continue
                scale = 100 if key == "itq_map" else 1
                fmt = "{:.0f}" if key == "clusters" else ("{:.1f}" if key == "itq_map" else "{:.3f}")
                text = fmt.format(scale * np.mean(vals))
                if len(vals) > 1 and key != "clusters":
                    text += " ± " + fmt.format(scale * np.std(vals))
                cells.append(text)
            lines.append(f"| {method} | {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
