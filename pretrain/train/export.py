"""The hashing model's products: `final.safetensors` and the codes of every patch.

`final.safetensors` holds the trunk (conv1..conv5, fc6, fc7 and their BatchNorms, unprefixed: the
transfer contract), the hashing layer (`hash.weight` (d, K), `hash.mean` (d,)) and, as metadata,
the model description and the resolved config. `codes.npy` is (N, K/8) uint8: row i holds the K bits
of global patch i packed with np.packbits (FAISS's binary layout); `scores.npy` (N, K) float16 holds
the pre-sign projections W^T (f - mean) (Eq. 1), which the attribute figures rank by. Both load
with `allow_pickle=False`. Every file may be a local path or a bucket URI; the per-shard tasks write
their rows as part files themselves and one task assembles them (pretrain/parts.py).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from infra import storage
from infra.storage import local_copy, sha256_file
from pretrain.models.alexnet import HashHead
from pretrain.models.inputs import to_input
from pretrain.models.weights import WeightsError, load_trunk, load_weights, save_weights, split_prefix, tensor_shapes
from pretrain.parts import assemble, finished, part_name, put_rows, shard_tag
from shards.store import PatchStore

BATCH = 256
READ_BATCH = 2048
PARTS = "codes.parts"  # per-shard parts while write_codes runs


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
    # a bucket URI is read through this node's cache, keyed (and checked) by the checksum
    return load_hasher(local_copy(path, sha256), "cuda" if torch.cuda.is_available() else "cpu")[:2]


@torch.no_grad()
def hash_scores(patches: np.ndarray, model_path: str, model_sha256: str) -> np.ndarray:
    """patches: (N, P, P, 3) uint8 -> (N, K) float32 scores W^T (f(x) - mean); bit k is score > 0."""
    trunk, head = _hasher(model_path, model_sha256)
    device = next(trunk.parameters()).device
    out = [head.scores(trunk(to_input(torch.from_numpy(np.ascontiguousarray(patches[s : s + BATCH])).to(device))))
           .float().cpu().numpy() for s in range(0, len(patches), BATCH)]
    return np.concatenate(out)


def scores_shard(shards_root: str, shard: int, model_path: str, model_sha256: str) -> np.ndarray:
    """-> (n_shard, K) float32 scores of shard `shard`, in shard order."""
    store = PatchStore(shards_root)
    start, count = int(store.shards.starts[shard]), int(store.shards.counts[shard])
    parts = [hash_scores(store.get(np.arange(start + s, start + min(s + READ_BATCH, count))), model_path,
                         model_sha256) for s in range(0, count, READ_BATCH)]
    return np.concatenate(parts)


def codes_shard(shards_root: str, shard: int, model_path: str, model_sha256: str, scores_part: str,
                codes_part: str) -> dict:
    """The per-shard task of `write_codes`: writes shard `shard`'s scores (n, K) float16 and packed codes
    (n, K/8) uint8 as two part files -> {"shard", "rows", "scores": record, "codes": record}."""
    rows = scores_shard(shards_root, shard, model_path, model_sha256)
    codes = put_rows(codes_part, np.packbits(rows > 0, axis=1))  # the bits of the float32 scores
    return {"shard": shard, "rows": int(rows.shape[0]), "codes": codes,
            "scores": put_rows(scores_part, rows.astype(np.float16))}


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


def write_mean_task(model_path: str, model_sha256: str, mean: np.ndarray) -> dict:
    """The one task that rewrites a hashing model file with `hash.mean` = mean (atomically) -> {"key"}."""
    tensors, meta = load_weights(model_path, model_sha256)
    tensors["hash.mean"] = torch.from_numpy(np.array(mean, np.float32))  # a copy: Ray hands read-only arrays
    save_weights(model_path, tensors, meta)
    return {"key": str(model_path)}


def set_feature_mean(shards_root: str | Path, model_path: str | Path, mapper: Callable) -> np.ndarray:
    """Sets `hash.mean` of a hashing model file (a path or a URI) to the eval-mode mean of every patch's
    features (one task per shard, each returning a (d,) sum), the centre its codes are thresholded at
    (Eq. 1: zero-meaned features, no bias). One task rewrites the file atomically -> the mean (d,) float32."""
    root, model = str(storage.absolute(shards_root)), str(storage.absolute(model_path))
    store = PatchStore(root)
    sha = sha256_file(model)
    parts = mapper(feature_sum_shard, [(root, i, model, sha) for i in range(len(store.shards.names))],
                   desc="feature mean")
    mean = (sum(p[0] for p in parts) / max(sum(p[1] for p in parts), 1)).astype(np.float32)
    mapper(write_mean_task, [(model, sha, mean)], desc="feature mean: write")
    return mean


def write_codes(shards_root: str | Path, model_path: str | Path, out_dir: str | Path, mapper: Callable) -> list[Path]:
    """Scores and packed codes of every patch -> [out_dir/codes.npy, out_dir/scores.npy] (paths, or
    UPaths for a bucket URI). One task per shard writes the shard's rows as part files in
    out_dir/codes.parts/ (named by the shard's and the model's sha256, so a rerun after a kill encodes only
    the shards without parts), then one task assembles both files and the parts are removed."""
    root, model, out = str(storage.absolute(shards_root)), str(storage.absolute(model_path)), storage.absolute(out_dir)
    storage.makedirs(out)
    store = PatchStore(root)
    sset = store.shards
    sha = sha256_file(model)
    shape = tensor_shapes(model).get("hash.weight")
    if shape is None:
        raise WeightsError(f"{model} has no hashing layer (hash.weight): is it a stage-3 checkpoint?")
    bits = int(shape[1])
    parts_dir = out / PARTS
    tags = [shard_tag(e) for e in sset.info["shards"]]
    names = {i: [part_name(i, tags[i], sha, suffix=f".{kind}.npy") for kind in ("scores", "codes")]
             for i in range(len(sset.names))}
    have = finished(parts_dir, names)
    todo = [i for i in range(len(sset.names)) if i not in have]
    results = mapper(codes_shard, [(root, i, model, sha, *(str(parts_dir / n) for n in names[i])) for i in todo],
                     desc="codes") if todo else []
    records = dict(zip(todo, results))
    for i, rec in records.items():
        if rec["rows"] != int(sset.counts[i]):
            raise RuntimeError(f"shard {sset.names[i]}: task wrote {rec['rows']} rows, expected {int(sset.counts[i])}")

    def output(name: str, k: int, dtype: str, width: int) -> dict:
        parts = [{"key": str(parts_dir / names[i][k]), "start": int(sset.starts[i]), "rows": int(sset.counts[i]),
                  **({"sha256": records[i][("scores", "codes")[k]]["sha256"]} if i in records else {})}
                 for i in range(len(sset.names))]
        return {"out": str(out / name), "shape": [len(store), width], "dtype": dtype, "parts": parts}

    mapper(assemble, [([output("codes.npy", 1, "uint8", bits // 8), output("scores.npy", 0, "float16", bits)],)],
           desc="codes: assemble")
    storage.rmtree(parts_dir)
    return [out / "codes.npy", out / "scores.npy"]


def export_final(model_path: str | Path, config: dict, out: str | Path) -> Path:
    """Copies a hashing model (a path or a URI) to `out` (a path or a URI) with the resolved config added
    to its metadata."""
    tensors, meta = load_weights(model_path)
    meta = {**meta, "config": config, "bits": int(tensors["hash.weight"].shape[1])}
    meta.pop("spec", None)  # worker paths of the training run; the config says how it was made
    return save_weights(out, tensors, meta)
