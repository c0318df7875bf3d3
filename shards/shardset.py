"""A built set of shards: `shards.json` plus the tars it lists, and the global patch index.

Patch index i (0 <= i < total) is the i-th patch in shard order; it is the identity later stages use
(features, cluster members, codes all align with it). `shards.json` holds:

  {"format": "discoattr-patches/1", "patch_size_px": 96, "patches_per_record": 16,
   "source": {...how it was built...}, "classes": [...],
   "shards": [{"name", "patches", "records", "bytes", "sha256", "images", "skipped_images"}, ...]}
"""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

SHARDS_JSON = "shards.json"
FORMAT = "discoattr-patches/1"


class ShardError(ValueError):
    """Shards that cannot be used; the message is one line for the user."""


def patch_key(source_key: str, box) -> str:
    """A patch's identity as text: its source key and box x0,y0,x1,y1 (e.g. `cat/1.jpg@0,0,96,96`)."""
    return f"{source_key}@{','.join(str(int(v)) for v in box)}"


@dataclass(frozen=True)
class ShardSet:
    root: Path
    names: tuple[str, ...]
    counts: np.ndarray  # (S,) int64 patches per shard
    patch_px: int
    patches_per_record: int
    info: dict

    @classmethod
    def open(cls, root: str | Path) -> "ShardSet":
        root = Path(root)
        index = root / SHARDS_JSON
        if not index.is_file():
            raise ShardError(f"no {SHARDS_JSON} in {root}: build shards first (python -m shards.build)")
        try:
            info = json.loads(index.read_text())
            shards = info["shards"]
            counts = np.array([int(s["patches"]) for s in shards], np.int64)
            names = tuple(s["name"] for s in shards)
            patch_px, per_record = int(info["patch_size_px"]), int(info["patches_per_record"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ShardError(f"{index} is not a valid shard index: {exc}") from None
        if info.get("format") != FORMAT:
            raise ShardError(f"{index} has format {info.get('format')!r}; this version reads {FORMAT!r}")
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise ShardError(f"{len(missing)} shard(s) listed in {index} are missing, first: {missing[0]}")
        if counts.sum() == 0:
            raise ShardError(f"{index} lists no patches")
        return cls(root, names, counts, patch_px, per_record, info)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @cached_property
    def starts(self) -> np.ndarray:
        """(S,) int64 global index of each shard's first patch."""
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    def path(self, shard: int) -> Path:
        return self.root / self.names[shard]

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global indices (n,) -> (shard ids (n,), positions within the shard (n,))."""
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.total):
            raise IndexError(f"patch index out of range [0, {self.total})")
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        return shard, indices - self.starts[shard]


@dataclass(frozen=True)
class RecordOffsets:
    """Byte layout of one shard: per record, where its tar header starts and where its members lie."""

    header: np.ndarray  # (R,) int64 offset of the record's first tar header
    members: dict  # ext -> (R, 2) int64 (data offset, size); -1 where missing
    file_size: int


@lru_cache(maxsize=256)
def _scan(path: str, mtime_ns: int, size: int) -> RecordOffsets:
    header: dict[int, int] = {}
    members: dict[str, dict[int, tuple[int, int]]] = {"jpg": {}, "json": {}}
    try:
        # reads headers only (data is seeked over); ignore_zeros resyncs after a damaged header
        with tarfile.open(path, "r:", ignore_zeros=True) as tar:
            for m in tar:
                stem, _, ext = m.name.partition(".")
                if not (stem.startswith("r") and stem[1:].isdigit()) or ext not in members:
                    continue
                rec = int(stem[1:])
                header[rec] = min(header.get(rec, m.offset), m.offset)
                members[ext][rec] = (m.offset_data, m.size)
    except (tarfile.TarError, EOFError, ValueError):
        pass  # a truncated shard: keep the records found before the damage
    n = max(header) + 1 if header else 0
    hdr = np.full(n, -1, np.int64)
    for r, off in header.items():
        hdr[r] = off
    table = {}
    for ext, found in members.items():
        arr = np.full((n, 2), -1, np.int64)
        for r, v in found.items():
            arr[r] = v
        table[ext] = arr
    return RecordOffsets(hdr, table, size)


def record_offsets(path: str | Path) -> RecordOffsets:
    """Scans a shard's tar headers once per process (cached on path, mtime and size)."""
    st = Path(path).stat()
    return _scan(str(path), st.st_mtime_ns, st.st_size)
