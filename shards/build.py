"""Builds webdataset shards of square patches from an image source, as Ray tasks over chunks.

    python -m shards.build --source demo --out runs/demo/shards
    python -m shards.build --source demo --out s3://bucket/demo/shards
    python -m shards.build --source /data/imagenet/train --out /data/in1k-p96 --patches-per-image 10 \
        --images-per-shard 1000

Sources: `demo`, `digits`, an ImageNet-layout folder, a flat folder, a tar of images, a VOC devkit
(see shards/sources.py). Writes, to a local folder or a bucket URI, per shard `shard-NNNNNN.tar`, its
record index `shard-NNNNNN.idx.npy`, its labels and keys `shard-NNNNNN.meta.npz` and
`shard-NNNNNN.json` (the task's finished part), then
`shards.json` (see shards/shardset.py; the record format is in shards/writer.py). Same source + seed ->
byte-identical shards, wherever they are written.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from typing import Callable

from infra import storage
from infra.storage import StorageError
from shards.shardset import FORMAT, SHARDS_JSON
from shards.sources import KINDS, Listing, SourceError, list_items
from shards.writer import PatchParams, write_shard

log = logging.getLogger(__name__)


LEGACY_PROGRESS = ".build-progress.jsonl"  # format /1 builds logged progress here; now a listing of parts


def _task_key(chunk: list, params: PatchParams) -> str:
    """What one shard is made of: its images and the patch settings."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(params), sort_keys=True).encode())
    for it in chunk:
        h.update(f"{it.key}|{it.uri}|{it.label}|{it.offset}|{it.size}\n".encode())
    return h.hexdigest()[:16]


def part_name(shard_name: str) -> str:
    """`shard-000001.tar` -> `shard-000001.json`, the part that says the shard is finished."""
    return shard_name.removesuffix(".tar") + ".json"


def build_part(path, chunk: list, params: PatchParams, task: str) -> dict:
    """One build task: the shard, its index and metadata parts, then (last) `shard-NNNNNN.json` = {task, entry}
    -> the shard's entry."""
    path = storage.to_path(path)
    entry = write_shard(path, chunk, params)
    storage.put_part(path.with_name(part_name(path.name)),
                     (json.dumps({"task": task, "entry": entry}, sort_keys=True) + "\n").encode())
    return entry


def _finished_shards(out, names: list[str], keys: list[str]) -> dict[str, dict]:
    """Shards an interrupted build of the same chunks already finished: those with a `.json` part of
    the same task key whose tar, index and metadata parts have the recorded sizes (a listing, not a log)."""
    listed = set(storage.list_names(out, "shard-"))
    reuse = {}
    for name, key in zip(names, keys):
        if part_name(name) not in listed or name not in listed:
            continue
        try:
            rec = json.loads((out / part_name(name)).read_bytes())
            entry = rec["entry"]
            ok = rec["task"] == key and entry["name"] == name and storage.size_of(out / name) == entry["bytes"] \
                and all(entry[p]["name"] in listed and storage.size_of(out / entry[p]["name"]) == entry[p]["bytes"]
                        for p in ("index", "meta"))
        except (ValueError, KeyError, TypeError):  # a part from another version: build the shard again
            continue
        if ok:
            reuse[name] = entry
    return reuse


def build_shards(
    listing: Listing, out, params: PatchParams, *,
    images_per_shard: int | None = None, num_shards: int | None = None, mapper: Callable | None = None,
) -> dict:
    """Writes the shards to `out` (a local folder or a URI such as s3://bucket/prefix) and `shards.json`
    (written last, atomically); returns the index dict.

    `mapper(fn, arg_tuples, desc=...)` runs the per-shard tasks: `infra.ray_edge.ray_map` for Ray,
    `serial_map` (the default) in-process. Each task writes its own write-once parts (see `build_part`),
    so a build that was killed and is started again with the same source and settings lists what is
    there and writes only the shards it had not finished.
    """
    from infra.ray_edge import serial_map

    n = len(listing.items)
    if num_shards:
        images_per_shard = math.ceil(n / num_shards)
    images_per_shard = max(1, images_per_shard or 1000)
    chunks = [listing.items[i : i + images_per_shard] for i in range(0, n, images_per_shard)]
    out = storage.absolute(out)
    storage.makedirs(out)
    if not storage.is_remote(out):
        for tmp in out.glob("shard-*.tar.*.tmp"):  # partial shards of a killed build
            tmp.unlink()
    names = [f"shard-{i:06d}.tar" for i in range(len(chunks))]
    keys = [_task_key(chunk, params) for chunk in chunks]
    entries = _finished_shards(out, names, keys)
    todo = [i for i, name in enumerate(names) if name not in entries]
    if entries:
        log.info("resuming: %d of %d shards already written", len(entries), len(names))
    t0 = time.perf_counter()
    results = (mapper or serial_map)(
        build_part, [(out / names[i], chunks[i], params, keys[i]) for i in todo], desc=f"shards ({listing.kind})",
    )
    entries.update((e["name"], e) for e in results)
    shards = [entries[name] for name in names]
    if sum(e["patches"] for e in shards) == 0:
        raise SourceError(f"no patch could be made: all {n} images of {listing.source} are unreadable")
    index = {
        "format": FORMAT,
        "patch_size_px": params.patch_px,
        "patches_per_record": params.patches_per_record,
        "source": {"source": listing.source, "kind": listing.kind, "images": n,
                   "patches_per_image": params.patches_per_image, "scale_range": list(params.scale_range),
                   "jpeg_quality": params.jpeg_quality, "seed": params.seed},
        "classes": listing.classes,
        "total_patches": sum(e["patches"] for e in shards),
        "shards": shards,
    }
    storage.atomic_write_json(out / SHARDS_JSON, index)
    keep = {p for e in shards for p in (e["name"], e["index"]["name"], e["meta"]["name"], part_name(e["name"]))}
    for stale in storage.list_names(out, "shard-"):  # left by an earlier build with more shards
        if stale not in keep:
            storage.remove(out / stale)
    if not storage.is_remote(out):
        (out / LEGACY_PROGRESS).unlink(missing_ok=True)
    skipped = sum(len(e["skipped_images"]) for e in shards)
    log.info("wrote %d patches in %d shards to %s in %.1fs (%d unreadable images skipped)",
             index["total_patches"], len(shards), out, time.perf_counter() - t0, skipped)
    return index


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m shards.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="demo | digits | image folder | tar | VOC devkit")
    p.add_argument("--out", required=True, help="output folder or URI (s3://bucket/prefix) for the shards")
    p.add_argument("--kind", default="auto", choices=KINDS, help="source kind (default: detect)")
    p.add_argument("--patch-size", type=int, default=96, help="patch side in pixels, a multiple of 8")
    p.add_argument("--patches-per-image", type=int, default=10)
    p.add_argument("--scale-range", type=float, nargs=2, default=(0.25, 0.6), metavar=("LO", "HI"),
                   help="patch side as a fraction of the shorter image side")
    p.add_argument("--patches-per-record", type=int, default=16, help="patches per tar record (JPEG strip)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--seed", type=int, default=0)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--images-per-shard", type=int, default=None, help="default 1000")
    g.add_argument("--num-shards", type=int, default=None)
    p.add_argument("--no-ray", action="store_true", help="build in this process instead of Ray tasks")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("botocore", "aiobotocore", "s3fs", "fsspec"):  # "Found credentials in ..." and such
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    try:
        if (args.num_shards is not None and args.num_shards < 1) or (
                args.images_per_shard is not None and args.images_per_shard < 1):
            raise ValueError("--num-shards and --images-per-shard must be >= 1")
        out = storage.to_path(args.out)
        if not storage.is_remote(out) and out.exists() and not out.is_dir():
            raise ValueError(f"--out {args.out} exists and is not a directory")
        params = PatchParams(
            patch_px=args.patch_size, patches_per_image=args.patches_per_image,
            scale_range=tuple(args.scale_range), patches_per_record=args.patches_per_record,
            jpeg_quality=args.jpeg_quality, seed=args.seed,
        )
        listing = list_items(args.source, args.kind)  # a bad source fails before Ray starts
        storage.check_location(out, what="--out")  # so does a bad bucket URI; nothing written yet
    except (SourceError, StorageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mapper = None
    if not args.no_ray:
        from infra.ray_edge import connect, ray_map

        log.info(connect())
        mapper = ray_map
    try:
        build_shards(listing, out, params, images_per_shard=args.images_per_shard,
                     num_shards=args.num_shards, mapper=mapper)
    except SourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write shards to {args.out}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
