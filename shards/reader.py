"""Streaming patches to training code: a webdataset pipeline with exact, equal per-rank splits.

Every epoch the global patch sequence (shards in a seeded order) is cut into `world_size` equal
contiguous ranges of `total // world_size` patches (the remainder, < world_size patches, is dropped
that epoch), and each rank's range into one contiguous range per DataLoader worker. A worker reads
its range as a few shard slices: the offsets recorded when the shard was built give each record's
bytes, fetched with a few ranged reads (local files and bucket URIs alike). So every rank sees
the same number of samples (DDP never waits on a rank that ran dry) and, with one epoch of all
ranks and workers, every patch exactly once.

Damage is skipped and counted, never fatal: a truncated shard, a record missing its `.jpg` or
`.json`, an undecodable strip. `stats()` reports the counts; `pad=True` (for training) refills a
worker that lost patches by re-reading its own range, so per-rank counts stay equal.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.shardset import ShardError, ShardSet, iter_records, patch_key
from shards.writer import decode_strip

log = logging.getLogger(__name__)

MAX_WORKERS = 64
# patches: yielded (pad refills included); patches_lost: planned but unreadable; patches_repeated: pad
# refills; record_errors: damage events (one truncation can raise more than one)
STAT_FIELDS = ("patches", "patches_lost", "patches_repeated", "record_errors")


@dataclass(frozen=True)
class Slice:
    shard: int
    start: int  # first patch position within the shard
    stop: int  # one past the last


def plan_epoch(
    counts: np.ndarray, *, rank: int = 0, world_size: int = 1, worker: int = 0, num_workers: int = 1,
    epoch: int = 0, seed: int = 0, shuffle: bool = False,
) -> list[Slice]:
    """The shard slices one (rank, worker) reads in one epoch; see the module docstring."""
    counts = np.asarray(counts, np.int64)
    order = np.random.default_rng([seed, epoch]).permutation(len(counts)) if shuffle else np.arange(len(counts))
    per_rank = int(counts.sum()) // world_size
    base = rank * per_rank
    lo = base + per_rank * worker // num_workers
    hi = base + per_rank * (worker + 1) // num_workers
    slices, pos = [], 0
    for s in order:
        a, b = max(pos, lo), min(pos + int(counts[s]), hi)
        if a < b:
            slices.append(Slice(int(s), a - pos, b - pos))
        pos += int(counts[s])
    return slices


class _ErrorCounter:
    """webdataset error handler that counts instead of sleeping (warn_and_continue sleeps 0.5 s)."""

    def __init__(self, counters: torch.Tensor, row: int):
        self.counters, self.row = counters, row

    def __call__(self, exn: Exception) -> bool:
        if self.counters[self.row, 3] < 3:
            log.warning("skipping damaged shard data: %s", repr(exn)[:200])
        self.counters[self.row, 3] += 1
        return True


def _parse_record(record: int, members: dict, patch_px: int, per_record: int) -> tuple[dict, np.ndarray]:
    """A record's member bytes -> (metadata, patches). Raises on any inconsistency."""
    meta = json.loads(members["json"])
    patches = decode_strip(members["jpg"], patch_px)
    n = len(patches)
    if int(meta["first"]) != record * per_record or not len(meta["keys"]) == len(meta["boxes"]) == \
            len(meta["labels"]) == n:
        raise ValueError(f"record r{record:07d}: metadata does not match its {n} patches")
    return meta, patches


def read_slice(shards: ShardSet, sl: Slice, handler, copy: bool = False) -> Iterator[dict]:
    """Yields {"index", "key", "label", "image" (P, P, 3) uint8} for the readable patches of a slice.

    Images are views into their record's decoded strip unless `copy` (a shuffle buffer holding views
    would pin whole strips, 16x the memory).

    Reads the slice's records by the offsets in the shard's index part, as a few ranged reads of
    contiguous records (no tar parsing); a record that is cut off, whose member headers do not match
    the index, or that does not decode is passed to `handler` and costs only itself.
    """
    per = shards.patches_per_record
    path = shards.path(sl.shard)
    try:
        offs = shards.offsets(sl.shard)
    except ShardError as exc:  # an unusable index part: the slice is lost, not the epoch
        handler(exc)
        return
    shard_start = int(shards.starts[sl.shard])
    records = np.arange(sl.start // per, (sl.stop - 1) // per + 1)
    ok = offs.usable(records)
    if not ok.all():  # cut off by truncation, or not in the index
        handler(ShardError(f"{path.name}: {int((~ok).sum())} record(s) of records {records[0]}-{records[-1]} "
                           "are missing or cut off"))
    for record, members in iter_records(path, offs, records[ok]):
        try:
            if isinstance(members, Exception):
                raise members
            meta, patches = _parse_record(record, members, shards.patch_px, per)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            handler(exc)
            continue
        first = record * per
        for j in range(max(sl.start - first, 0), min(sl.stop - first, len(patches))):
            yield {"index": shard_start + first + j, "key": patch_key(meta["keys"][j], meta["boxes"][j]),
                   "label": int(meta["labels"][j]), "image": patches[j].copy() if copy else patches[j]}


class PatchStream(IterableDataset):
    """Patches of a shard set for one rank; split further over DataLoader workers.

    rank/world_size default to torch.distributed when it is initialised, else 0/1. `len()` is the
    number of patches this rank gets per epoch. Call `set_epoch(e)` before each epoch when shuffling.
    """

    def __init__(
        self, root, *, rank: int | None = None, world_size: int | None = None,
        shuffle: bool = False, shuffle_buffer: int = 2000, seed: int = 0, pad: bool = False,
    ):
        self.shards = ShardSet.open(root)
        if rank is None or world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if dist else 0
            world_size = torch.distributed.get_world_size() if dist else 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if self.shards.total < world_size:
            raise ShardError(f"{self.shards.total} patches cannot feed {world_size} ranks")
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.shuffle_buffer, self.seed, self.pad = shuffle, shuffle_buffer, seed, pad
        self.epoch = 0
        # one row per loader worker (row 0: the main process); shared memory survives fork and spawn
        self.counters = torch.zeros((MAX_WORKERS + 1, len(STAT_FIELDS)), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.shards.total // self.world_size

    def worker_counts(self, num_workers: int) -> list[int]:
        """Patches each of `num_workers` loader workers yields per epoch (they differ by at most 1)."""
        n, k = len(self), max(num_workers, 1)
        return [n * (w + 1) // k - n * w // k for w in range(k)]

    def stats(self) -> dict:
        totals = self.counters.sum(0).tolist()
        return dict(zip(STAT_FIELDS, totals))

    def reset_stats(self) -> None:
        self.counters.zero_()

    def _read(self, slices: list[Slice], row: int, first_pass: bool = True) -> Iterator[dict]:
        handler = _ErrorCounter(self.counters, row)
        copy = self.shuffle and self.shuffle_buffer > 1
        for sl in slices:
            n, done = 0, False
            try:
                for sample in read_slice(self.shards, sl, handler, copy=copy):
                    n += 1
                    yield sample
                done = True
            finally:  # also when the consumer stops early (pad mode)
                self.counters[row, 0 if first_pass else 2] += n
                if done and first_pass:
                    self.counters[row, 1] += (sl.stop - sl.start) - n

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if num_workers > MAX_WORKERS:
            raise ValueError(f"at most {MAX_WORKERS} loader workers")
        row = worker + 1 if info else 0
        slices = plan_epoch(
            self.shards.counts, rank=self.rank, world_size=self.world_size, worker=worker,
            num_workers=num_workers, epoch=self.epoch, seed=self.seed, shuffle=self.shuffle,
        )
        source = partial(self._padded, slices, row, worker) if self.pad else partial(self._read, slices, row)
        stages: list = [source]
        if self.shuffle and self.shuffle_buffer > 1:
            seed = hash((self.seed, self.epoch, self.rank, worker)) & 0x7FFFFFFF
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer // 4, seed=seed))
        return iter(wds.DataPipeline(*stages))

    def _padded(self, slices: list[Slice], row: int, worker: int) -> Iterator[dict]:
        """Yields exactly the planned count. Patches lost to damage are made up with readable ones
        from anywhere in the set (starting at a point that differs per rank and worker), so equal
        per-rank counts survive a damaged shard; only a set with no readable patch is an error."""
        want = sum(sl.stop - sl.start for sl in slices)
        for sample in self._read(slices, row):
            want -= 1
            yield sample
        everything = plan_epoch(self.shards.counts, epoch=self.epoch, seed=self.seed, shuffle=True)
        turn = (self.rank * MAX_WORKERS + worker) % len(everything)
        everything = everything[turn:] + everything[:turn]
        while want > 0:
            got = 0
            for sample in self._read(everything, row, first_pass=False):
                yield sample
                got += 1
                if got == want:
                    break
            if got == 0:
                raise ShardError(f"no readable patch in {self.shards.root}")
            want -= got


class PatchLoader:
    """A DataLoader over a PatchStream that checks each epoch yielded something and reports damage.

    Batches are dicts: image (B, P, P, 3) uint8, index (B,) int64, label (B,) int64, key list[str].
    """

    def __init__(self, stream: PatchStream, *, batch_size: int, num_workers: int = 0, **loader_kw):
        self.stream = stream
        self.loader = DataLoader(
            stream, batch_size=batch_size, num_workers=num_workers, persistent_workers=False, **loader_kw,
        )

    def __len__(self) -> int:
        """Batches per epoch: each loader worker batches its own share, last batch partial."""
        b = self.loader.batch_size
        return sum(-(-n // b) for n in self.stream.worker_counts(self.loader.num_workers))

    def __iter__(self):
        self.stream.reset_stats()
        yield from self.loader
        stats = self.stream.stats()
        if stats["patches"] + stats["patches_repeated"] == 0:
            raise ShardError(
                f"no readable sample in {self.stream.shards.root} "
                f"({stats['record_errors']} damage events, {stats['patches_lost']} patches lost)"
            )
        if stats["patches_lost"] or stats["record_errors"]:
            log.warning("epoch met %d damage events: %d patches lost, %d refilled", stats["record_errors"],
                        stats["patches_lost"], stats["patches_repeated"])

    def stats(self) -> dict:
        return self.stream.stats()
