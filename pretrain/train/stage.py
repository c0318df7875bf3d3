"""Stage 4 as a run-directory step, and what training runs of stages 3 and 4 share: config -> TrainSpec
-> a trainer -> weights in the run. (Stage 3's rounds are run by pretrain/alternation.py.)

    hash/kK/model.safetensors        trunk + hashing layer W for K bits; hash/kK/codes.npy, scores.npy
    hash/<variant>/kK/               the same for a variant of the objective (e.g. the printed Eq. 2)
    final.safetensors, codes.npy     the K = hash.code_bits model and the packed codes of all patches

`trainer(config, name=..., storage_path=...)` runs `train_worker` and returns the final checkpoint
directory: `infra.ray_edge.ray_train` in the driver, `session.local_trainer` in tests. A rerun with
the same name resumes from the newest checkpoint there; a changed spec or changed inputs (new clusters
at the same path) start the directory afresh, so a stale checkpoint is never resumed into a different run.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import numpy as np

from pretrain.config import Config, config_hash, scaled_lr, to_dict
from pretrain.eval.hashing_baselines import fit_itq
from pretrain.features.cnn import cnn_features
from infra import layout, storage
from infra.layout import RunLayout, ray_storage_of
from infra.rundir import RunDir, StageResult
from pretrain.train.data import write_member_pixels
from pretrain.train.export import export_final, set_feature_mean, write_codes
from pretrain.train.loop import TrainSpec
from infra.session import fresh_storage
from pretrain.train.similar import similar_pairs
from infra.storage import atomic_write_bytes, atomic_write_npz, atomic_write_text, sha256_file
from shards.shardset import SHARDS_JSON
from shards.store import PatchStore

# resources, not results, and settings of later stages: changing them must not redo a finished round
NOT_HASHED = ("num_workers", "use_gpu", "cpus_per_worker", "loader_workers", "amp", "grad_compression",
              "checkpoint_every", "max_failures", "rounds", "feature_layer", "feature_fit_patches")
# spec fields a relaunch may change and still resume its checkpoints
RESUMABLE_CHANGES = ("checkpoint_every", "loader_workers", "progress")


def round_steps(members: int, views: int, epochs: float, global_batch: int, cap: int) -> int:
    """Steps for `epochs` passes over `views` augmented views of each member, `global_batch` samples
    per step over all workers; `cap` > 0 bounds them."""
    steps = max(1, math.ceil(epochs * views * members / global_batch))
    return min(steps, cap) if cap else steps


def step_recipe(cfg: Config, section) -> dict:
    """The TrainSpec fields of one SGD step for `section` (cfg.train or cfg.hash) on this cluster:
    each of train.num_workers takes global_batch / num_workers samples, and the rate is `lr` scaled
    from `lr_base_batch` to `global_batch` by train.lr_scaling (what the manifest records as the
    stage's resources)."""
    workers = cfg.train.num_workers
    return {"batch_size_per_worker": section.global_batch // workers,
            "lr": scaled_lr(section.lr, section.global_batch, section.lr_base_batch, cfg.train.lr_scaling)}


def resources(cfg: Config, section) -> dict:
    """What a training stage of `section` runs with on this cluster, recorded in the manifest beside
    its (hashed) recipe: the workers, each one's batch, the rate used."""
    t = cfg.train
    return {"num_workers": t.num_workers, "use_gpu": t.use_gpu, "global_batch": section.global_batch,
            **step_recipe(cfg, section), "lr_scaling": t.lr_scaling, "grad_compression": t.grad_compression,
            "max_failures": t.max_failures}


def member_count(clusters) -> int:
    """Members in a cluster file (rows of its members.npy), without reading the members."""
    with np.load(storage.local_copy(clusters), allow_pickle=False) as z:
        return int(z["offsets"][-1])


def ensure_member_pixels(shards_root, clusters, out, mapper: Callable | None = None):
    """`out` (members.npy, a path or URI) for this cluster file and these shards, reused when its stamp
    matches; written by one task of `mapper` when given (the driver never holds the pixels)."""
    out = storage.to_path(out)
    stamp = out.with_name(out.name + ".key")
    key = config_hash({"clusters": sha256_file(clusters),
                       "shards": sha256_file(storage.to_path(shards_root) / SHARDS_JSON)})
    try:
        if stamp.read_text() == key and storage.size_of(out) is not None:
            return out
    except FileNotFoundError:
        pass
    storage.makedirs(out.parent)
    with np.load(storage.local_copy(clusters), allow_pickle=False) as z:
        member_index = z["member_index"]
    write_member_pixels(shards_root, member_index, out, mapper=mapper)
    atomic_write_text(stamp, key)
    return out


def fit(trainer: Callable, spec: TrainSpec, inputs: dict, ray_storage, name: str, out):
    """Runs (or resumes) one training run with checkpoints under `ray_storage` (a path or URI) and
    copies its final weights to `out`."""
    # the key holds the stage's input fingerprints too: new clusters at the same paths are another run
    same_run = {k: v for k, v in dataclasses.asdict(spec).items() if k not in RESUMABLE_CHANGES}
    fresh_storage(ray_storage, config_hash({"spec": same_run, "inputs": inputs}))
    final = trainer(dataclasses.asdict(spec), name=name, storage_path=str(ray_storage))
    atomic_write_bytes(out, (Path(final) / "model.safetensors").read_bytes())
    return out


def spec_common(cfg: Config) -> dict:
    """The TrainSpec fields every training run of a config shares."""
    t = cfg.train
    return dict(arch=t.arch, width=t.width, dropout=t.dropout, momentum=t.momentum, weight_decay=t.weight_decay,
                aug_scale=t.aug_scale, aug_color=t.aug_color, aug_flip=t.aug_flip,
                checkpoint_every=t.checkpoint_every, loader_workers=t.loader_workers, amp=t.amp, seed=cfg.run.seed,
                warmup_steps=t.warmup_steps, grad_compression=t.grad_compression)


def itq_init(shards_root, model, bits: int, *, fit_patches: int, seed: int, out):
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


def skip_pairs(pixels, clusters, model, init, threshold: float, *, seed: int, out, per_cluster: int = 64):
    """The near-duplicate cluster pairs (pretrain/train/similar.py): the cosine >= threshold of their mean
    fc7 features under `model`, centred by W's starting mean (`init`, PCA+ITQ's npz) or else by the
    sample's mean, over a seeded sample of at most `per_cluster` members of each cluster -> npz with
    pairs (P, 2) int64 and cos (P,) float32."""
    with np.load(storage.local_copy(clusters), allow_pickle=False) as z:
        offsets = z["offsets"]
    rng = np.random.default_rng(seed)
    rows = np.concatenate([rng.permutation(np.arange(lo, hi))[:per_cluster] for lo, hi in zip(offsets[:-1], offsets[1:])])
    rows = np.sort(rows)
    cluster = np.searchsorted(offsets, rows, side="right") - 1
    feats = cnn_features(np.load(storage.local_copy(pixels), mmap_mode="r")[rows], model_path=str(model), model_sha256=sha256_file(model),
                         layer="fc7")
    if init is not None and storage.size_of(init) is not None:
        with np.load(storage.local_copy(init), allow_pickle=False) as z:
            feats -= z["mean"]
    else:
        feats -= feats.mean(0)
    pairs, cos = similar_pairs(feats, cluster, len(offsets) - 1, threshold)
    atomic_write_npz(out, pairs=pairs, cos=cos)
    return out


def hash_stage(cfg: Config, run: RunDir, shards_root, bits: int, trainer: Callable, mapper: Callable,
               force: bool = False, variant: str = "") -> StageResult:
    """Stage 4 for K = `bits`: triplet hashing fine-tune of the last round's trunk, then W's feature mean
    re-estimated in eval mode over all patches, then the codes of every patch. For K = hash.code_bits
    also final.safetensors and codes.npy in the run directory (not for a `variant`, which names a
    differently configured objective kept beside the main one: stage hash_<variant>_kK)."""
    last = cfg.train.rounds - 1
    inputs = {"clusters": run.outputs_fingerprint(layout.cluster_stage(last)),
              "model": run.outputs_fingerprint(layout.train_stage(last))}
    h = cfg.hash
    config = {k: v for k, v in to_dict(h).items() if k not in ("code_bits", "extra_bits")}
    final = bits == h.code_bits and not variant
    config |= {"bits": bits, "seed": cfg.run.seed, "final": final, "lr_scaling": cfg.train.lr_scaling}
    lay = RunLayout(run.path)
    d, clusters, trunk = lay.hash_dir(bits, variant), lay.clusters(last), lay.model(last)

    def work():
        pixels = ensure_member_pixels(shards_root, clusters, lay.members(last), mapper)
        init = itq_init(shards_root, trunk, bits, fit_patches=cfg.train.feature_fit_patches, seed=cfg.run.seed,
                        out=d / "init.npz") if h.init == "itq" else ""
        skip = skip_pairs(pixels, clusters, trunk, d / "init.npz", h.skip_similar, seed=cfg.run.seed,
                          out=d / "similar.npz") if h.skip_similar > 0 else ""
        steps = round_steps(member_count(clusters), h.views_per_member, h.epochs, h.global_batch, h.max_steps)
        spec = TrainSpec(mode="hash", pixels_path=str(pixels), clusters_path=str(clusters), out_dir=str(d),
                         init_from=str(trunk), steps=steps, **step_recipe(cfg, h),
                         bits=bits, hash_init=str(init), alpha=h.alpha, beta=h.beta, gamma=h.gamma,
                         printed_eq2=h.printed_eq2, trunk_lr_scale=h.trunk_lr_scale, margin=h.margin,
                         negatives=h.negatives, skip_pairs=str(skip), freeze_bn=h.freeze_bn,
                         **spec_common(cfg))
        name = f"{variant}-k{bits}" if variant else f"k{bits}"
        model = fit(trainer, spec, inputs, ray_storage_of(d), name, d / "model.safetensors")
        set_feature_mean(shards_root, model, mapper)
        codes = write_codes(shards_root, model, d, mapper)
        produced = {model: None, **{p: None for p in codes}}
        if final:
            produced[export_final(model, to_dict(cfg), lay.final)] = None
            storage.copy(lay.codes(bits), lay.final_codes)
            produced[lay.final_codes] = None
        return produced

    return run.run_stage(layout.hash_stage(bits, variant), work, config=config, inputs=inputs, force=force,
                         resources=resources(cfg, h))
