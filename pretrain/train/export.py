"""The hashing model's products: `final.safetensors` and the codes of every patch.

`final.safetensors` holds the trunk (conv1..conv5, fc6, fc7 and their BatchNorms, unprefixed: the
transfer contract), the hashing layer (`hash.weight` (d, K), `hash.mean` (d,)) and, as metadata,
the model description and the resolved config. `codes.npy` is (N, K/8) uint8: row i holds the K bits
of global patch i packed with np.packbits (FAISS's binary layout); `scores.npy` (N, K) float16 holds
the pre-sign projections W^T (f - mean) (Eq. 1), which the attribute figures rank by. Both load
with `allow_pickle=False`.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from numpy.lib.format import open_memmap

from pretrain.models.alexnet import HashHead
from pretrain.models.weights import WeightsError, load_trunk, load_weights, save_weights, split_prefix
from pretrain.models.inputs import to_input
from infra.storage import sha256_file
from shards.store import PatchStore

BATCH = 256
READ_BATCH = 2048


def load_hasher(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, HashHead, dict]:
    """A hashing model file -> (trunk, hashing layer, metadata), both in eval mode."""
    trunk, meta = load_trunk(path, device)
    tensors, _ = load_weights(path)
    state = split_prefix(tensors, "hash")
    if "weight" not in state:
        raise WeightsError(f"{path} has no hashing layer (hash.weight): is it a stage-3 checkpoint?")
    head = HashHead(state["weight"].shape[0], state["weight"].shape[1])
    head.load_state_dict(state, strict=True)
    return trunk, head.to(device).eval(), meta


@lru_cache(maxsize=2)
def _hasher(path: str, sha256: str):  # the checksum is part of the cache key
    return load_hasher(path, "cuda" if torch.cuda.is_available() else "cpu")[:2]


@torch.no_grad()
def hash_scores(patches: np.ndarray, model_path: str, model_sha256: str) -> np.ndarray:
    """patches: (N, P, P, 3) uint8 -> (N, K) float32 scores W^T (f(x) - mean); bit k is score > 0."""
    trunk, head = _hasher(model_path, model_sha256)
    device = next(trunk.parameters()).device
    out = [head.scores(trunk(to_input(torch.from_numpy(np.ascontiguousarray(patches[s : s + BATCH])).to(device))))
           .float().cpu().numpy() for s in range(0, len(patches), BATCH)]
    return np.concatenate(out)


def scores_shard(shards_root: str, shard: int, model_path: str, model_sha256: str) -> np.ndarray:
    """The per-shard task: -> (n_shard, K) float32 scores of shard `shard`, in shard order."""
    store = PatchStore(shards_root)
    start, count = int(store.shards.starts[shard]), int(store.shards.counts[shard])
    parts = [hash_scores(store.get(np.arange(start + s, start + min(s + READ_BATCH, count))), model_path,
                         model_sha256) for s in range(0, count, READ_BATCH)]
    return np.concatenate(parts)


@torch.no_grad()
def feature_sum_shard(shards_root: str, shard: int, model_path: str, model_sha256: str) -> tuple[np.ndarray, int]:
    """The per-shard task of `feature_mean`: (sum of the eval-mode fc7 features (d,) float64, count)."""
    trunk, _ = _hasher(model_path, model_sha256)
    device = next(trunk.parameters()).device
    store = PatchStore(shards_root)
    start, count = int(store.shards.starts[shard]), int(store.shards.counts[shard])
    total = np.zeros(trunk.feature_dim, np.float64)
    for s in range(0, count, READ_BATCH):
        patches = store.get(np.arange(start + s, start + min(s + READ_BATCH, count)))
        for b in range(0, len(patches), BATCH):
            x = to_input(torch.from_numpy(np.ascontiguousarray(patches[b : b + BATCH])).to(device))
            total += trunk(x).double().sum(0).cpu().numpy()
    return total, count


def set_feature_mean(shards_root: str | Path, model_path: str | Path, mapper: Callable) -> np.ndarray:
    """Sets `hash.mean` of a hashing model file to the eval-mode mean of every patch's features (one
    task per shard), the centre its codes are thresholded at (Eq. 1: zero-meaned features, no bias).
    Rewrites the file atomically -> the mean (d,) float32."""
    store = PatchStore(shards_root)
    sha = sha256_file(model_path)
    parts = mapper(feature_sum_shard, [(str(shards_root), i, str(model_path), sha)
                                       for i in range(len(store.shards.names))], desc="feature mean")
    mean = (sum(p[0] for p in parts) / max(sum(p[1] for p in parts), 1)).astype(np.float32)
    tensors, meta = load_weights(model_path)
    tensors["hash.mean"] = torch.from_numpy(mean)
    save_weights(model_path, tensors, meta)
    return mean


def write_codes(shards_root: str | Path, model_path: str | Path, out_dir: str | Path, mapper: Callable) -> list[Path]:
    """Scores and packed codes of every patch (one task per shard) -> [codes.npy, scores.npy]."""
    store = PatchStore(shards_root)
    sset, out_dir = store.shards, Path(out_dir)
    sha = sha256_file(model_path)
    bits = int(load_weights(model_path)[0]["hash.weight"].shape[1])
    scores = open_memmap(out_dir / "scores.npy.tmp", mode="w+", dtype=np.float16, shape=(len(store), bits))
    codes = open_memmap(out_dir / "codes.npy.tmp", mode="w+", dtype=np.uint8, shape=(len(store), bits // 8))

    def on_result(i: int, rows: np.ndarray) -> None:
        start, count = int(sset.starts[i]), int(sset.counts[i])
        scores[start : start + count] = rows
        codes[start : start + count] = np.packbits(rows > 0, axis=1)

    mapper(scores_shard, [(str(shards_root), i, str(model_path), sha) for i in range(len(sset.names))],
           desc="codes", on_result=on_result)
    paths = []
    for name, arr in (("codes.npy", codes), ("scores.npy", scores)):
        arr.flush()
        (out_dir / f"{name}.tmp").replace(out_dir / name)
        paths.append(out_dir / name)
    return paths


def export_final(model_path: str | Path, config: dict, out: str | Path) -> Path:
    """Copies a hashing model to `out` with the resolved config added to its metadata."""
    tensors, meta = load_weights(model_path)
    meta = {**meta, "config": config, "bits": int(tensors["hash.weight"].shape[1])}
    meta.pop("spec", None)  # worker paths of the training run; the config says how it was made
    return save_weights(out, tensors, meta)
