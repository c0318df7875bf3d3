"""The pipeline's stages as run-directory steps: config -> explicit arguments -> artifacts.

Each function maps its config section to the plain functions that do the work and records the
stage in the manifest. Parallel work goes through `mapper` (Ray tasks in the driver, in-process in
tests), so nothing here imports Ray.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from pretrain.config import Config, ConfigError, to_dict
from pretrain.features.extract import extract_features
from pretrain.figures import grid, save_png
from pretrain.models.alexnet import ARCHS
from infra import layout, storage
from infra.layout import RunLayout
from infra.rundir import RunDir, StageResult
from shards.build import build_shards
from infra.storage import sha256_file
from shards.shardset import FORMAT, SHARDS_JSON, ShardSet
from shards.sources import Listing, list_items, source_fingerprint
from shards.store import PatchStore
from shards.writer import PatchParams


def patch_params(cfg: Config) -> PatchParams:
    d = cfg.data
    return PatchParams(
        patch_px=d.patch_size_px, patches_per_image=d.patches_per_image, scale_range=d.scale_range,
        patches_per_record=d.patches_per_record, jpeg_quality=d.jpeg_quality, seed=cfg.run.seed,
    )


def check_data(cfg: Config) -> Listing | ShardSet:
    """Fails fast (SourceError, ShardError, ConfigError) on a missing source or bad patch settings,
    before Ray starts or anything is written. Returns the source listing or the prebuilt shards."""
    arch_px = ARCHS[cfg.train.arch].input_px
    if cfg.data.patch_size_px != arch_px:  # the trunk is built for one input size
        raise ConfigError(f"train.arch {cfg.train.arch} takes {arch_px}px patches but data.patch_size_px is "
                          f"{cfg.data.patch_size_px}")
    if cfg.data.shards_dir:
        storage.check_location(cfg.data.shards_dir, what="data.shards_dir")
        shards = ShardSet.open(storage.absolute(cfg.data.shards_dir))
        if shards.patch_px != cfg.data.patch_size_px:
            raise ConfigError(f"data.shards_dir holds {shards.patch_px}px patches but data.patch_size_px is "
                              f"{cfg.data.patch_size_px}")
        return shards
    try:
        patch_params(cfg)
    except ValueError as exc:
        raise ConfigError(f"data: {exc}") from None
    return list_items(cfg.data.source, cfg.data.kind)


def shard_stage(cfg: Config, run: RunDir, data: Listing | ShardSet, mapper: Callable,
                force: bool = False) -> StageResult:
    """Stage 0: builds `<run>/shards/` from the source (or records prebuilt shards)."""
    if isinstance(data, ShardSet):  # built beforehand: nothing to write, only to record
        inputs = {"shards": sha256_file(data.root / SHARDS_JSON)}
        return run.run_stage(layout.SHARD, lambda: {}, config={"shards_dir": str(data.root)}, inputs=inputs,
                             force=force)

    out = RunLayout(run.path).shards
    # the shard format is part of the record: shards of an older format are built again on a rerun
    config = to_dict(cfg.data) | {"seed": cfg.run.seed, "format": FORMAT}
    inputs = {"source": source_fingerprint(data)}

    def build():
        index = build_shards(data, out, patch_params(cfg), images_per_shard=cfg.data.images_per_shard,
                             mapper=mapper)
        produced = {out / e["name"]: e["sha256"] for e in index["shards"]}
        produced[out / SHARDS_JSON] = None
        return produced

    return run.run_stage(layout.SHARD, build, config=config, inputs=inputs, force=force)


def features_settings(cfg: Config) -> dict:
    """The features config as extract_features arguments."""
    f = cfg.features
    if f.kind == "hog":
        return {"kind": "hog", "cell_px": f.hog_cell_px, "out_dim": f.out_dim}
    return {"kind": "fv", "step_px": f.sift_step_px, "bin_px": f.sift_bin_px, "desc_pca_dim": f.desc_pca_dim,
            "gmm_components": f.gmm_components, "out_dim": f.out_dim}


def features_stage(cfg: Config, run: RunDir, mapper: Callable, force: bool = False) -> StageResult:
    """Stage 1: `<run>/features/round0.npy` (init features of every patch) and `encoder.npz`."""
    config = features_settings(cfg) | {"fit_sample_patches": cfg.features.fit_sample_patches,
                                       "seed": cfg.run.seed}
    inputs = {"shards": run.outputs_fingerprint(layout.SHARD)}
    out = RunLayout(run.path).features_dir

    def work():
        try:
            res = extract_features(shards_root(cfg, run), out, mapper=mapper, **config)
        except ValueError as exc:  # settings the patches cannot take (e.g. HOG cells larger than a patch)
            raise ConfigError(f"features: {exc}") from None
        return {res["features"]: None, res["encoder"]: None}

    return run.run_stage(layout.features_stage(0), work, config=config, inputs=inputs, force=force)


def shards_root(cfg: Config, run: RunDir):
    """Where the patch shards of this run live (a path or URI)."""
    return storage.absolute(cfg.data.shards_dir) if cfg.data.shards_dir else RunLayout(run.path).shards


def patch_preview(shards, out, n: int = 64, seed: int = 0):
    """A grid of `n` random patches from the shards, as PNG (what the clustering will see)."""
    store = PatchStore(shards.root if isinstance(shards, ShardSet) else shards)
    pick = np.sort(np.random.default_rng(seed).choice(len(store), size=min(n, len(store)), replace=False))
    return save_png(out, grid(store.get(pick), cols=8))
