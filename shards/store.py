"""Random access to patches by global index or by key (clustering works on members by index).

Reads only the records it needs: each shard's index part (written with the shard) gives record
offsets, then each record is one ranged read (a seek + read locally, a ranged GET on a bucket) and one
strip decode, shared by all requested patches in it.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np

from infra import storage
from shards.shardset import ShardError, ShardSet, iter_records, patch_key
from shards.writer import decode_strip

FETCHERS = 16


class PatchStore:
    def __init__(self, root):
        """`root`: a local folder or a URI (s3://...) holding shards.json and its shards."""
        self.shards = ShardSet.open(root)
        self._key_index: dict[str, int] | None = None

    def __len__(self) -> int:
        return self.shards.total

    @staticmethod
    def _parse_meta(name: str, record: int, data: bytes) -> dict:
        try:
            return json.loads(data)
        except ValueError:
            raise ShardError(f"{name}: record {record} metadata is damaged") from None

    def _fetch(self, groups: list) -> Iterator[dict[str, bytes]]:
        """The member bytes of each (shard, record, ...) group in order; from a bucket, up to FETCHERS
        ranged GETs in flight at once (each record is still one GET)."""
        if len(groups) < 2 or not storage.is_remote(self.shards.root):
            yield from (self._members(g[0], g[1]) for g in groups)
            return
        with ThreadPoolExecutor(FETCHERS) as pool:
            yield from pool.map(lambda g: self._members(g[0], g[1]), groups)

    def _members(self, shard: int, record: int) -> dict[str, bytes]:
        """One record's member bytes {"jpg", "json"}: one ranged read of the record."""
        name, offs = self.shards.names[shard], self.shards.offsets(shard)
        if not offs.usable([record])[0]:
            raise ShardError(f"{name}: record {record} is missing or damaged")
        lo, hi = int(offs.header[record]), int(offs.end[record])
        data = storage.read_range(str(self.shards.path(shard)), lo, hi - lo)
        if len(data) != hi - lo:
            raise ShardError(f"{name}: record {record} is truncated")
        try:
            return offs.split(record, data, lo)
        except ShardError as exc:
            raise ShardError(f"{name}: {exc}") from None

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
        groups = list(self._by_record(indices))
        for (shard, record, slots, where), members in zip(groups, self._fetch(groups)):
            data = members["jpg"]
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
        groups = list(self._by_record(indices))
        for (shard, record, slots, where), members in zip(groups, self._fetch(groups)):
            meta = self._parse_meta(self.shards.names[shard], record, members["json"])
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
            table: dict[str, int] = {}
            index = 0
            for shard, count in enumerate(self.shards.counts):
                n_rec = -(-int(count) // self.shards.patches_per_record)
                offs = self.shards.offsets(shard)
                records = np.arange(n_rec)
                if not offs.usable(records).all():
                    bad = int(records[~offs.usable(records)][0])
                    raise ShardError(f"{self.shards.names[shard]}: record {bad} is missing or damaged")
                metas = []  # the shard's records in a few ranged reads, not one per record
                for record, members in iter_records(self.shards.path(shard), offs, records):
                    if isinstance(members, ShardError):
                        raise members
                    metas.append(self._parse_meta(self.shards.names[shard], record, members["json"]))
                for meta in metas:
                    for key, box in zip(meta["keys"], meta["boxes"]):
                        table[patch_key(key, box)] = index
                        index += 1
            self._key_index = table
        try:
            return np.array([self._key_index[k] for k in keys], np.int64)
        except KeyError as exc:
            raise KeyError(f"unknown patch key {exc.args[0]}") from None
