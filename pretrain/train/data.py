"""Training batches of cluster members (paper sec. 3.1): the clusters are the classes.

The members' pixels are gathered once per round into `members.npy`, a (M, P, P, 3) uint8 array in
the order of the cluster file's `member_index` (cluster c's members are rows offsets[c]:offsets[c+1]),
decoded by parallel tasks into parts and assembled by one (a path or a bucket URI). Every training process memory-maps it (a URI through its node's
cache, fetched once per node), so the pages are shared by the processes of a node and a batch is one
fancy-index gather; augmentation happens later, batched on the training device
(`pretrain.train.augment`), so loader workers only ship uint8.

Sampling is uniform over clusters, then uniform over the cluster's members: a cluster of 3 and one
of 300 are seen equally often. The paper's "20 augmented views per member" sets the length of a
round: `views_per_member * M` samples. Step s of rank r draws from a generator seeded with
(seed, r, s), so a resumed run draws exactly the batches the killed one would have.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from infra import storage
from pretrain.parts import assemble, build_file, finished, fingerprint, part_name
from shards.shardset import ShardSet
from shards.store import PatchStore

GATHER_CHUNK = 4096
PART_ROWS = 65536  # members per decoding task (1.8 GB of 96x96 pixels)


def member_pixels_task(shards_root: str, member_index: np.ndarray, out: str) -> dict:
    """Decodes the patches `member_index` (M,) int64 from the shards into `out` (a path or a URI), a
    (M, P, P, 3) uint8 .npy, built in a local file and published in one atomic write -> its record."""
    store = PatchStore(shards_root)
    p = store.shards.patch_px

    def fill(local: str) -> None:
        arr = open_memmap(local, mode="w+", dtype=np.uint8, shape=(len(member_index), p, p, 3))
        for s in tqdm(range(0, len(member_index), GATHER_CHUNK), desc="member pixels", unit="chunk", leave=False):
            arr[s : s + GATHER_CHUNK] = store.get(member_index[s : s + GATHER_CHUNK])
        arr.flush()
        del arr

    return build_file(out, fill)


def write_member_pixels(shards_root: str | Path, member_index: np.ndarray, out: str | Path,
                        mapper: Callable | None = None, part_rows: int = PART_ROWS) -> Path:
    """`out` (a path or a URI): the (M, P, P, 3) uint8 pixels of the patches `member_index` (M,) int64,
    in that order, written whole or not at all -> its location (a Path, or a UPath for a URI).

    Without `mapper` this process writes it. With one, the members are decoded in parallel: a task per
    `part_rows` members writes them as a part file beside `out` (`<out>.parts/`, names carrying the
    members' fingerprint, so a killed run's finished parts are kept and another member list's are
    not), then one task assembles the parts into `out` and the parts are removed. The driver never
    holds pixels."""
    root, member_index = str(storage.absolute(shards_root)), np.asarray(member_index, np.int64)
    out = storage.absolute(out)
    if mapper is None:
        member_pixels_task(root, member_index, str(out))
        return storage.to_path(out)
    parts_dir = storage.to_path(out).with_name(out.name + ".parts")
    tag = fingerprint({"shards": root, "members": hashlib.sha256(member_index.tobytes()).hexdigest()})
    starts = range(0, len(member_index), part_rows)
    names = {i: part_name(i, tag) for i in range(len(starts))}
    done = finished(parts_dir, {i: [n] for i, n in names.items()})
    todo = [(root, member_index[s : s + part_rows], str(parts_dir / names[i]))
            for i, s in enumerate(starts) if i not in done]
    if todo:
        mapper(member_pixels_task, todo, desc="member pixels")
    p = ShardSet.open(root).patch_px  # the index alone: no per-shard metadata in the driver
    parts = [{"key": str(parts_dir / names[i]), "start": s, "rows": min(part_rows, len(member_index) - s)}
             for i, s in enumerate(starts)]
    mapper(assemble, [([{"out": str(out), "shape": [len(member_index), p, p, 3], "dtype": "uint8",
                         "parts": parts}],)], desc="member pixels: assemble")
    storage.rmtree(parts_dir)
    return storage.to_path(out)


def sample_members(offsets: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """offsets: (C+1,) int64 -> (rows (n,) int64 into the member arrays, clusters (n,) int64):
    a cluster uniformly at random, then one of its members uniformly at random."""
    sizes = np.diff(offsets)
    cluster = rng.integers(0, len(sizes), n)
    rows = offsets[cluster] + (rng.random(n) * sizes[cluster]).astype(np.int64)
    return rows, cluster


def other_member(offsets: np.ndarray, rows: np.ndarray, cluster: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each row, a different member of the same cluster (the row itself only in a singleton)."""
    sizes = np.diff(offsets)[cluster]
    pos = rows - offsets[cluster]
    shift = 1 + (rng.random(len(rows)) * np.maximum(sizes - 1, 1)).astype(np.int64)
    return offsets[cluster] + (pos + np.where(sizes > 1, shift, 0)) % sizes


class ClusterBatches(IterableDataset):
    """Yields steps `start_step, start_step+1, ..., steps-1` of one rank as dicts:
    step int, image (B, P, P, 3) uint8, cluster (B,) int64, and with `pairs` also positive
    (B, P, P, 3) uint8: another member of the same cluster (the hashing stage's x+).

    DataLoader workers take every num_workers-th step and the loader interleaves them in order.
    """

    def __init__(self, pixels_path: str | Path, offsets: np.ndarray, *, batch_size: int, steps: int,
                 seed: int, rank: int = 0, start_step: int = 0, pairs: bool = False):
        self.pixels_path = str(pixels_path)
        self.offsets = np.asarray(offsets, np.int64)
        if len(self.offsets) < 2 or np.any(np.diff(self.offsets) < 1):
            raise ValueError("every cluster needs at least one member")
        self.batch_size, self.steps, self.seed, self.rank = batch_size, steps, seed, rank
        self.start_step, self.pairs = start_step, pairs

    def __len__(self) -> int:
        return max(self.steps - self.start_step, 0)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        pixels = np.load(storage.local_copy(self.pixels_path), mmap_mode="r")  # a URI: fetched once per node
        for step in range(self.start_step + worker, self.steps, num_workers):
            rng = np.random.default_rng([self.seed, self.rank, step])
            rows, cluster = sample_members(self.offsets, self.batch_size, rng)
            batch = {"step": step, "image": torch.from_numpy(_gather(pixels, rows)),
                     "cluster": torch.from_numpy(cluster)}
            if self.pairs:
                batch["positive"] = torch.from_numpy(_gather(pixels, other_member(self.offsets, rows, cluster, rng)))
            yield batch


def _gather(pixels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """pixels[rows], reading the memmap in row order (sequential pages) and putting it back."""
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows),) + pixels.shape[1:], pixels.dtype)
    out[order] = pixels[rows[order]]
    return out


def batch_loader(dataset: IterableDataset, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ready-made batches (batch_size=None)."""
    kw = {"prefetch_factor": 4} if num_workers else {}
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kw)
