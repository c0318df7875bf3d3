"""Patch-streaming throughput on one core, against two baselines measured in the same run.

    python scripts/bench_shards.py [--patches-per-image 400] [--repeats 3] [--s3 | --out s3://bucket/prefix]

Prints one JSON line:
  ours_per_core         patches/s through PatchStream in order (tar records -> JPEG strip decode ->
                        patches), as feature extraction reads them
  ours_shuffled_per_core  the same with a 2000-patch shuffle buffer, as training reads them (each
                        patch is then copied out of its strip)
  bare_decode_per_core  patches/s of the fastest of simplejpeg, OpenCV and PIL decoding the very same
                        strip bytes from memory (no container, no file reads)
  naive_per_core        patches/s of webdataset + PIL (`.decode("rgb8")`) on shards of one patch per
                        record, built from the same source and seed
  ratio_vs_bare, ratio_vs_naive
With --s3 (a local moto S3 server of its own, infra/s3local.py) or --out URI (a bucket prefix, reached
with the standard AWS_* settings), the same shards are built there too, and it adds:
  s3_per_core           patches/s through PatchStream in order, reading the shards from the bucket
  local_paired_per_core the same from local disk, its passes interleaved with the bucket's
  ratio_s3_vs_local     s3_per_core / local_paired_per_core (same shards, byte-identical: checked)
  s3_store_per_core, local_store_per_core, ratio_s3_vs_local_store  PatchStore.get of 2000 random
                        patches in batches of 64 (one ranged read per record; 16 GETs in flight)
Each figure is the best of --repeats passes (the machine's noise only ever slows a pass down).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infra import s3local, storage  # noqa: E402
from shards.build import build_shards  # noqa: E402
from shards.reader import PatchStream  # noqa: E402
from shards.shardset import ShardSet  # noqa: E402
from shards.sources import list_items  # noqa: E402
from shards.store import PatchStore  # noqa: E402
from shards.writer import PatchParams  # noqa: E402


def best_rate(fn, n_items: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        got = fn()
        best = min(best, time.perf_counter() - t0)
        assert got == n_items, (got, n_items)
    return n_items / best


def paired_rates(fns: dict, n_items: int, repeats: int) -> dict:
    """best_rate of each fn, their passes interleaved (a noisy spell then slows both, not one)."""
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            got = fn()
            best[k] = min(best[k], time.perf_counter() - t0)
            assert got == n_items, (k, got, n_items)
    return {k: n_items / t for k, t in best.items()}


def strip_bytes(root: Path) -> list[bytes]:
    shards = ShardSet.open(root)
    out = []
    for i in range(len(shards.names)):
        for off, size in shards.offsets(i).members["jpg"]:
            out.append(storage.read_range(shards.path(i), int(off), int(size)))
    return out


@contextlib.contextmanager
def bucket_location(args, tmp: str):
    """The bucket prefix to build the S3 copy at: --out as given, or a bucket on a moto server of our
    own (--s3); None when neither is asked for."""
    if args.out:
        storage.check_location(args.out, what="--out")
        yield args.out.rstrip("/") + f"/bench-{uuid.uuid4().hex[:8]}"
        return
    if not args.s3:
        yield None
        return
    with s3local.s3_server(log_path=str(Path(tmp) / "moto.log")) as endpoint:
        os.environ.update(s3local.env(endpoint))
        s3local.make_bucket(endpoint, "bench-shards")
        yield "s3://bench-shards/ours"


def store_pass(root, n: int, sample: int = 2000):
    """A pass of PatchStore.get over `sample` random patches, asked for in batches of 64."""
    store = PatchStore(root)
    pick = np.random.default_rng(0).choice(n, size=min(sample, n), replace=False)

    def go():
        return sum(len(store.get(pick[i : i + 64])) for i in range(0, len(pick), 64))
    return go, len(pick)


def bare_decoders(strips: list[bytes], p: int) -> dict:
    def run(decode):
        def go():
            return sum(decode(b).shape[0] // p for b in strips)
        return go

    return {
        "simplejpeg": run(lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB", fastdct=True, fastupsample=True)),
        "opencv": run(lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)),
        "pil": run(lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patches-per-image", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--s3", action="store_true", help="also read the shards from a local moto S3 server")
    where.add_argument("--out", default=None, help="also read the shards from this bucket prefix (s3://...)")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    listing = list_items("demo")
    extra = {}
    with tempfile.TemporaryDirectory() as tmp, bucket_location(args, tmp) as s3_uri:
        ours_dir, naive_dir = Path(tmp) / "ours", Path(tmp) / "naive"
        base = dict(patch_px=96, patches_per_image=args.patches_per_image, seed=0)
        built = build_shards(listing, ours_dir, PatchParams(**base, patches_per_record=16), images_per_shard=5)
        build_shards(listing, naive_dir, PatchParams(**base, patches_per_record=1), images_per_shard=5)
        n = ShardSet.open(ours_dir).total

        stream = PatchStream(ours_dir, rank=0, world_size=1)
        ours = best_rate(lambda: sum(1 for _ in stream), n, args.repeats)
        shuffled = PatchStream(ours_dir, rank=0, world_size=1, shuffle=True, shuffle_buffer=2000)
        ours_shuffled = best_rate(lambda: sum(1 for _ in shuffled), n, args.repeats)

        strips = strip_bytes(ours_dir)
        bare_all = {name: best_rate(fn, n, args.repeats) for name, fn in bare_decoders(strips, 96).items()}
        bare_name = max(bare_all, key=bare_all.get)

        urls = [str(p) for p in sorted(naive_dir.glob("*.tar"))]
        naive_ds = wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("jpg", "json")
        naive = best_rate(lambda: sum(1 for _ in naive_ds), n, args.repeats)
        bytes_ours = sum(p.stat().st_size for p in ours_dir.glob("*.tar"))
        bytes_naive = sum(p.stat().st_size for p in naive_dir.glob("*.tar"))

        if s3_uri:
            remote = build_shards(listing, s3_uri, PatchParams(**base, patches_per_record=16), images_per_shard=5)
            assert remote["shards"] == built["shards"], "the bucket's shards differ from the local ones"
            streams = {w: PatchStream(root, rank=0, world_size=1) for w, root in (("local", ours_dir), ("s3", s3_uri))}
            rates = paired_rates({w: partial(lambda s: sum(1 for _ in s), s) for w, s in streams.items()}, n,
                                 max(args.repeats, 5))
            (local_get, k), (s3_get, _) = store_pass(ours_dir, n), store_pass(s3_uri, n)
            store = paired_rates({"local": local_get, "s3": s3_get}, k, args.repeats)
            extra = {"s3": s3_uri, "s3_per_core": round(rates["s3"], 1), "local_paired_per_core": round(rates["local"], 1),
                     "ratio_s3_vs_local": round(rates["s3"] / rates["local"], 3),
                     "local_store_per_core": round(store["local"], 1), "s3_store_per_core": round(store["s3"], 1),
                     "ratio_s3_vs_local_store": round(store["s3"] / store["local"], 3)}
            if args.out:
                storage.rmtree(s3_uri)

    print(json.dumps({
        "patches": n,
        "ours_per_core": round(ours, 1),
        "ours_shuffled_per_core": round(ours_shuffled, 1),
        "bare_decode_per_core": round(bare_all[bare_name], 1),
        "bare_decoder": bare_name,
        "bare_by_decoder": {k: round(v, 1) for k, v in bare_all.items()},
        "naive_per_core": round(naive, 1),
        "ratio_vs_bare": round(ours / bare_all[bare_name], 3),
        "ratio_vs_naive": round(ours / naive, 3),
        "bytes_per_patch_ours": round(bytes_ours / n, 1),
        "bytes_per_patch_naive": round(bytes_naive / n, 1),
        **extra,
    }))


if __name__ == "__main__":
    main()
