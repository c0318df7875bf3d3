"""Hamming-ranking retrieval with binary codes (paper sec. 4.2 and Table 2): mAP and precision@N.

Protocol (paper sec. 5, CIFAR-10, following [14]): draw random queries, a fixed number per class, rank the
rest of the labelled items (the gallery) by Hamming distance to each query, score the whole ranking (AP)
and its top N (precision@N), and average over repeated draws. Codes travel packed, FAISS's binary layout:
K/8 bytes per code (`np.packbits` along the bits), so the search is `faiss.IndexBinaryFlat`.

Bounded for any N (`eval_subset`): CIFAR-10's 59000-image gallery is the model. With more labelled items
than the queries plus `gallery_max`, a seeded subset is scored instead: per class its queries' worth and
one more (so every query has a relevant gallery item), then rows drawn at random from the rest up to the
queries plus `gallery_max`. The subset is chosen from the labels' classes and the seed only, never from
the codes, so every method is scored on the same rows; under the bound it is every labelled row and the
results are those of the unbounded protocol.

mAP needs each query's whole ranking, so the bounded gallery is ranked in full, in query chunks sized to a
memory budget (`RANK_BUDGET_BYTES`): O(chunk x gallery), never O(queries x gallery). We keep the ranking
rather than computing AP from per-distance counts of relevant items, because counts lose the order among
equal distances, which AP depends on: tie-aware AP would change the figures the paper's protocol gives.
precision@N alone needs only the top N (`with_map=False`: a FAISS search with k = N).

Hamming distances tie a lot at 16-64 bits. FAISS orders equal distances by database row (no re-sorting,
so the search stays at FAISS's cost, and a top-N search is a prefix of the full ranking), and the gallery
is shuffled before indexing so that order is a random tie-break rather than one that follows the data
set's order (often sorted by class).
"""
from __future__ import annotations

import faiss
import numpy as np

from pretrain.eval.hashing_baselines import BASELINES


def pack_codes(bits: np.ndarray) -> np.ndarray:
    """bits: (N, K) bool or uint8 in {0,1} -> (N, ceil(K/8)) uint8, first bit in the high bit of byte 0."""
    return np.packbits(np.asarray(bits).astype(bool), axis=1)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """packed: (N, ceil(K/8)) uint8 -> (N, K) uint8 in {0,1}, K = bits."""
    return np.unpackbits(np.asarray(packed, np.uint8), axis=1, count=bits)


class HammingIndex:
    """Exhaustive Hamming search over packed codes: a thin wrapper of `faiss.IndexBinaryFlat`.

    packed_db: (N, K/8) uint8. `bits`, when given, must be 8 x the byte count: FAISS needs K % 8 == 0,
    and a code length that is not a multiple of 8 would be silently padded by `pack_codes`. `counting`:
    FAISS's counting search (`use_heap=False`) instead of its heap; the same order (distance, then row),
    and for k near N (a whole ranking) about 9x faster on this 2-core machine."""

    def __init__(self, packed_db: np.ndarray, bits: int | None = None, *, counting: bool = False):
        packed_db = np.asarray(packed_db)
        if packed_db.dtype != np.uint8 or packed_db.ndim != 2:
            raise ValueError(f"HammingIndex needs packed (N, K/8) uint8 codes, got {packed_db.dtype} "
                             f"{packed_db.shape} (use pack_codes)")
        if bits is not None and (bits % 8 or bits != 8 * packed_db.shape[1]):
            raise ValueError(f"FAISS binary codes need K a multiple of 8 matching {packed_db.shape[1]} bytes, "
                             f"got K={bits}")
        self.bits = 8 * packed_db.shape[1]
        self.index = faiss.IndexBinaryFlat(self.bits)
        self.index.use_heap = not counting
        self.index.add(np.ascontiguousarray(packed_db))

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, packed_queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """packed_queries: (Q, K/8) uint8 -> dist (Q, k) int32 nondecreasing, idx (Q, k) int64 rows of the
        database (-1 past its end). Equal distances keep FAISS's order."""
        return self.index.search(np.ascontiguousarray(packed_queries, np.uint8), k)


def average_precision(ranked_relevant: np.ndarray) -> np.ndarray:
    """ranked_relevant: (Q, n) bool, each query's whole ranking -> (Q,) float64 AP: the mean of the
    precision at each relevant item's rank. A query with no relevant item gets AP 0 (it cannot be
    answered; counting it as 0 rather than dropping it keeps the mean over the same queries)."""
    rel = np.asarray(ranked_relevant, bool)
    hits = np.cumsum(rel, axis=1)
    precision = hits / np.arange(1, rel.shape[1] + 1)
    return (precision * rel).sum(1) / np.maximum(hits[:, -1] if rel.shape[1] else 0, 1)


def precision_at(ranked_relevant: np.ndarray, n: int) -> np.ndarray:
    """ranked_relevant: (Q, m) bool -> (Q,) float64: the share of relevant items among the top
    min(n, m) (a gallery shorter than n is scored on all of it)."""
    top = np.asarray(ranked_relevant, bool)[:, :n]
    return top.sum(1) / max(top.shape[1], 1)


RANK_BUDGET_BYTES = 1 << 28  # one query chunk's full ranking (distances, rows, relevance, AP terms)
RANK_CELL_BYTES = 48  # bytes per (query, gallery item) of that chunk, all temporaries counted
SUBSET_STREAM = 0x5EED  # the subset's random stream, apart from the repeats' draws (which keep seed)


def _class_groups(labels: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
    """rows (n,) int64 ascending with labels[rows] >= 0 -> per class, by increasing label, its rows
    (ascending). One stable sort, not one pass over the rows per class."""
    lab = labels[rows]
    order = np.argsort(lab, kind="stable")
    lab = lab[order]
    cuts = np.flatnonzero(lab[1:] != lab[:-1]) + 1
    del lab
    return np.split(rows[order], cuts) if len(rows) else []


def split_queries(labels: np.ndarray, queries_per_class: int, rng: np.random.Generator):
    """labels: (N,) int, < 0 = unlabelled -> queries (Q,) int64, gallery (G,) int64 (shuffled).

    Up to `queries_per_class` random queries per class, clamped to the class size minus one so that
    every query has a relevant item in the gallery (a singleton class gives no query). Unlabelled rows
    are neither queries nor gallery."""
    labels = np.asarray(labels)
    known = np.flatnonzero(labels >= 0)
    queries = [rng.choice(members, min(queries_per_class, len(members) - 1), replace=False)
               for members in _class_groups(labels, known)]
    queries = np.sort(np.concatenate(queries)).astype(np.int64) if queries else np.zeros(0, np.int64)
    gallery = rng.permutation(np.setdiff1d(known, queries)).astype(np.int64)
    return queries, gallery


def eval_subset(labels: np.ndarray, *, queries_per_class: int, gallery_max: int | None = None,
                seed: int = 0) -> np.ndarray:
    """labels: (N,) int, < 0 = unlabelled -> rows (n,) int64 ascending: the labelled rows retrieval
    scores (module docstring). Every labelled row when there are at most Q + gallery_max of them (Q: the
    queries `split_queries` draws, per class min(queries_per_class, class size - 1)); else Q + gallery_max
    rows drawn by `seed` from the labels' classes alone. On its own output it returns every row."""
    labels = np.asarray(labels)
    known = np.flatnonzero(labels >= 0).astype(np.int64)
    per_class = np.minimum(queries_per_class, np.unique(labels[known], return_counts=True)[1] - 1)
    n_queries = int(per_class.sum())
    if gallery_max is None or len(known) <= n_queries + gallery_max:
        return known
    asking = int((per_class > 0).sum())
    if gallery_max < asking:
        raise ValueError(f"eval.gallery_max={gallery_max} is below the {asking} classes with queries: each "
                         "needs a relevant gallery item")
    rng = np.random.default_rng([seed, SUBSET_STREAM])
    groups = _class_groups(labels, known)
    reserved = np.concatenate([rng.choice(m, q + 1, replace=False) for m, q in zip(groups, per_class) if q > 0])
    del groups
    rest = np.ones(len(known), bool)
    rest[np.searchsorted(known, reserved)] = False
    rest = known[rest]  # known less reserved, ascending
    fill = rng.choice(rest, n_queries + gallery_max - len(reserved), replace=False)
    return np.sort(np.concatenate([reserved, fill])).astype(np.int64)


def _score_split(packed, labels, queries, gallery, precision_ns, with_map: bool = True):
    """Per-query AP (None without `with_map`) and precision@N for one split. With AP, each query chunk
    ranks the whole gallery, the chunk sized so that it stays within RANK_BUDGET_BYTES; without, the
    search stops at the largest N."""
    k = len(gallery) if with_map else min(max(precision_ns), len(gallery))
    index = HammingIndex(packed[gallery], counting=with_map)
    gallery_labels = labels[gallery]
    chunk = int(np.clip(RANK_BUDGET_BYTES // max(k * RANK_CELL_BYTES, 1), 1, 256))
    ap, prec = [], {n: [] for n in precision_ns}
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk]
        _, idx = index.search(packed[q], k)
        rel = gallery_labels[idx] == labels[q][:, None]
        del idx
        if with_map:
            ap.append(average_precision(rel))
        for n in precision_ns:
            prec[n].append(precision_at(rel, n))
    return np.concatenate(ap) if with_map else None, {n: np.concatenate(p) for n, p in prec.items()}


def evaluate_retrieval(packed: np.ndarray, labels: np.ndarray, *, queries_per_class: int, repeats: int = 10,
                       precision_at: tuple[int, ...] = (100,), seed: int = 0, gallery_max: int | None = None,
                       with_map: bool = True) -> dict:
    """packed: (N, K/8) uint8 codes (a memory map is fine: only the scored rows are read), labels: (N,)
    int (< 0 = unlabelled) -> {"map", "map_std" (with_map only), "precision@N", "precision@N_std" for
    each N, "queries", "gallery", "repeats", "bits"}.

    The rows scored are `eval_subset(labels, gallery_max=...)`; each repeat draws fresh queries among
    them (`split_queries`) and ranks the rest, the gallery; means and (population) standard deviations
    are over the repeats' per-repeat means."""
    labels = np.asarray(labels)
    rows = eval_subset(labels, queries_per_class=queries_per_class, gallery_max=gallery_max, seed=seed)
    if len(rows) < len(labels):
        labels = labels[rows]
        packed = packed[rows]
    packed = np.asarray(packed, np.uint8)
    # the `precision_at` argument shadows the function of that name here; `_score_split` calls the function
    rng = np.random.default_rng(seed)
    maps, precs = [], {n: [] for n in precision_at}
    for _ in range(repeats):
        queries, gallery = split_queries(labels, queries_per_class, rng)
        if len(queries) == 0 or len(gallery) == 0:
            raise ValueError(f"no queries or empty gallery: {len(queries)} queries, {len(gallery)} gallery")
        ap, prec = _score_split(packed, labels, queries, gallery, precision_at, with_map)
        if with_map:
            maps.append(ap.mean())
        for n in precision_at:
            precs[n].append(prec[n].mean())
    out = {"map": float(np.mean(maps)), "map_std": float(np.std(maps))} if with_map else {}
    for n in precision_at:
        out[f"precision@{n}"] = float(np.mean(precs[n]))
        out[f"precision@{n}_std"] = float(np.std(precs[n]))
    out.update(queries=int(len(queries)), gallery=int(len(gallery)), repeats=repeats, bits=8 * packed.shape[1])
    return out


def fit_baselines(fit_x: np.ndarray, bits: tuple[int, ...], *, seed: int = 0) -> tuple[dict, list[dict]]:
    """Fits every `BASELINES` method at each K on fit_x: (n, d) float -> ({(method, K): hasher with
    .encode}, [{"method", "bits", "skipped": reason}] for the methods that cannot give K bits)."""
    hashers, skipped = {}, []
    for k in bits:
        for name, fit in BASELINES.items():
            try:
                hashers[(name, k)] = fit(fit_x, k, seed=seed)
            except ValueError as err:
                skipped.append({"method": name, "bits": k, "skipped": str(err)})
    return hashers, skipped


def encode_chunks(hashers: dict, chunks) -> dict[tuple[str, int], np.ndarray]:
    """hashers from `fit_baselines`; chunks: iterable of (m, d) float inputs -> {(method, K): (sum m,
    K/8) uint8 packed codes}. Each chunk is read once for all hashers, so inputs never sit in memory
    whole."""
    parts = {key: [] for key in hashers}
    for x in chunks:
        for key, h in hashers.items():
            parts[key].append(pack_codes(h.encode(x)))
    return {key: np.concatenate(p) if p else np.zeros((0, key[1] // 8), np.uint8) for key, p in parts.items()}


def baseline_codes(x: np.ndarray, bits: tuple[int, ...], *, fit_x: np.ndarray | None = None,
                   seed: int = 0, chunk: int = 8192) -> tuple[dict[tuple[str, int], np.ndarray], list[dict]]:
    """Fits every `BASELINES` method on fit_x (default x): (N, d) float and codes x (in chunks of
    `chunk` rows) -> ({(method, bits): (N, bits/8) uint8 packed codes}, [{"method", "bits", "skipped":
    reason}] for the methods that cannot give that many bits)."""
    hashers, skipped = fit_baselines(x if fit_x is None else fit_x, bits, seed=seed)
    return encode_chunks(hashers, (x[i : i + chunk] for i in range(0, len(x), chunk))), skipped


def baseline_rows(x: np.ndarray, labels: np.ndarray, bits: tuple[int, ...] = (16, 32, 64), *,
                  fit_x: np.ndarray | None = None, seed: int = 0, **eval_kwargs) -> list[dict]:
    """`baseline_codes` scored with `evaluate_retrieval(**eval_kwargs)`: one row per (method, bits),
    {"method", "bits", **scores}, or {"method", "bits", "skipped": reason}."""
    codes, skipped = baseline_codes(x, bits, fit_x=fit_x, seed=seed)
    rows = [{**evaluate_retrieval(c, labels, seed=seed, **eval_kwargs), "method": name, "bits": k}
            for (name, k), c in codes.items()]
    return rows + skipped


def _cell(row: dict, key: str, best: float | None) -> str:
    if key not in row:
        return "-"
    text = f"{100 * row[key]:.2f}"
    if f"{key}_std" in row and row.get("repeats", 1) > 1:
        text += f" ± {100 * row[f'{key}_std']:.2f}"
    return f"**{text}**" if best is not None and row[key] == best else text


def retrieval_table(rows: list[dict]) -> str:
    """rows: dicts with "method", "bits", "map" and any "precision@N" (fractions; rows without scores,
    e.g. skipped ones, show "-") -> a markdown table in percent, rows grouped by bits in first-seen
    order, the best value per bits and column in bold (ties all bold)."""
    prec_keys = sorted({k for r in rows for k in r if k.startswith("precision@") and not k.endswith("_std")},
                       key=lambda k: int(k.split("@")[1]))
    keys = ["map", *prec_keys]
    header = ["method", "bits", "mAP (%)", *(f"precision@{k.split('@')[1]} (%)" for k in prec_keys)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for k in dict.fromkeys(r["bits"] for r in rows):
        group = [r for r in rows if r["bits"] == k]
        best = {key: max((r[key] for r in group if key in r), default=None) for key in keys}
        for r in group:
            cells = [str(r["method"]), str(k), *(_cell(r, key, best[key]) for key in keys)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def code_stats(bits: np.ndarray) -> dict:
    """bits: (N, K) uint8/bool in {0,1} -> {"balance_min", "balance_max", "balance_dev"} (the per-bit
    share of ones: min, max, mean |p - 0.5|) and "mean_abs_corr", the mean |Pearson correlation| over
    pairs of distinct bits. The hashing regularizers aim at balance 0.5 and correlation 0; a constant
    bit has no defined correlation and counts as 0 there (its balance already shows it)."""
    b = np.asarray(bits, np.float64)
    return code_stats_from_sums(len(b), b.sum(0), b.T @ b)


def code_stats_from_sums(n: int, ones: np.ndarray, pairs: np.ndarray) -> dict:
    """`code_stats` from n codes' sums: ones (K,) the count of ones per bit, pairs (K, K) the counts of
    both bits set (B^T B), so that it can be summed over chunks of a file (pretrain/eval/scan.py)."""
    p = np.asarray(ones, np.float64) / n
    k = len(p)
    corr = 0.0
    if k > 1:
        std = np.sqrt(p * (1 - p))
        with np.errstate(invalid="ignore", divide="ignore"):
            c = np.nan_to_num((np.asarray(pairs, np.float64) / n - np.outer(p, p)) / np.outer(std, std))
        corr = float(np.abs(c[~np.eye(k, dtype=bool)]).mean())
    return {"balance_min": float(p.min()), "balance_max": float(p.max()),
            "balance_dev": float(np.abs(p - 0.5).mean()), "mean_abs_corr": corr}
