"""Patch-streaming throughput on one core, against two baselines measured in the same run.

    python scripts/bench_shards.py [--patches-per-image 400] [--repeats 3]

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
Each figure is the best of --repeats passes (the machine's noise only ever slows a pass down).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shards.build import build_shards  # noqa: E402
from shards.reader import PatchStream  # noqa: E402
from shards.shardset import ShardSet, record_offsets  # noqa: E402
from shards.sources import list_items  # noqa: E402
from shards.writer import PatchParams  # noqa: E402


def best_rate(fn, n_items: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        got = fn()
        best = min(best, time.perf_counter() - t0)
        assert got == n_items, (got, n_items)
    return n_items / best


def strip_bytes(root: Path) -> list[bytes]:
    shards = ShardSet.open(root)
    out = []
    for i in range(len(shards.names)):
        offs = record_offsets(shards.path(i)).members["jpg"]
        with open(shards.path(i), "rb") as f:
            for off, size in offs:
                f.seek(int(off))
                out.append(f.read(int(size)))
    return out


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
    args = ap.parse_args()
    cv2.setNumThreads(1)
    listing = list_items("demo")
    with tempfile.TemporaryDirectory() as tmp:
        ours_dir, naive_dir = Path(tmp) / "ours", Path(tmp) / "naive"
        base = dict(patch_px=96, patches_per_image=args.patches_per_image, seed=0)
        build_shards(listing, ours_dir, PatchParams(**base, patches_per_record=16), images_per_shard=5)
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
    }))


if __name__ == "__main__":
    main()
