"""Tiny real training inputs for the stage 3/4 tests: a cluster file over the patches of the shared
`shard_dir` fixture and the members' pixels, plus a small CPU `TrainSpec` as the dict Ray receives.

`shard_dir` holds 60 patches of 6 photos, 10 per photo: rows 0-29 are cut from the cat photo
(cat_0, cat_1, cat_2), rows 30-59 from the coffee photo; the two look nothing alike.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pretrain.train.data import write_member_pixels

CAT, COFFEE = np.arange(0, 30), np.arange(30, 60)
PER_PHOTO = [np.arange(10 * i, 10 * i + 10) for i in range(6)]  # cat_0, cat_1, cat_2, coffee_0, ...


def cluster_inputs(shard_dir: Path, out: Path, groups: list[np.ndarray]) -> tuple[Path, Path]:
    """groups: patch rows of each cluster -> (members.npy, clusters.npz) in `out`: the cluster file has
    `offsets` (C+1,) and `member_index` (M,) like clusters/roundR.npz."""
    out.mkdir(parents=True, exist_ok=True)
    member_index = np.concatenate(groups).astype(np.int64)
    offsets = np.r_[0, np.cumsum([len(g) for g in groups])].astype(np.int64)
    clusters = out / "clusters.npz"
    np.savez(clusters, offsets=offsets, member_index=member_index)
    return write_member_pixels(shard_dir, member_index, out / "members.npy"), clusters


def spec_dict(pixels: Path, clusters: Path, out_dir: Path, **over) -> dict:
    """A TrainSpec for a 32x32 quarter-width AlexNet on the CPU, as a plain dict."""
    base = dict(mode="cluster", pixels_path=str(pixels), clusters_path=str(clusters), out_dir=str(out_dir),
                arch="alexnet32", width=0.25, steps=12, batch_size_per_worker=8, lr=0.01, checkpoint_every=4,
                log_every=1, progress=False)
    return base | over


def logged(out_dir: Path) -> list[dict]:
    """The lines of rank 0's metrics.jsonl."""
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
