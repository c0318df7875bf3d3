"""A built set of shards: `shards.json` plus the parts it lists, and the global patch index.

Patch index i (0 <= i < total) is the i-th patch in shard order; it is the identity later stages use
(features, cluster members, codes all align with it). The shards live in a local folder or under a
bucket URI (`s3://...`, see infra/storage.py). `shards.json` holds:

  {"format": "discoattr-patches/3", "patch_size_px": 96, "patches_per_record": 16,
   "source": {...how it was built...}, "classes": [...],
   "shards": [{"name", "patches", "records", "bytes", "sha256", "images", "skipped_images",
               "index": {"name", "bytes", "sha256"}, "meta": {"name", "bytes", "sha256"}}, ...]}

Each shard `shard-NNNNNN.tar` has two parts written with it. Its index part `shard-NNNNNN.idx.npy`: an
(R, 6) int64 array, per record: its first tar header's offset, the end of its last member (padded to
512), and the (data offset, size) of its `.jpg` and `.json` members. Readers fetch records by these
offsets with ranged reads; no tar header scan. Its metadata part `shard-NNNNNN.meta.npz`: every patch's
label, source key and box as arrays (shards/meta.py), so that nothing reads records to learn them.
Format /2 had no metadata part: such shards are refused with a line saying to build them again.
"""
from __future__ import annotations

import io
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property, lru_cache, partial
from pathlib import Path

import numpy as np

from infra import storage
from infra.storage import Location, StorageError

SHARDS_JSON = "shards.json"
FORMAT = "discoattr-patches/3"
MEMBERS = ("jpg", "json")
INDEX_SUFFIX = ".idx.npy"
META_SUFFIX = ".meta.npz"
BLOCK = 512  # tar block: a header, and data is padded to it


class ShardError(ValueError):
    """Shards that cannot be used; the message is one line for the user."""


def patch_key(source_key: str, box) -> str:
    """A patch's identity as text: its source key and box x0,y0,x1,y1 (e.g. `cat/1.jpg@0,0,96,96`)."""
    return f"{source_key}@{','.join(str(int(v)) for v in box)}"


def index_name(shard_name: str) -> str:
    """`shard-000001.tar` -> `shard-000001.idx.npy`, its record index part."""
    return shard_name.removesuffix(".tar") + INDEX_SUFFIX


def meta_name(shard_name: str) -> str:
    """`shard-000001.tar` -> `shard-000001.meta.npz`, its metadata part (labels, keys, boxes)."""
    return shard_name.removesuffix(".tar") + META_SUFFIX


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


@dataclass(frozen=True)
class ShardSet:
    root: Location  # a Path, or a UPath for a bucket URI
    names: tuple[str, ...]
    counts: np.ndarray  # (S,) int64 patches per shard
    patch_px: int
    patches_per_record: int
    info: dict
    _offsets: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def open(cls, root) -> "ShardSet":
        """Opens the shards at a local folder or a URI; one-line ShardError when they cannot be used."""
        try:
            root = storage.to_path(root)
        except StorageError as exc:
            raise ShardError(str(exc)) from None
        index = root / SHARDS_JSON
        try:
            text = index.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ShardError(f"no {SHARDS_JSON} in {root}: build shards first (python -m shards.build)") from None
        except Exception as exc:  # noqa: BLE001 - each store's client has its own error types
            raise ShardError(f"cannot read {index}: {one_line(exc)}") from None
        try:
            info = json.loads(text)
            shards = info["shards"]
            counts = np.array([int(s["patches"]) for s in shards], np.int64)
            names = tuple(s["name"] for s in shards)
            patch_px, per_record = int(info["patch_size_px"]), int(info["patches_per_record"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ShardError(f"{index} is not a valid shard index: {exc}") from None
        if info.get("format") != FORMAT:
            why = " (no label/key arrays)" if info.get("format") == "discoattr-patches/2" else ""
            raise ShardError(f"{index} has format {info.get('format')!r}{why}; this version reads {FORMAT!r} "
                             "(build the shards again: python -m shards.build, or --force shard in a run)")
        try:
            present = set(storage.list_names(root, "shard-"))
        except Exception as exc:  # noqa: BLE001
            raise ShardError(f"cannot list {root}: {one_line(exc)}") from None
        missing = [n for s in shards for n in (s["name"], s.get("index", {}).get("name", index_name(s["name"])),
                                               s.get("meta", {}).get("name", meta_name(s["name"])))
                   if n not in present]
        if missing:
            raise ShardError(f"{len(missing)} shard part(s) listed in {index} are missing, first: {missing[0]}")
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

    def path(self, shard: int) -> Location:
        return self.root / self.names[shard]

    def offsets(self, shard: int) -> "RecordOffsets":
        """The shard's record layout (its index part, fetched once per process and checked against the
        sha256 in shards.json), with records past the shard's actual end marked missing."""
        if shard not in self._offsets:
            sha = self.info["shards"][shard].get("index", {}).get("sha256")
            self._offsets[shard] = record_offsets(str(self.path(shard)), sha)
        return self._offsets[shard]

    def meta_file(self, shard: int) -> Path:
        """A local file with the shard's metadata part (from a bucket: the node cache), checked against
        the sha256 in shards.json once per process."""
        entry = self.info["shards"][shard].get("meta", {})
        uri = str(self.root / entry.get("name", meta_name(self.names[shard])))
        return _checked_copy(uri, entry.get("sha256"), "metadata part")

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

    header: np.ndarray  # (R,) int64 offset of the record's first tar header; -1 where missing
    end: np.ndarray  # (R,) int64 one past the record's last member block; -1 where missing
    members: dict  # ext -> (R, 2) int64 (data offset, size); -1 where missing
    file_size: int  # the shard's actual size: records past it are marked missing

    def usable(self, records) -> np.ndarray:
        """(n,) bool: the record is listed with all its members and lies within the shard."""
        records = np.asarray(records, np.int64)
        ok = (records >= 0) & (records < len(self.header))
        r = records[ok]
        good = (self.header[r] >= 0) & (self.end[r] >= 0)
        for ext in MEMBERS:
            good &= self.members[ext][r, 0] >= 0
        ok[np.flatnonzero(ok)] = good
        return ok

    def split(self, record: int, buf: bytes, base: int) -> dict[str, bytes]:
        """The member bytes of `record` out of `buf` (the shard's bytes from offset `base`, holding the
        whole record); checks each member's tar header. Raises ShardError on damage."""
        out = {}
        for ext in MEMBERS:
            off, size = (int(v) for v in self.members[ext][record])
            lo = off - base
            if off < 0 or lo < BLOCK or lo + size > len(buf):
                raise ShardError(f"record {record}: .{ext} is missing or cut off")
            try:
                hdr = tarfile.TarInfo.frombuf(bytes(buf[lo - BLOCK : lo]), "utf-8", "surrogateescape")
            except tarfile.HeaderError as exc:
                raise ShardError(f"record {record}: damaged tar header of .{ext} ({exc})") from None
            if hdr.name != f"r{record:07d}.{ext}" or hdr.size != size:
                raise ShardError(f"record {record}: tar header of .{ext} does not match the shard index")
            out[ext] = bytes(buf[lo : lo + size])
        return out


def offsets_table(tar_path: str | Path) -> np.ndarray:
    """Scans a LOCAL, freshly written shard once -> its (R, 6) int64 index part (see the module doc)."""
    found: dict[int, list[int]] = {}
    with tarfile.open(tar_path, "r:") as tar:
        for m in tar:
            stem, _, ext = m.name.partition(".")
            if not (stem.startswith("r") and stem[1:].isdigit()) or ext not in MEMBERS:
                continue
            row = found.setdefault(int(stem[1:]), [-1, -1, -1, -1, -1, -1])
            row[0] = m.offset if row[0] < 0 else min(row[0], m.offset)
            row[1] = max(row[1], m.offset_data + -(-m.size // BLOCK) * BLOCK)
            col = 2 + 2 * MEMBERS.index(ext)
            row[col : col + 2] = [m.offset_data, m.size]
    table = np.full((max(found) + 1 if found else 0, 6), -1, np.int64)
    for r, row in found.items():
        table[r] = row
    return table


def table_bytes(table: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(table, np.int64), allow_pickle=False)
    return buf.getvalue()


@lru_cache(maxsize=None)
def _checked_copy(uri: str, sha256: str | None, what: str) -> Path:
    """A local copy of a part whose sha256 shards.json records (checked once per process; the node cache
    checks a copy from a bucket as it fetches it). One-line ShardError when missing or changed."""
    try:
        local = storage.local_copy(uri, sha256)
        if sha256 is not None and not storage.is_remote(uri) and storage.sha256_file(local) != sha256:
            raise StorageError(f"{uri}: content does not match its sha256 in {SHARDS_JSON} (build the "
                               "shards again)")
    except FileNotFoundError:
        raise ShardError(f"{uri}: the shard's {what} is missing (build the shards again)") from None
    except StorageError as exc:
        raise ShardError(str(exc)) from None
    return Path(local)


@lru_cache(maxsize=1024)
def _load_table(index_uri: str, sha256: str | None, stamp) -> np.ndarray:
    try:
        local = storage.local_copy(index_uri, sha256)  # a copy from a bucket is checked against sha256
        if sha256 is not None and not storage.is_remote(index_uri) and storage.sha256_file(local) != sha256:
            raise StorageError(f"{index_uri}: content does not match its sha256 in {SHARDS_JSON} (build the "
                               "shards again)")
        table = np.load(local, allow_pickle=False)
    except FileNotFoundError:
        raise ShardError(f"{index_uri}: the shard's record index is missing (build the shards again)") from None
    except StorageError as exc:
        raise ShardError(str(exc)) from None
    except ValueError as exc:
        raise ShardError(f"{index_uri}: not a shard record index ({one_line(exc)})") from None
    if table.ndim != 2 or table.shape[1] != 6 or table.dtype != np.int64:
        raise ShardError(f"{index_uri}: not a shard record index (shape {table.shape}, {table.dtype})")
    table.setflags(write=False)
    return table


def record_offsets(path, index_sha256: str | None = None, file_size: int | None = None) -> RecordOffsets:
    """A shard's record layout from its index part (cached by path and sha256; a local index without
    a sha256 by path, mtime and size). Records that end past the shard's actual size (`file_size`, else
    looked up: one stat or HEAD) are marked missing."""
    uri = str(path)
    idx = str(storage.to_path(uri).with_name(index_name(storage.to_path(uri).name)))
    stamp = None
    if index_sha256 is None and not storage.is_remote(idx):
        st = Path(idx).stat() if Path(idx).is_file() else None
        stamp = (st.st_mtime_ns, st.st_size) if st else None
    table = _load_table(idx, index_sha256, stamp)
    if file_size is None:
        file_size = storage.size_of(uri) or 0
    header, end = table[:, 0].copy(), table[:, 1].copy()
    cut = end > file_size
    header[cut] = end[cut] = -1
    members = {}
    for k, ext in enumerate(MEMBERS):
        m = table[:, 2 + 2 * k : 4 + 2 * k].copy()
        m[cut] = -1
        members[ext] = m
    return RecordOffsets(header, end, members, int(file_size))


def iter_records(path, offs: RecordOffsets, records, chunk: int = 1 << 22):
    """(record, {ext: bytes}) for the usable records among `records` (ascending), read in runs of
    contiguous records (growing from chunk/16 to `chunk` bytes), one ranged read each, the next run
    fetched (in a thread) while the caller works on this one; a record whose bytes are damaged or cut short yields
    (record, ShardError) instead."""
    uri = str(path)
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    records = [int(r) for r in records]
    runs, i, limit = [], 0, max(chunk // 16, 1)
    while i < len(records):
        j, lo = i + 1, int(offs.header[records[i]])
        while j < len(records) and offs.header[records[j]] == offs.end[records[j - 1]] \
                and offs.end[records[j]] - lo <= limit:
            j += 1
        runs.append((lo, int(offs.end[records[j - 1]]), records[i:j]))
        i, limit = j, min(limit * 4, chunk)  # a small first read, so that the wait before the first
        # record is short and the later, larger reads overlap the caller's work on the earlier ones
    if not runs:
        return
    with ThreadPoolExecutor(1) as pool:
        fetch = partial(pool.submit, storage.read_range, uri)
        pending = fetch(runs[0][0], runs[0][1] - runs[0][0])
        for k, (lo, _, run) in enumerate(runs):
            buf = memoryview(pending.result())
            if k + 1 < len(runs):
                pending = fetch(runs[k + 1][0], runs[k + 1][1] - runs[k + 1][0])
            for r in run:
                try:
                    yield r, offs.split(r, buf, lo)
                except ShardError as exc:
                    yield r, ShardError(f"{name}: {exc}")
