"""Builds webdataset shards of square patches from an image source, as Ray tasks over chunks.

    python -m shards.build --source demo --out runs/demo/shards
    python -m shards.build --source /data/imagenet/train --out /data/in1k-p96 --patches-per-image 10 \
        --images-per-shard 1000

Sources: `demo`, `digits`, an ImageNet-layout folder, a flat folder, a tar of images, a VOC devkit
(see shards/sources.py). Writes `shard-NNNNNN.tar` and `shards.json` (see shards/shardset.py; the
record format is in shards/writer.py). Same source + seed -> byte-identical shards.
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
from pathlib import Path
from typing import Callable

from infra.storage import atomic_write_json
from shards.shardset import FORMAT, SHARDS_JSON
from shards.sources import KINDS, Listing, SourceError, list_items
from shards.writer import PatchParams, write_shard

log = logging.getLogger(__name__)


PROGRESS = ".build-progress.jsonl"


def _task_key(chunk: list, params: PatchParams) -> str:
    """What one shard is made of: its images and the patch settings."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(params), sort_keys=True).encode())
    for it in chunk:
        h.update(f"{it.key}|{it.uri}|{it.label}|{it.offset}|{it.size}\n".encode())
    return h.hexdigest()[:16]


def _finished_shards(out: Path, names: list[str], keys: list[str]) -> dict[str, dict]:
    """Shards an interrupted build of the same chunks already wrote (from its progress file)."""
    done: dict[str, dict] = {}
    path = out / PROGRESS
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:  # a line torn by the kill
            continue
        done[rec["name"]] = rec
    reuse = {}
    for name, key in zip(names, keys):
        rec, shard = done.get(name), out / name
        if rec and rec["task"] == key and shard.is_file() and shard.stat().st_size == rec["entry"]["bytes"]:
            reuse[name] = rec["entry"]
    return reuse


def build_shards(
    listing: Listing, out: str | Path, params: PatchParams, *,
    images_per_shard: int | None = None, num_shards: int | None = None, mapper: Callable | None = None,
) -> dict:
    """Writes the shards and `shards.json` (written last, atomically); returns the index dict.

    `mapper(fn, arg_tuples, desc=..., on_result=...)` runs the per-shard tasks: `infra.ray_edge.ray_map`
    for Ray, `serial_map` (the default) in-process. Each finished shard is logged to a progress file,
    so a build that was killed and is started again with the same source and settings writes only the
    shards it had not finished.
    """
    from infra.ray_edge import serial_map

    n = len(listing.items)
    if num_shards:
        images_per_shard = math.ceil(n / num_shards)
    images_per_shard = max(1, images_per_shard or 1000)
    chunks = [listing.items[i : i + images_per_shard] for i in range(0, n, images_per_shard)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob("shard-*.tar.*.tmp"):  # partial shards of a killed build
        tmp.unlink()
    names = [f"shard-{i:06d}.tar" for i in range(len(chunks))]
    keys = [_task_key(chunk, params) for chunk in chunks]
    entries = _finished_shards(out, names, keys)
    todo = [i for i, name in enumerate(names) if name not in entries]
    if entries:
        log.info("resuming: %d of %d shards already written", len(entries), len(names))
    t0 = time.perf_counter()
    with open(out / PROGRESS, "a") as progress:

        def finished(i: int, entry: dict) -> None:
            progress.write(json.dumps({"name": entry["name"], "task": keys[todo[i]], "entry": entry}) + "\n")
            progress.flush()

        results = (mapper or serial_map)(
            write_shard, [(out / names[i], chunks[i], params) for i in todo],
            desc=f"shards ({listing.kind})", on_result=finished,
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
    atomic_write_json(out / SHARDS_JSON, index)
    (out / PROGRESS).unlink()
    for stale in out.glob("shard-*.tar"):  # left by an earlier build with more shards
        if stale.name not in names:
            stale.unlink()
    skipped = sum(len(e["skipped_images"]) for e in shards)
    log.info("wrote %d patches in %d shards to %s in %.1fs (%d unreadable images skipped)",
             index["total_patches"], len(shards), out, time.perf_counter() - t0, skipped)
    return index


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m shards.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="demo | digits | image folder | tar | VOC devkit")
    p.add_argument("--out", required=True, help="output folder for the shards and shards.json")
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
    args = parse_args(argv)
    try:
        if (args.num_shards is not None and args.num_shards < 1) or (
                args.images_per_shard is not None and args.images_per_shard < 1):
            raise ValueError("--num-shards and --images-per-shard must be >= 1")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} exists and is not a directory")
        params = PatchParams(
            patch_px=args.patch_size, patches_per_image=args.patches_per_image,
            scale_range=tuple(args.scale_range), patches_per_record=args.patches_per_record,
            jpeg_quality=args.jpeg_quality, seed=args.seed,
        )
        listing = list_items(args.source, args.kind)  # a bad source fails before Ray starts
    except (SourceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mapper = None
    if not args.no_ray:
        from infra.ray_edge import connect, ray_map

        log.info(connect())
        mapper = ray_map
    try:
        build_shards(listing, args.out, params, images_per_shard=args.images_per_shard,
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
