"""Figures of what the learned attribute bits mean and what they retrieve, as plain PNG arrays.

`bit_extremes` is the paper's Fig. 4: for a few bits, the patches that push the bit's score furthest to
either side, so one can read off the attribute a bit encodes. `retrieval_grid` is Fig. 7: per query,
the top patches each hashing method retrieves, framed green or red by whether they share the query's
held-out label. No font is needed: the row order is returned for the caption.
"""
from __future__ import annotations

import numpy as np

from pretrain.figures import grid

GREEN = (0, 200, 0)
RED = (220, 0, 0)


def pick_bits(scores: np.ndarray, n: int) -> list[int]:
    """scores: (N, K) float -> the n most balanced bits (share of scores > 0 closest to 1/2), most
    balanced first: a balanced bit splits the data, so both of its extremes are worth looking at."""
    return balanced_bits((np.asarray(scores) > 0).mean(0), n)


def balanced_bits(share: np.ndarray, n: int) -> list[int]:
    """share: (K,) float, each bit's share of ones -> `pick_bits`' choice."""
    return [int(b) for b in np.argsort(np.abs(np.asarray(share) - 0.5), kind="stable")[:n]]


def extreme_picks(scores: np.ndarray, bits: list[int], per_side: int = 8) -> np.ndarray:
    """scores: (N, K) float -> (len(bits), 2 min(per_side, N)) int64 rows: per bit the `per_side` lowest
    scores then the `per_side` highest, in increasing score (ties by row)."""
    scores = np.asarray(scores)
    per_side = min(per_side, len(scores))
    picks = []
    for b in bits:
        order = np.argsort(scores[:, b], kind="stable")
        picks.append(np.concatenate([order[:per_side], order[len(order) - per_side :]]))
    return np.array(picks, np.int64).reshape(len(bits), 2 * per_side)


def bit_extremes(scores: np.ndarray, patches_of, bits: list[int], per_side: int = 8,
                 pad_px: int = 2) -> np.ndarray:
    """scores: (N, K) float (pre-threshold bit scores, e.g. W^T f(x)); patches_of: indices (n,) int64 ->
    (n, P, P, 3) uint8. One row per bit in `bits`: the `per_side` most negative patches, a blank column,
    the `per_side` most positive; each row reads in increasing score, so the two extremes sit at the
    outer edges. -> (H, W, 3) uint8."""
    return extremes_figure(extreme_picks(scores, bits, per_side), patches_of, pad_px)


def extremes_figure(picks: np.ndarray, patches_of, pad_px: int = 2) -> np.ndarray:
    """picks: (B, 2 per_side) int64 rows (`extreme_picks`, `scan.extreme_rows`) -> `bit_extremes`' figure."""
    n_bits, per_side = len(picks), picks.shape[1] // 2
    tiles = patches_of(picks.ravel())
    tiles = tiles.reshape(n_bits, 2 * per_side, *tiles.shape[1:])
    blank = np.full((n_bits, 1) + tiles.shape[2:], 255, np.uint8)
    rows = np.concatenate([tiles[:, :per_side], blank, tiles[:, per_side:]], axis=1)
    return grid(rows.reshape(-1, *rows.shape[2:]), cols=2 * per_side + 1, pad_px=pad_px)


def _frame(tile: np.ndarray, colour: tuple[int, int, int], width_px: int) -> np.ndarray:
    """A copy of tile (P, P, 3) uint8 with its outer `width_px` pixels painted `colour`: drawn inside the
    patch so every tile keeps its size and the grid stays regular."""
    out = tile.copy()
    out[:width_px], out[-width_px:], out[:, :width_px], out[:, -width_px:] = colour, colour, colour, colour
    return out


def retrieval_grid(queries: np.ndarray, ranked: dict[str, np.ndarray], patches_of,
                   labels: np.ndarray | None = None, pad_px: int = 2,
                   border_px: int = 2) -> tuple[np.ndarray, list[str]]:
    """queries: (Q,) int rows; ranked: method -> (Q, top) int rows retrieved for each query (best first,
    -1 = none, left blank); patches_of as in `bit_extremes`; labels: (N,) int or None.

    Per query a block of one row per method: the query patch (first row of the block only), a blank
    gap, then that method's top patches, framed `GREEN` when their label equals the query's and `RED`
    otherwise (no frames without labels). Blocks are separated by a blank row.
    -> (image (H, W, 3) uint8, methods: the row order within every block, i.e. the dict's order)."""
    queries = np.asarray(queries, np.int64)
    labels = None if labels is None else np.asarray(labels)
    methods = list(ranked)
    top = max(np.asarray(r).shape[1] for r in ranked.values())
    wanted = np.concatenate([queries, *(np.asarray(r, np.int64).ravel() for r in ranked.values())])
    rows_needed = np.unique(wanted[wanted >= 0])
    found = dict(zip(rows_needed.tolist(), patches_of(rows_needed)))
    blank = np.full_like(next(iter(found.values())), 255)
    tiles = []
    for qi, q in enumerate(queries):
        if qi:
            tiles += [blank] * (top + 2)
        for m, name in enumerate(methods):
            hits = np.asarray(ranked[name][qi], np.int64)
            tiles += [found[int(q)] if m == 0 else blank, blank]
            for h in hits:
                tile = found[int(h)] if h >= 0 else blank
                if labels is not None and h >= 0:
                    tile = _frame(tile, GREEN if labels[h] == labels[q] else RED, border_px)
                tiles.append(tile)
            tiles += [blank] * (top - len(hits))
    return grid(np.stack(tiles), cols=top + 2, pad_px=pad_px), methods
