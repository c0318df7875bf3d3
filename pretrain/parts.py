"""Row arrays as write-once part files, and their assembly into one `.npy` (paths or bucket URIs alike).

The per-shard tasks of the stages write their own outputs: each task encodes one shard and writes its
rows as a part file (`put_rows`, one atomic write) and returns only the part's record {key, size,
sha256}; the driver never holds the rows. Progress is the listing of the finished parts: a part's
name carries the shard's index and the fingerprints of what made it (`part_name`), so a part made from
other shards or another encoder or model is never trusted. When every part is there, ONE task
(`assemble`) builds the whole array in a node-local file, memory-mapped, and publishes it in one
atomic write (`build_file`).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid
from typing import Callable

import numpy as np
from numpy.lib.format import open_memmap, read_array_header_1_0, read_array_header_2_0, read_magic

from infra import storage

PART_PREFIX = "part-"


def npy_bytes(arr: np.ndarray) -> bytes:
    """The bytes of `np.save(arr)` (a .npy that loads with allow_pickle=False)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def put_rows(path, arr: np.ndarray) -> dict:
    """`arr` as a write-once .npy part at `path` -> its record {key, size, sha256}."""
    return storage.put_part(path, npy_bytes(arr))


def read_rows(key, sha256: str | None = None) -> np.ndarray:
    """A part's array (read whole: parts are one shard's rows); checked against `sha256` when given."""
    data = storage.to_path(key).read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise storage.StorageError(f"{key}: content does not match its recorded sha256")
    return np.load(io.BytesIO(data), allow_pickle=False)


def npy_shape(path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a .npy from its header alone (a few KB read, also on a bucket)."""
    with storage.open_read(path, block_size=1 << 16) as f:
        version = read_magic(f)
        read_header = read_array_header_1_0 if version == (1, 0) else read_array_header_2_0
        shape, _, dtype = read_header(f)
    return tuple(int(s) for s in shape), dtype


def fingerprint(obj) -> str:
    """sha256 of a JSON-able value (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def shard_tag(entry: dict) -> str:
    """What identifies one shard's content: its sha256 in shards.json (else its whole index entry)."""
    return entry.get("sha256") or fingerprint(entry)


def part_name(index: int, *tags: str, suffix: str = ".npy") -> str:
    """`part-000003-<tag[:12]>-...<suffix>`: shard index and the fingerprints of what made the part."""
    return f"{PART_PREFIX}{index:06d}" + "".join(f"-{t[:12]}" for t in tags) + suffix


def finished(parts_dir, wanted: dict[int, list[str]]) -> set[int]:
    """The indices whose every wanted part name is in the listing of `parts_dir` (parts are written
    atomically: a listed part is whole)."""
    names = set(storage.list_names(parts_dir, PART_PREFIX))
    return {i for i, want in wanted.items() if all(n in names for n in want)}


def build_file(out, fill: Callable[[str], None]) -> dict:
    """Calls fill(local_path) to write a file at a local path, then publishes it at `out` atomically
    -> its record. The local file is a temporary beside `out` when `out` is local (one rename, no
    copy), else in this node's scratch directory (then one upload); it is gone afterwards either way."""
    p = storage.to_path(out)
    scratch = storage.scratch_dir("build-") if storage.is_remote(p) else None
    if scratch is not None:
        local = scratch / p.name
    else:
        p.parent.mkdir(parents=True, exist_ok=True)
        local = p.with_name(f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.build")
    try:
        fill(str(local))
        return storage.put_file(local, p, move=True)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            local.unlink(missing_ok=True)


def assemble(outputs: list[dict]) -> list[dict]:
    """The assembly task: for each output {"out": path or URI, "shape": [...], "dtype": str, "parts":
    [{"key", "start", "rows", "sha256" (optional)}]} writes the parts' rows at their start rows into one
    .npy and publishes it -> the outputs' records {key, size, sha256}. Every row must be covered."""
    records = []
    for o in outputs:
        shape, dtype = tuple(int(s) for s in o["shape"]), np.dtype(o["dtype"])

        def fill(local: str, o=o, shape=shape, dtype=dtype) -> None:
            arr = open_memmap(local, mode="w+", dtype=dtype, shape=shape)
            covered = 0
            for part in o["parts"]:
                rows = read_rows(part["key"], part.get("sha256"))
                start, n = int(part["start"]), int(part["rows"])
                if rows.shape != (n,) + shape[1:] or rows.dtype != dtype:
                    raise ValueError(f"{part['key']}: part holds {rows.dtype}{rows.shape}, expected "
                                     f"{dtype}{(n,) + shape[1:]}")
                arr[start : start + n] = rows
                covered += n
            if covered != shape[0]:
                raise ValueError(f"{o['out']}: the parts cover {covered} of {shape[0]} rows")
            arr.flush()
            del arr

        records.append(build_file(o["out"], fill))
    return records
