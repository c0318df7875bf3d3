"""Writes webdataset shards of patches.

Record format (chosen for decode throughput, measured by `scripts/bench_shards.py`): one tar record
holds up to `patches_per_record` consecutive patches of a shard as two members,

  rNNNNNNN.jpg   the patches stacked vertically into one (n*P, P, 3) JPEG strip, 4:4:4 chroma, so
                 one decoder call serves n patches and no chroma is shared across patch borders
                 (P must be a multiple of 8: patch borders then fall on DCT block borders);
  rNNNNNNN.json  {"first": position of the first patch in the shard, "keys": [source key per patch],
                 "boxes": [[x0, y0, x1, y1] per patch, source coordinates], "labels": [int, -1 if none]}

Every record but a shard's last holds exactly `patches_per_record` patches, so patch j of a shard
lives in record j // patches_per_record at slot j % patches_per_record. Each shard comes with its record
index part, the byte offsets of every record and member (see shards/shardset.py), which readers use
instead of scanning the tar, and its metadata part, the records' keys, boxes and labels once more as
arrays (shards/meta.py), which drivers read instead of the records' JSON.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import simplejpeg
from PIL import Image

from infra import storage
from shards.patches import crop_patches, image_patches
from shards.meta import meta_bytes
from shards.shardset import index_name, meta_name, offsets_table, table_bytes
from shards.sources import Item, load_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PatchParams:
    patch_px: int = 96
    patches_per_image: int = 10
    scale_range: tuple[float, float] = (0.25, 0.6)
    patches_per_record: int = 16
    jpeg_quality: int = 90
    seed: int = 0

    def __post_init__(self):
        if self.patch_px <= 0 or self.patch_px % 8:
            raise ValueError(f"patch size must be a positive multiple of 8, got {self.patch_px}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale range must satisfy 0 < lo <= hi <= 1, got {self.scale_range}")
        if self.patches_per_image < 1 or self.patches_per_record < 1:
            raise ValueError("patches per image and per record must be >= 1")
        if self.patch_px * self.patches_per_record > 65500:  # a record is one JPEG strip
            raise ValueError(f"patch size x patches per record must be <= 65500 (JPEG limit), got "
                             f"{self.patch_px} x {self.patches_per_record}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {self.jpeg_quality}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def encode_strip(patches: np.ndarray, quality: int) -> bytes:
    """patches: (n, P, P, 3) uint8 -> JPEG bytes of the (n*P, P, 3) strip."""
    n, p = patches.shape[:2]
    return simplejpeg.encode_jpeg(
        np.ascontiguousarray(patches.reshape(n * p, p, 3)), quality=quality, colorspace="RGB",
        colorsubsampling="444",
    )


def decode_strip(data: bytes, patch_px: int, fast: bool = True) -> np.ndarray:
    """JPEG strip bytes -> (n, P, P, 3) uint8 view. Raises ValueError on corrupt data."""
    img = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=fast, fastupsample=fast)
    if img.ndim != 3 or img.shape[1] != patch_px or img.shape[0] % patch_px:
        raise ValueError(f"strip of shape {img.shape} is not a stack of {patch_px}px patches")
    return img.reshape(-1, patch_px, patch_px, 3)


class _HashingFile:
    """A write-only file that hashes what goes through it (no second read of the shard)."""

    def __init__(self, f):
        self.f, self.sha, self.nbytes = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.nbytes += len(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def iter_image_patches(items: Iterable[Item], params: PatchParams, skipped: list[str]) -> Iterator[tuple]:
    """Yields (key, box, label, patch) per patch; unreadable images are appended to `skipped`."""
    for item in items:
        try:
            image = load_image(item)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # PIL's ways to fail
            log.warning("skipping unreadable image %s: %s", item.key, exc)
            skipped.append(item.key)
            continue
        if item.boxes:  # fixed, labelled boxes (e.g. a VOC devkit's objects)
            boxes = np.array([b[:4] for b in item.boxes], np.int32)
            labels = [b[4] for b in item.boxes]
            patches = crop_patches(image, boxes, params.patch_px)
        else:
            boxes, patches = image_patches(
                image, item.key, n=params.patches_per_image, patch_px=params.patch_px,
                scale_range=params.scale_range, seed=params.seed,
            )
            labels = [item.label] * len(boxes)
        for box, label, patch in zip(boxes, labels, patches):
            yield item.key, box.tolist(), label, patch


def _records(patch_iter: Iterator[tuple], params: PatchParams, seen: list | None = None) -> Iterator[tuple[dict, int]]:
    """Records of up to `patches_per_record` patches; each patch's (key, box, label) is appended to `seen`."""
    buf: list[tuple] = []
    first = 0
    for entry in patch_iter:
        buf.append(entry)
        if seen is not None:
            seen.append(entry[:3])
        if len(buf) == params.patches_per_record:
            yield _record(buf, first, params), len(buf)
            first += len(buf)
            buf = []
    if buf:
        yield _record(buf, first, params), len(buf)


def _record(buf: list[tuple], first: int, params: PatchParams) -> dict:
    meta = {
        "first": first,
        "keys": [e[0] for e in buf],
        "boxes": [e[1] for e in buf],
        "labels": [int(e[2]) for e in buf],
    }
    strip = encode_strip(np.stack([e[3] for e in buf]), params.jpeg_quality)
    rec = first // params.patches_per_record
    return {"__key__": f"r{rec:07d}", "jpg": strip, "json": json.dumps(meta).encode("utf-8")}


def write_shard(path, items: list[Item], params: PatchParams) -> dict:
    """Writes one write-once shard, its record index part and its metadata part at `path` (a local path
    or a URI) and returns its shards.json entry: {name, patches, records, bytes, sha256, images,
    skipped_images, index: {name, bytes, sha256}, meta: {name, bytes, sha256}}.

    Locally the tar is written under a temporary name next to `path`, then renamed; for an object
    store it is written to a node-local scratch file and uploaded in one PUT. Either way the index part
    comes from one scan of the finished local tar, and both parts are written after it."""
    import webdataset as wds  # here, not at the top: it imports torch, which readers of shards need not load

    path = storage.to_path(path)
    remote = storage.is_remote(path)
    scratch = storage.scratch_dir("shard-") if remote else None
    tmp = scratch / path.name if remote else path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        skipped: list[str] = []
        seen: list[tuple] = []  # (key, box, label) per patch, for the metadata part
        n_patches = n_records = 0
        with open(tmp, "wb") as raw:
            sink = _HashingFile(raw)
            # mtime fixed so that the same input gives byte-identical shards (stable checksums); an int,
            # since a float mtime makes tarfile add a 1 KiB PAX header to every member.
            with wds.TarWriter(sink, encoder=False, mtime=0) as writer:
                for record, n in _records(iter_image_patches(items, params, skipped), params, seen):
                    writer.write(record)
                    n_records += 1
                    n_patches += n
            raw.flush()
            if not remote:
                os.fsync(raw.fileno())
        table = offsets_table(tmp)
        if remote:
            storage.put_file(tmp, path, move=True)
        else:
            os.replace(tmp, path)
    finally:
        if remote:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            Path(tmp).unlink(missing_ok=True)
    index = storage.put_part(path.with_name(index_name(path.name)), table_bytes(table))
    keys, boxes, labels = zip(*seen) if seen else ((), np.zeros((0, 4)), ())
    meta = storage.put_part(path.with_name(meta_name(path.name)), meta_bytes(list(keys), boxes, labels))
    return {
        "name": path.name, "patches": n_patches, "records": n_records, "bytes": sink.nbytes,
        "sha256": sink.sha.hexdigest(), "images": len(items) - len(skipped), "skipped_images": skipped,
        "index": {"name": index_name(path.name), "bytes": index["size"], "sha256": index["sha256"]},
        "meta": {"name": meta_name(path.name), "bytes": meta["size"], "sha256": meta["sha256"]},
    }
