"""Per-patch row files read in bounded memory: stage 4's scores (N, K) and codes (N, K/8), the (N, d)
feature memory maps.

Rows come in chunks, each read through a memory map opened for that chunk alone: a map held over a whole
file keeps every page it touched resident (at 12.8M patches x 64 float16 scores, 1.6 GB) where a map
per chunk gives its pages back as it closes. On these chunks the eval stage computes its code statistics
and finds each figure bit's extreme patches in one pass each, as the whole-array functions in
`retrieval.code_stats` and `attributes.extreme_picks` would (same figures, same ties).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from infra import storage
from pretrain.eval.retrieval import code_stats_from_sums

CHUNK_ROWS = 1 << 16


def _rows_of(local) -> int:
    mm = np.load(local, mmap_mode="r")
    n = len(mm)
    del mm
    return n


def take_rows(path, rows: np.ndarray | None = None, chunk: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
    """path: an .npy file (a path or a URI); rows: (n,) int64 ascending, or None for every row ->
    arrays of up to `chunk` of those rows, in order (copies, not views of the file)."""
    local = storage.local_copy(path)
    total = _rows_of(local) if rows is None else len(rows)
    for start in range(0, total, chunk):
        mm = np.load(local, mmap_mode="r")
        part = mm[start : start + chunk] if rows is None else mm[rows[start : start + chunk]]
        out = np.array(part)
        del mm, part
        yield out


def read_rows(path, rows: np.ndarray, chunk: int = CHUNK_ROWS) -> np.ndarray:
    """`take_rows` gathered: (n, ...) of the file's dtype."""
    parts = list(take_rows(path, rows, chunk))
    if parts:
        return np.concatenate(parts)
    mm = np.load(storage.local_copy(path), mmap_mode="r")
    return np.zeros((0, *mm.shape[1:]), mm.dtype)


def score_stats(path, chunk: int = CHUNK_ROWS) -> tuple[dict, np.ndarray]:
    """path: (N, K) float scores, bit = score > 0 -> (`retrieval.code_stats` of the bits, share (K,)
    float64 of ones per bit), from exact integer sums over chunks."""
    n, ones, pairs = 0, None, None
    for x in take_rows(path, None, chunk):
        b = (x > 0).astype(np.float32)
        ones = b.sum(0, dtype=np.float64) if ones is None else ones + b.sum(0, dtype=np.float64)
        gram = (b.T @ b).astype(np.float64)  # exact: chunk < 2^24
        pairs = gram if pairs is None else pairs + gram
        n += len(x)
    return code_stats_from_sums(n, ones, pairs), ones / n


def extreme_rows(path, bits: list[int], per_side: int = 8, chunk: int = CHUNK_ROWS) -> np.ndarray:
    """path: (N, K) float scores -> (len(bits), 2 min(per_side, N)) int64 rows: per bit the lowest
    scores then the highest, in increasing score, ties by row; what `attributes.extreme_picks` gives
    on the whole array. Each chunk's candidates are merged into the running ones with a stable sort."""
    lo = [(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in bits]
    hi = [(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in bits]
    start = 0
    for x in take_rows(path, None, chunk):
        for j, b in enumerate(bits):
            v = x[:, b].astype(np.float32)
            order = np.argsort(v, kind="stable")
            for side, pick in ((lo, order[:per_side]), (hi, order[max(len(order) - per_side, 0) :])):
                rows = np.concatenate([side[j][0], pick + start])
                vals = np.concatenate([side[j][1], v[pick]])
                keep = np.argsort(vals, kind="stable")
                keep = keep[:per_side] if side is lo else keep[max(len(keep) - per_side, 0) :]
                side[j] = (rows[keep], vals[keep])
        start += len(x)
    ps = min(per_side, start)
    return np.array([np.concatenate([lo[j][0][:ps], hi[j][0][len(hi[j][0]) - ps :]]) for j in range(len(bits))],
                    np.int64).reshape(len(bits), 2 * ps)
