"""Random access to patches by global index or by key (clustering works on members by index).

Pixels: reads only the records it needs: each shard's index part (written with the shard) gives record
offsets, then each record is one ranged read (a seek + read locally, a ranged GET on a bucket) and one
strip decode, shared by all requested patches in it.

Labels, keys and boxes come from each shard's metadata part (shards/meta.py), read once per shard and
kept, never from the records' JSON: the labels of all patches are one small read per shard and 8 bytes
a patch, where parsing every record's JSON fetched and decoded every record on the driver.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np

from infra import storage
from shards.meta import ShardKeys, read_keys, read_labels
from shards.shardset import ShardError, ShardSet
from shards.writer import decode_strip

FETCHERS = 16


class PatchStore:
    def __init__(self, root):
        """`root`: a local folder or a URI (s3://...) holding shards.json and its shards."""
        self.shards = ShardSet.open(root)
        self._key_index: dict[str, int] | None = None
        self._labels: dict[int, np.ndarray] = {}
        self._keys: dict[int, ShardKeys] = {}

    def __len__(self) -> int:
        return self.shards.total

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

    def _by_shard(self, indices: np.ndarray):
        """Groups indices by shard -> iterator of (shard, positions in the shard, output positions).
        Ascending indices (all patches, cluster members) are cut by shard without a sort or per-index
        temporaries."""
        if len(indices) and indices[0] >= 0 and indices[-1] < self.shards.total and np.all(indices[1:] >= indices[:-1]):
            starts = self.shards.starts
            cuts = np.searchsorted(indices, np.r_[starts, self.shards.total])
            for s in np.flatnonzero(cuts[1:] > cuts[:-1]):
                a, b = int(cuts[s]), int(cuts[s + 1])
                yield int(s), indices[a:b] - starts[s], np.arange(a, b)
            return
        shard, pos = self.shards.locate(indices)
        order = np.argsort(shard, kind="stable")
        cuts = np.flatnonzero(np.diff(shard[order])) + 1
        for group in np.split(order, cuts) if len(order) else []:
            yield int(shard[group[0]]), pos[group], group

    def _load(self, shards: list[int], cache: dict, read) -> None:
        """Reads the metadata parts of `shards` not in `cache` (from a bucket, FETCHERS at a time)."""
        todo = [s for s in shards if s not in cache]

        def one(s):
            return read(self.shards.meta_file(s), self.shards.names[s], int(self.shards.counts[s]))

        if len(todo) > 1 and storage.is_remote(self.shards.root):
            with ThreadPoolExecutor(FETCHERS) as pool:
                cache.update(zip(todo, pool.map(one, todo)))
        else:
            cache.update((s, one(s)) for s in todo)

    def labels(self, indices) -> np.ndarray:
        """indices: (n,) int -> (n,) int64 labels kept for evaluation (-1: none), from the shards'
        metadata parts (read once per shard per store)."""
        indices = np.atleast_1d(np.asarray(indices, np.int64))
        out = np.empty(len(indices), np.int64)
        groups = list(self._by_shard(indices))
        self._load([g[0] for g in groups], self._labels, read_labels)
        for shard, pos, where in groups:
            out[where] = self._labels[shard][pos]
        return out

    def keys(self, indices) -> list[str]:
        """indices: (n,) int -> the patches' keys (`shards.shardset.patch_key`: source key and box), in
        the order asked."""
        indices = np.atleast_1d(np.asarray(indices, np.int64))
        out: list[str] = [""] * len(indices)
        groups = list(self._by_shard(indices))
        self._load([g[0] for g in groups], self._keys, read_keys)
        for shard, pos, where in groups:
            for w, key in zip(where.tolist(), self._keys[shard].keys(pos)):
                out[w] = key
        return out

    def sources(self) -> tuple[np.ndarray, np.ndarray]:
        """Every patch's source key, by image: (sources (I,) str, image (N,) int64 rows of it). A test on
        source keys (a glob) runs once per image, not once per patch."""
        self._load(list(range(len(self.shards.names))), self._keys, read_keys)
        parts = [self._keys[s] for s in range(len(self.shards.names))]
        starts = np.cumsum([0] + [len(k.sources) for k in parts])
        image = np.concatenate([k.image.astype(np.int64) + start for k, start in zip(parts, starts)])
        return np.concatenate([k.sources for k in parts]), image

    def meta(self, indices) -> list[dict]:
        """indices: (n,) int -> [{"index", "key" (the source key), "box", "label"}] in the order asked."""
        indices = np.atleast_1d(np.asarray(indices, np.int64))
        labels = self.labels(indices)
        out: list[dict] = [{}] * len(indices)
        groups = list(self._by_shard(indices))
        self._load([g[0] for g in groups], self._keys, read_keys)
        for shard, pos, where in groups:
            k = self._keys[shard]
            for w, src, box in zip(where.tolist(), k.sources[k.image[pos]].tolist(), k.boxes[pos].tolist()):
                out[w] = {"index": int(indices[w]), "key": src, "box": box, "label": int(labels[w])}
        return out

    def index_of(self, keys) -> np.ndarray:
        """Patch keys (see `patch_key`) -> (n,) int64 global indices. Builds the key table once."""
        if self._key_index is None:
            every = self.keys(np.arange(len(self)))
            self._key_index = dict(zip(every, range(len(every))))
        try:
            return np.array([self._key_index[k] for k in keys], np.int64)
        except KeyError as exc:
            raise KeyError(f"unknown patch key {exc.args[0]}") from None
