"""Random access to patches by global index or by key (clustering works on members by index).

Reads only the records it needs: a cached scan of each shard's tar headers gives member offsets,
then each record is one seek + read + one strip decode, shared by all requested patches in it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shards.shardset import ShardError, ShardSet, patch_key, record_offsets
from shards.writer import decode_strip


class PatchStore:
    def __init__(self, root: str | Path):
        self.shards = ShardSet.open(root)
        self._key_index: dict[str, int] | None = None

    def __len__(self) -> int:
        return self.shards.total

    def _meta(self, shard: int, record: int, f=None) -> dict:
        try:
            return json.loads(self._member(shard, record, "json", f))
        except ValueError as exc:
            if isinstance(exc, ShardError):
                raise
            raise ShardError(f"{self.shards.names[shard]}: record {record} metadata is damaged") from None

    def _member(self, shard: int, record: int, ext: str, f=None) -> bytes:
        """One member's bytes; `f` an already open handle on the shard, else it is opened here."""
        path = self.shards.path(shard)
        offs = record_offsets(path)
        if record >= len(offs.header) or offs.members[ext][record, 0] < 0:
            raise ShardError(f"{path.name}: record {record} is missing or damaged")
        off, size = offs.members[ext][record]
        if f is None:
            with open(path, "rb") as own:
                return self._member(shard, record, ext, own)
        f.seek(int(off))
        data = f.read(int(size))
        if len(data) != size:
            raise ShardError(f"{path.name}: record {record} is truncated")
        return data

    def _by_record(self, indices: np.ndarray):
        """Groups indices by record -> iterator of (shard, record, slots, output positions)."""
        shard, pos = self.shards.locate(indices)
        per = self.shards.patches_per_record
        rec = pos // per
        order = np.lexsort((rec, shard))
        keys = np.stack([shard[order], rec[order]], 1)
        if len(keys) == 0:
            return
        cuts = np.flatnonzero(np.any(np.diff(keys, axis=0) != 0, axis=1)) + 1
        for group in np.split(order, cuts):
            yield int(shard[group[0]]), int(rec[group[0]]), pos[group] % per, group

    def get(self, indices) -> np.ndarray:
        """indices: (n,) int -> (n, P, P, 3) uint8 patches in the order asked."""
        indices = np.atleast_1d(np.asarray(indices, np.int64))
        p = self.shards.patch_px
        out = np.empty((len(indices), p, p, 3), np.uint8)
        for shard, record, slots, where in self._by_record(indices):
            data = self._member(shard, record, "jpg")
            try:
                strip = decode_strip(data, p, fast=True)
            except ValueError as exc:
                raise ShardError(f"{self.shards.names[shard]}: record {record} does not decode: {exc}") from None
            out[where] = strip[slots]
        return out

    def meta(self, indices) -> list[dict]:
        """indices: (n,) int -> [{"index", "key", "box", "label"}] in the order asked."""
        indices = np.atleast_1d(np.asarray(indices, np.int64))
        out: list[dict] = [{}] * len(indices)
        for shard, record, slots, where in self._by_record(indices):
            meta = self._meta(shard, record)
            for slot, w in zip(slots, where):
                out[w] = {"index": int(indices[w]), "key": meta["keys"][slot],
                          "box": meta["boxes"][slot], "label": meta["labels"][slot]}
        return out

    def labels(self, indices) -> np.ndarray:
        """indices: (n,) int -> (n,) int64 labels kept for evaluation (-1: none)."""
        return np.array([m["label"] for m in self.meta(indices)], np.int64)

    def index_of(self, keys) -> np.ndarray:
        """Patch keys (see `patch_key`) -> (n,) int64 global indices. Builds the key table once."""
        if self._key_index is None:
            self._key_index = {}
            index = 0
            for shard, count in enumerate(self.shards.counts):
                n_rec = -(-int(count) // self.shards.patches_per_record)
                with open(self.shards.path(shard), "rb") as f:  # one open per shard, not per record
                    metas = [self._meta(shard, record, f) for record in range(n_rec)]
                for meta in metas:
                    for key, box in zip(meta["keys"], meta["boxes"]):
                        self._key_index[patch_key(key, box)] = index
                        index += 1
        try:
            return np.array([self._key_index[k] for k in keys], np.int64)
        except KeyError as exc:
            raise KeyError(f"unknown patch key {exc.args[0]}") from None
