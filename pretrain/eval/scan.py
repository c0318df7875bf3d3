"""Per-patch row files read in bounded memory: stage 4's scores (N, K) and codes (N, K/8), the (N, d)
feature memory maps.

Rows come in chunks, read with plain reads at their offsets in the .npy file, never through a memory
map: pages a map touches count in the process's resident set while it is open, and the kernel maps
pages around each one touched, so gathering 100,000 scattered rows of a 12.8M-row feature file through
a map makes most of the file resident. On these chunks the eval stage computes its code statistics
and finds each figure bit's extreme patches in one pass each, as the whole-array functions
`retrieval.code_stats` and `attributes.extreme_picks` would (same figures, same ties).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from infra import storage
from pretrain.eval.retrieval import code_stats_from_sums

CHUNK_ROWS = 1 << 16


def _layout(f) -> tuple[tuple[int, ...], np.dtype, int]:
    """An open .npy file -> (shape, dtype, offset of the data); C order only."""
    major, _ = np.lib.format.read_magic(f)
    read = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}.get(major)
    if read is None:
        raise ValueError(f"{f.name}: .npy version {major} is not read here")
    shape, fortran, dtype = read(f)
    if fortran or dtype.hasobject:
        raise ValueError(f"{f.name}: not a C-ordered array of plain values")
    return shape, dtype, f.tell()


def take_rows(path, rows: np.ndarray | None = None, chunk: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
    """path: an .npy file (a path or a URI); rows: (n,) int64 ascending, or None for every row ->
    arrays of up to `chunk` of those rows, in order. Each run of consecutive rows is one read."""
    with open(storage.local_copy(path), "rb") as f:
        shape, dtype, offset = _layout(f)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        total = shape[0] if rows is None else len(rows)
        for start in range(0, total, chunk):
            want = np.arange(start, min(start + chunk, total)) if rows is None else \
                np.asarray(rows[start : start + chunk], np.int64)
            if len(want) and (want[0] < 0 or want[-1] >= shape[0]):
                raise IndexError(f"{path}: rows outside [0, {shape[0]})")
            out = np.empty((len(want), *shape[1:]), dtype)
            flat = out.reshape(len(want), -1).view(np.uint8) if row_bytes else None
            runs = np.flatnonzero(np.diff(want) != 1) + 1
            for a, b in zip(np.r_[0, runs], np.r_[runs, len(want)]):
                f.seek(offset + int(want[a]) * row_bytes)
                if row_bytes and f.readinto(memoryview(flat[a:b]).cast("B")) != (b - a) * row_bytes:
                    raise ValueError(f"{path}: rows {want[a]}..{want[b - 1]} are past the end of the file")
            yield out


def read_rows(path, rows: np.ndarray, chunk: int = CHUNK_ROWS) -> np.ndarray:
    """`take_rows` gathered: (n, ...) of the file's dtype."""
    parts = list(take_rows(path, rows, chunk))
    if parts:
        return np.concatenate(parts)
    with open(storage.local_copy(path), "rb") as f:
        shape, dtype, _ = _layout(f)
    return np.zeros((0, *shape[1:]), dtype)


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
