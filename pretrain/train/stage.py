"""Stages 3 and 4 as run-directory steps: config -> TrainSpec -> a trainer -> weights in the run.

    train/roundR/model.safetensors   trunk + cluster classifier trained on clusters/roundR.npz
    train/roundR/members.npy         the members' pixels (M, P, P, 3) uint8 (training input)
    train/roundR/ray/roundR/         the trainer's checkpoints (resume state)
    features/roundR.npy              (R > 0) fc7 of train/round(R-1), whitened: the next clustering
    hash/kK/model.safetensors        trunk + hashing layer W for K bits; hash/kK/codes.npy, scores.npy
    final.safetensors, codes.npy     the K = hash.code_bits model and the packed codes of all patches

`trainer(config, name=..., storage_path=...)` runs `train_worker` and returns the final checkpoint
directory: `shards.cluster.ray_train` in the driver, `session.local_trainer` in tests. A rerun with
the same name resumes from the newest checkpoint there; a changed spec or changed inputs (new clusters
at the same path) start the directory afresh,
so a stale checkpoint is never resumed into a different run.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import numpy as np

from pretrain.config import Config, config_hash, to_dict
from pretrain.eval.hashing_baselines import fit_itq
from pretrain.features.cnn import cnn_features
from pretrain.features.extract import extract_features
from pretrain.rundir import RunDir, StageResult
from pretrain.train.data import write_member_pixels
from pretrain.train.export import export_final, write_codes
from pretrain.train.loop import TrainSpec
from pretrain.train.session import fresh_storage
from shards.fsutil import atomic_write_bytes, atomic_write_npz, atomic_write_text, sha256_file
from shards.shardset import SHARDS_JSON
from shards.store import PatchStore

# resources, not results, and settings of later stages: changing them must not redo a finished round
NOT_HASHED = ("num_workers", "use_gpu", "cpus_per_worker", "loader_workers", "amp", "checkpoint_every",
              "max_failures", "rounds", "feature_layer", "feature_fit_patches")
# spec fields a relaunch may change and still resume its checkpoints
RESUMABLE_CHANGES = ("checkpoint_every", "loader_workers", "progress")


def round_steps(members: int, views: int, epochs: float, batch: int, workers: int, cap: int) -> int:
    """Steps for `epochs` passes over `views` augmented views of each member, on `workers` x `batch`
    samples per step; `cap` > 0 bounds them."""
    steps = max(1, math.ceil(epochs * views * members / (batch * workers)))
    return min(steps, cap) if cap else steps


def ensure_member_pixels(shards_root: Path, clusters: Path, out: Path) -> Path:
    """`out` (members.npy) for this cluster file and these shards, reused when its stamp matches."""
    stamp = out.with_name(out.name + ".key")
    key = config_hash({"clusters": sha256_file(clusters), "shards": sha256_file(Path(shards_root) / SHARDS_JSON)})
    if out.is_file() and stamp.is_file() and stamp.read_text() == key:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    write_member_pixels(shards_root, np.load(clusters, allow_pickle=False)["member_index"], out)
    atomic_write_text(stamp, key)
    return out


def _fit(trainer: Callable, spec: TrainSpec, inputs: dict, storage: Path, name: str, out: Path) -> Path:
    # the key holds the stage's input fingerprints too: new clusters at the same paths are another run
    same_run = {k: v for k, v in dataclasses.asdict(spec).items() if k not in RESUMABLE_CHANGES}
    fresh_storage(storage, config_hash({"spec": same_run, "inputs": inputs}))
    final = trainer(dataclasses.asdict(spec), name=name, storage_path=storage)
    atomic_write_bytes(out, (Path(final) / "model.safetensors").read_bytes())
    return out


def _spec_common(cfg: Config) -> dict:
    t = cfg.train
    return dict(arch=t.arch, width=t.width, dropout=t.dropout, momentum=t.momentum, weight_decay=t.weight_decay,
                aug_scale=t.aug_scale, aug_color=t.aug_color, checkpoint_every=t.checkpoint_every,
                loader_workers=t.loader_workers, amp=t.amp, seed=cfg.run.seed)


def train_round_stage(cfg: Config, run: RunDir, shards_root: Path, round_: int, trainer: Callable,
                      force: bool = False) -> StageResult:
    """Stage 3 for one round: the CNN trained with softmax over clusters/roundR.npz."""
    inputs = {"clusters": run.outputs_fingerprint(f"cluster_round{round_}")}
    if round_ > 0:
        inputs["init"] = run.outputs_fingerprint(f"train_round{round_ - 1}")
    config = {k: v for k, v in to_dict(cfg.train).items() if k not in NOT_HASHED} | {"seed": cfg.run.seed}
    d = run.path / "train" / f"round{round_}"
    clusters = run.path / "clusters" / f"round{round_}.npz"

    def work():
        pixels = ensure_member_pixels(shards_root, clusters, d / "members.npy")
        t = cfg.train
        steps = round_steps(len(np.load(pixels, mmap_mode="r")), t.views_per_member, t.epochs,
                            t.batch_size_per_worker, t.num_workers, t.max_steps_per_round)
        init = str(run.path / "train" / f"round{round_ - 1}" / "model.safetensors") if round_ > 0 else ""
        spec = TrainSpec(mode="cluster", pixels_path=str(pixels), clusters_path=str(clusters), out_dir=str(d),
                         init_from=init, steps=steps, batch_size_per_worker=t.batch_size_per_worker, lr=t.lr,
                         **_spec_common(cfg))
        out = _fit(trainer, spec, inputs, d / "ray", f"round{round_}", d / "model.safetensors")
        return {str(out): None}

    return run.run_stage(f"train_round{round_}", work, config=config, inputs=inputs, force=force)


def cnn_features_stage(cfg: Config, run: RunDir, shards_root: Path, round_: int, mapper: Callable,
                       force: bool = False) -> StageResult:
    """features/roundR.npy for R > 0: train/round(R-1)'s features, whitened to features.out_dim."""
    model = run.path / "train" / f"round{round_ - 1}" / "model.safetensors"
    config = {"kind": "cnn", "layer": cfg.train.feature_layer, "out_dim": cfg.features.out_dim,
              "fit_sample_patches": cfg.train.feature_fit_patches, "seed": cfg.run.seed}
    inputs = {"model": run.outputs_fingerprint(f"train_round{round_ - 1}")}

    def work():
        res = extract_features(shards_root, run.path / "features", kind="cnn", mapper=mapper,
                               fit_sample_patches=config["fit_sample_patches"], seed=cfg.run.seed, round_=round_,
                               model_path=str(model), model_sha256=sha256_file(model), layer=config["layer"],
                               out_dim=config["out_dim"])
        return {res["features"]: None, res["encoder"]: None}

    return run.run_stage(f"features_round{round_}", work, config=config, inputs=inputs, force=force)


def itq_init(shards_root: Path, model: Path, bits: int, *, fit_patches: int, seed: int, out: Path) -> Path:
    """W's start (paper sec. 3.2: the projection of [37]; our stand-in is PCA+ITQ) on the trunk's
    features of a seeded sample of all patches -> npz with mean (d,) and proj (d, K). All patches, not
    only the cluster members: the codes are for every patch, and on digits ITQ fitted on the ~15% of
    patches that are members gave 0.80 mAP at 32 bits against 0.86 fitted on all."""
    store = PatchStore(shards_root)
    rows = np.sort(np.random.default_rng(seed).permutation(len(store))[:fit_patches])
    feats = cnn_features(store.get(rows), model_path=str(model), model_sha256=sha256_file(model), layer="fc7")
    hasher = fit_itq(feats, bits, seed=seed)
    atomic_write_npz(out, mean=hasher.mean.astype(np.float32), proj=hasher.proj.astype(np.float32))
    return out


def hash_stage(cfg: Config, run: RunDir, shards_root: Path, bits: int, trainer: Callable, mapper: Callable,
               force: bool = False) -> StageResult:
    """Stage 4 for K = `bits`: triplet hashing fine-tune of the last round's trunk, then the codes of
    every patch. For K = hash.code_bits also final.safetensors and codes.npy in the run directory."""
    last = cfg.train.rounds - 1
    inputs = {"clusters": run.outputs_fingerprint(f"cluster_round{last}"),
              "model": run.outputs_fingerprint(f"train_round{last}")}
    h = cfg.hash
    config = {k: v for k, v in to_dict(h).items() if k not in ("code_bits", "extra_bits")}
    config |= {"bits": bits, "seed": cfg.run.seed, "final": bits == h.code_bits}
    d = run.path / "hash" / f"k{bits}"
    clusters = run.path / "clusters" / f"round{last}.npz"
    trunk = run.path / "train" / f"round{last}" / "model.safetensors"

    def work():
        pixels = ensure_member_pixels(shards_root, clusters, run.path / "train" / f"round{last}" / "members.npy")
        init = itq_init(shards_root, trunk, bits, fit_patches=cfg.train.feature_fit_patches, seed=cfg.run.seed,
                        out=d / "init.npz") if h.init == "itq" else ""
        steps = round_steps(len(np.load(pixels, mmap_mode="r")), h.views_per_member, h.epochs,
                            h.batch_size_per_worker, cfg.train.num_workers, h.max_steps)
        spec = TrainSpec(mode="hash", pixels_path=str(pixels), clusters_path=str(clusters), out_dir=str(d),
                         init_from=str(trunk), steps=steps, batch_size_per_worker=h.batch_size_per_worker, lr=h.lr,
                         bits=bits, hash_init=str(init), alpha=h.alpha, beta=h.beta, gamma=h.gamma,
                         printed_eq2=h.printed_eq2, trunk_lr_scale=h.trunk_lr_scale, **_spec_common(cfg))
        model = _fit(trainer, spec, inputs, d / "ray", f"k{bits}", d / "model.safetensors")
        codes = write_codes(shards_root, model, d, mapper)
        produced = {str(model): None, **{str(p): None for p in codes}}
        if bits == h.code_bits:
            produced[str(export_final(model, to_dict(cfg), run.path / "final.safetensors"))] = None
            atomic_write_bytes(run.path / "codes.npy", (d / "codes.npy").read_bytes())
            produced[str(run.path / "codes.npy")] = None
        return produced

    return run.run_stage(f"hash_k{bits}", work, config=config, inputs=inputs, force=force)
