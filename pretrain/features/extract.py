"""Stage 1: init features for every patch, one task per shard through a `mapper`, resumable.

Files in `out_dir`, a local path or a bucket URI (round 0: the init features; round r > 0: CNN
features, `kind="cnn"`, with `roundR` for `round0`):
  encoder.npz           the fitted encoder (FisherEncoder.save), fitted once on a seeded sample by one
                        task (round r > 0: encoder_roundR.npz)
  round0.parts/         while the stage runs: part-000003-<shard sha256[:12]>-<encoder sha256[:12]>.npy,
                        shard 3's rows (n, out_dim) float16, written by the task that encoded them
  round0.npy            (total_patches, out_dim) float16; row i is global patch i; assembled from the
                        parts by one task, after which the parts are removed
  .round0-done.json     {"key": fingerprint of the shards and the encoder, "features": round0.npy's
                        record {key, size, sha256}}, written once round0.npy is complete

Progress is the listing of round0.parts/: a part is trusted only when its name names the current
shard file and encoder, so a killed run re-encodes just the other shards. `mapper` is
`infra.ray_edge.serial_map` or `ray_map` (same contract); tasks get paths, not arrays, read their
shard themselves, write their own part and return its small record: the driver holds no rows.
"""
from __future__ import annotations

import inspect
import json
import logging
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from pretrain.features.cnn import cnn_features, fit_cnn_encoder
from pretrain.features.fisher import FisherEncoder, fisher_vectors, fit_fisher_encoder, whiten
from pretrain.features.hog import fit_hog_encoder, hog_features
from infra import storage
from infra.storage import atomic_write_json, sha256_file
from pretrain.parts import assemble, finished, fingerprint, part_name, put_rows, shard_tag
from shards.store import PatchStore

log = logging.getLogger(__name__)

FIT = {"fv": fit_fisher_encoder, "hog": fit_hog_encoder, "cnn": fit_cnn_encoder}
ENCODER, FEATURES, PARTS, DONE = "encoder.npz", "round0.npy", "round0.parts", ".round0-done.json"


def file_names(round_: int) -> tuple[str, str, str, str]:
    """(encoder, features, parts directory, done stamp) names of a round's features."""
    if round_ == 0:
        return ENCODER, FEATURES, PARTS, DONE
    return f"encoder_round{round_}.npz", f"round{round_}.npy", f"round{round_}.parts", f".round{round_}-done.json"


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


def encode_rows(shards_root: str, shard: int, encoder_path: str, encoder_sha256: str | None = None) -> np.ndarray:
    """-> (n_shard, out_dim) float32 features of shard `shard`, in shard order."""
    store = PatchStore(shards_root)
    start, count = int(store.shards.starts[shard]), int(store.shards.counts[shard])
    enc = FisherEncoder.load(encoder_path, encoder_sha256)
    out = np.empty((count, enc.out_dim), np.float32)
    for s in range(0, count, READ_BATCH):
        stop = min(s + READ_BATCH, count)
        out[s:stop] = encode(store.get(np.arange(start + s, start + stop)), enc)
    return out


def encode_shard(shards_root: str, shard: int, encoder_path: str, encoder_sha256: str, part_path: str) -> dict:
    """The per-shard task: encodes shard `shard` and writes its rows, float16, as the part file
    `part_path` -> {"shard", "rows", "dim", and the part's key, size, sha256}."""
    rows = encode_rows(shards_root, shard, encoder_path, encoder_sha256).astype(np.float16)
    return {"shard": shard, "rows": int(rows.shape[0]), "dim": int(rows.shape[1]), **put_rows(part_path, rows)}


def fit_encoder_task(shards_root: str, encoder_path: str, kind: str, wanted: dict) -> dict:
    """The fit task: fits the encoder on a seeded sample of `wanted["fit_patches"]` patches and saves it
    at `encoder_path` -> {"out_dim", and the file's key, size, sha256}."""
    store = PatchStore(shards_root)
    rng = np.random.default_rng(wanted["seed"])
    sample = np.sort(rng.choice(len(store), wanted["fit_patches"], replace=False))  # sorted: sequential reads
    enc = FIT[kind](store.get(sample), **{k: v for k, v in wanted.items() if k != "fit_patches"})
    return {"out_dim": enc.out_dim, **enc.save(encoder_path)}


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


def _fitted_encoder(shards_root: str, path, kind: str, seed: int, n_fit: int, settings: dict,
                    mapper: Callable) -> tuple[int, str]:
    """Reuses `path` if it was fitted with these settings, else fits (one task) -> (out_dim, sha256)."""
    wanted = _wanted_settings(kind, seed, n_fit, settings)
    if path.is_file():
        try:
            got_kind, got_settings, out_dim = FisherEncoder.read_info(path)
            if got_kind == kind and got_settings == wanted:
                log.info("reusing encoder %s (same settings)", path)
                return out_dim, sha256_file(path)
            log.info("encoder %s has other settings; refitting", path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("encoder %s unreadable (%s); refitting", path, exc)
    try:
        (rec,) = mapper(fit_encoder_task, [(shards_root, str(path), kind, wanted)], desc="features: fit encoder")
    except ValueError as exc:  # settings the patches cannot take; a Ray task's error carries its `cause`
        raise ValueError(str(getattr(exc, "cause", None) or exc)) from None
    return int(rec["out_dim"]), rec["sha256"]


def _finished_output(done: dict | None, key: str, features) -> bool:
    """Whether the assembled features file is the one the done stamp vouches for under `key`."""
    return (isinstance(done, dict) and done.get("key") == key
            and storage.size_of(features) == (done.get("features") or {}).get("size"))


def _read_json(path) -> dict | None:
    p = storage.to_path(path)
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except (OSError, ValueError):
        return None


def extract_features(shards_root: str | Path, out_dir: str | Path, *, kind: str, mapper: Callable,
                     fit_sample_patches: int, seed: int, round_: int = 0, **settings) -> dict:
    """Encodes every patch of the shard set at `shards_root` into `out_dir/round0.npy`
    ((total, out_dim) float16; `roundR.npy` for round_ R), resuming a killed run. `out_dir` is a path or
    a bucket URI. `settings` go to fit_fisher_encoder (kind "fv": step_px, bin_px, desc_pca_dim,
    gmm_components, out_dim), fit_hog_encoder ("hog": cell_px, out_dim) or fit_cnn_encoder ("cnn":
    model_path, model_sha256, layer, out_dim); all take an optional whiten_reg.
    -> {"features", "encoder" (paths or URIs), "dim", "patches", "encoded_shards" (by this call)}."""
    root, out = str(storage.absolute(shards_root)), storage.absolute(out_dir)
    storage.makedirs(out)
    store = PatchStore(root)
    sset = store.shards
    if fit_sample_patches < 2:
        raise ValueError(f"fit_sample_patches must be >= 2, got {fit_sample_patches}")
    n_fit = min(fit_sample_patches, len(store))
    enc_path, feat_path, parts_dir, done_path = (out / name for name in file_names(round_))
    dim, enc_sha = _fitted_encoder(root, enc_path, kind, seed, n_fit, settings, mapper)
    result = {"features": str(feat_path), "encoder": str(enc_path), "dim": dim, "patches": len(store),
              "encoded_shards": 0}

    tags = [shard_tag(e) for e in sset.info["shards"]]
    key = fingerprint({"shards": [[n, t, int(c)] for n, t, c in zip(sset.names, tags, sset.counts)],
                       "encoder_sha256": enc_sha, "dim": dim})
    if _finished_output(_read_json(done_path), key, feat_path):
        storage.rmtree(parts_dir)  # a run killed after assembling
        return result
    storage.remove(done_path)  # from here on, features_path is not vouched for
    wanted = {i: part_name(i, tags[i], enc_sha) for i in range(len(sset.names))}
    have = finished(parts_dir, {i: [n] for i, n in wanted.items()})
    todo = [i for i in range(len(sset.names)) if i not in have]
    if have:
        log.info("resuming features in %s: %d of %d shards already encoded", out, len(have), len(sset.names))
    records = {}
    if todo:
        results = mapper(encode_shard, [(root, i, str(enc_path), enc_sha, str(parts_dir / wanted[i])) for i in todo],
                         desc="features")
        for i, rec in zip(todo, results):
            if (rec["rows"], rec["dim"]) != (int(sset.counts[i]), dim):
                raise RuntimeError(f"shard {sset.names[i]}: task wrote {(rec['rows'], rec['dim'])} rows, "
                                   f"expected {(int(sset.counts[i]), dim)}")
            records[i] = rec
    parts = [{"key": str(parts_dir / wanted[i]), "start": int(sset.starts[i]), "rows": int(sset.counts[i]),
              **({"sha256": records[i]["sha256"]} if i in records else {})} for i in range(len(sset.names))]
    (assembled,) = mapper(assemble, [([{"out": str(feat_path), "shape": [len(store), dim], "dtype": "float16",
                                        "parts": parts}],)], desc="features: assemble")
    atomic_write_json(done_path, {"key": key, "features": assembled[0]})
    storage.rmtree(parts_dir)
    return result | {"encoded_shards": len(todo)}
