"""Stage 1: init features for every patch, one task per shard through a `mapper`, resumable.

Files in `out_dir` (round 0: the init features; round r > 0: CNN features, `kind="cnn"`):
  encoder.npz               the fitted encoder (FisherEncoder.save), fitted once on a seeded sample
                            (round r > 0: encoder_roundR.npz)
  round0.npy                (total_patches, out_dim) float16; row i is global patch i (roundR.npy)
  .features-progress.jsonl  one line per shard whose rows are written and flushed:
                            {"shard": name, "shard_sha256": ..., "encoder_sha256": ...}
                            (round r > 0: .features-roundR-progress.jsonl)

A shard's rows are trusted only if its progress line names the current encoder and the same shard
file; a killed run re-encodes just the other shards. `mapper` is `infra.ray_edge.serial_map` or
`ray_map` (same contract); tasks get paths, not arrays, and read their shard themselves.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.lib.format import open_memmap

from pretrain.features.cnn import cnn_features, fit_cnn_encoder
from pretrain.features.fisher import FisherEncoder, fisher_vectors, fit_fisher_encoder, whiten
from pretrain.features.hog import fit_hog_encoder, hog_features
from infra.storage import atomic_write_text, sha256_file
from shards.store import PatchStore

log = logging.getLogger(__name__)

FIT = {"fv": fit_fisher_encoder, "hog": fit_hog_encoder, "cnn": fit_cnn_encoder}
ENCODER, FEATURES, PROGRESS = "encoder.npz", "round0.npy", ".features-progress.jsonl"


def file_names(round_: int) -> tuple[str, str, str]:
    """(encoder, features, progress) file names of a round's features."""
    if round_ == 0:
        return ENCODER, FEATURES, PROGRESS
    return f"encoder_round{round_}.npz", f"round{round_}.npy", f".features-round{round_}-progress.jsonl"
READ_BATCH = 1024  # patches decoded at a time inside a task: bounds a task's memory on big shards


def encode(patches: np.ndarray, enc: FisherEncoder) -> np.ndarray:
    """patches: (N, P, P, 3) uint8 -> (N, out_dim) float32: FV or HOG (by enc.kind), whitened, then
    L2-normalised. The clustering's linear SVMs rank patches by w.x: without the normalisation the
    top firings are the patches of largest norm along w, not the ones most like the members (on
    digits, member purity after the discovery loop 0.954 normalised vs 0.911 not)."""
    if enc.kind == "fv":
        raw = fisher_vectors(patches, enc)
    elif enc.kind == "hog":
        raw = hog_features(patches, enc.settings["cell_px"])
    elif enc.kind == "cnn":
        st = enc.settings
        raw = cnn_features(patches, model_path=st["model_path"], model_sha256=st["model_sha256"], layer=st["layer"])
    else:
        raise ValueError(f"unknown encoder kind {enc.kind!r}")
    x = whiten(raw, enc)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def encode_shard(shards_root: str, shard: int, encoder_path: str) -> np.ndarray:
    """The per-shard task: -> (n_shard, out_dim) float32 features of shard `shard`, in shard order."""
    store = PatchStore(shards_root)
    start, count = int(store.shards.starts[shard]), int(store.shards.counts[shard])
    enc = FisherEncoder.load(encoder_path)
    out = np.empty((count, enc.out_dim), np.float32)
    for s in range(0, count, READ_BATCH):
        stop = min(s + READ_BATCH, count)
        out[s:stop] = encode(store.get(np.arange(start + s, start + stop)), enc)
    return out


def _wanted_settings(kind: str, seed: int, n_fit: int, settings: dict) -> dict:
    """The full settings the encoder must have been fitted with (defaults filled in)."""
    if kind not in FIT:
        raise ValueError(f"feature kind must be one of {sorted(FIT)}, got {kind!r}")
    params = inspect.signature(FIT[kind]).parameters
    valid = {name for name, p in params.items() if p.kind is p.KEYWORD_ONLY} - {"seed"}
    if set(settings) - valid:
        raise ValueError(f"unknown {kind} encoder setting(s) {sorted(set(settings) - valid)}; "
                         f"valid: {sorted(valid)}")
    defaults = {n: params[n].default for n in valid if params[n].default is not params[n].empty}
    missing = valid - set(settings) - set(defaults)
    if missing:
        raise ValueError(f"missing {kind} encoder setting(s) {sorted(missing)}")
    return {**defaults, **settings, "seed": seed, "fit_patches": n_fit}


def _fitted_encoder(store: PatchStore, path: Path, kind: str, seed: int, n_fit: int,
                    settings: dict) -> FisherEncoder:
    """Loads `path` if it was fitted with these settings, else fits on a seeded sample and saves."""
    wanted = _wanted_settings(kind, seed, n_fit, settings)
    if path.is_file():
        try:
            enc = FisherEncoder.load(path)
            if enc.kind == kind and enc.settings == wanted:
                log.info("reusing encoder %s (same settings)", path)
                return enc
            log.info("encoder %s has other settings; refitting", path)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("encoder %s unreadable (%s); refitting", path, exc)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(store), n_fit, replace=False))  # sorted: sequential reads
    fit_args = {k: v for k, v in wanted.items() if k != "fit_patches"}
    enc = FIT[kind](store.get(sample), **fit_args)
    enc.save(path)
    return enc


def _open_output(path: Path, shape: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """-> (float16 memmap of `shape`, whether it was (re)created and so holds no trusted rows)."""
    if path.is_file():
        try:
            out = open_memmap(path, mode="r+")
            if out.shape == shape and out.dtype == np.float16:
                return out, False
            del out
        except (OSError, ValueError):
            pass
        log.info("%s has another shape or is damaged; starting it afresh", path)
    return open_memmap(path, mode="w+", dtype=np.float16, shape=shape), True


def _trusted_shards(progress: Path, shard_sha: dict, encoder_sha: str) -> list[dict]:
    """Progress records that match the current shard files and encoder (a torn last line is skipped)."""
    kept = []
    lines = progress.read_text().splitlines() if progress.is_file() else []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if (isinstance(rec, dict) and rec.get("shard") in shard_sha and rec.get("encoder_sha256") == encoder_sha
                and rec.get("shard_sha256") == shard_sha[rec["shard"]]):
            kept.append(rec)
    return kept


def extract_features(shards_root: str | Path, out_dir: str | Path, *, kind: str, mapper: Callable,
                     fit_sample_patches: int, seed: int, round_: int = 0, **settings) -> dict:
    """Encodes every patch of the shard set at `shards_root` into `out_dir/round0.npy`
    ((total, out_dim) float16; `roundR.npy` for round_ R), resuming a killed run. `settings` go to
    fit_fisher_encoder (kind "fv": step_px, bin_px, desc_pca_dim, gmm_components, out_dim),
    fit_hog_encoder ("hog": cell_px, out_dim) or fit_cnn_encoder ("cnn": model_path, model_sha256,
    layer, out_dim); all take an optional whiten_reg.
    -> {"features", "encoder" (paths), "dim", "patches", "encoded_shards" (by this call)}."""
    shards_root, out_dir = Path(shards_root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = PatchStore(shards_root)
    sset = store.shards
    if fit_sample_patches < 2:
        raise ValueError(f"fit_sample_patches must be >= 2, got {fit_sample_patches}")
    n_fit = min(fit_sample_patches, len(store))
    enc_path, feat_path, progress = (out_dir / name for name in file_names(round_))
    enc = _fitted_encoder(store, enc_path, kind, seed, n_fit, settings)
    enc_sha = sha256_file(enc_path)

    features, fresh = _open_output(feat_path, (len(store), enc.out_dim))
    shard_sha = {s["name"]: s.get("sha256") for s in sset.info["shards"]}
    kept = [] if fresh else _trusted_shards(progress, shard_sha, enc_sha)
    atomic_write_text(progress, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    done = {r["shard"] for r in kept}
    todo = [i for i, name in enumerate(sset.names) if name not in done]
    if done:
        log.info("resuming features in %s: %d of %d shards already encoded", out_dir, len(done),
                 len(sset.names))

    def on_result(j: int, rows: np.ndarray) -> None:
        i = todo[j]
        start, count = int(sset.starts[i]), int(sset.counts[i])
        if rows.shape != (count, enc.out_dim):
            raise RuntimeError(f"shard {sset.names[i]}: task returned {rows.shape}, "
                               f"expected {(count, enc.out_dim)}")
        features[start:start + count] = rows
        features.flush()  # rows on disk before the progress line that vouches for them
        line = {"shard": sset.names[i], "shard_sha256": shard_sha[sset.names[i]], "encoder_sha256": enc_sha}
        with open(progress, "a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    if todo:
        mapper(encode_shard, [(str(shards_root), i, str(enc_path)) for i in todo], desc="features",
               on_result=on_result)
    return {"features": str(feat_path), "encoder": str(enc_path), "dim": enc.out_dim,
            "patches": len(store), "encoded_shards": len(todo)}
