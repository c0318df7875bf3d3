"""The cluster <-> CNN alternation (paper sec. 3.1): rounds of discriminative clustering and CNN training.

    round 0   features/round0.npy  init features (stage 1)
              clusters/round0.npz  discovery from k-means (pretrain/cluster/), then coverage
              train/round0/        the CNN trained with softmax over those clusters
    round r   features/roundR.npy  fc7 of train/round(R-1), PCA-whitened
              clusters/roundR.npz  round R-1's clusters refined on the new features: their SVMs
                                   retrained, fired, halves swapped, on a D/N split drawn afresh for
                                   the round (cluster.refine, cluster.reseed_split), then coverage
              train/roundR/        the CNN on the new clusters, from a random trunk (train.round_init
                                   scratch) or continued from train/round(R-1) (previous); with
                                   train.skip_similar, near-duplicate clusters (mean fc7 of the
                                   previous trunk) are left out of each other's softmax
    each      train/roundR/report.json  members, coverage, purity and the retrieval mAP of PCA+ITQ on
                                   the round's fc7 (labels only score); rounds.json and
                                   figures/rounds.png gather them

Every step is a stage of the run directory, so a killed run resumes inside the alternation. The
stages here map the config to the plain functions that do the work; the trainer and the mappers (Ray
Train and Ray tasks in the driver, in-process in tests) come from the caller.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from pretrain.cluster.stage import cluster_stage
from pretrain.config import Config, to_dict
from pretrain.eval.ablation import itq_scores
from pretrain.features.cnn import cnn_features
from pretrain.features.extract import extract_features
from pretrain.figures import line_plots
from infra import layout
from infra.layout import RunLayout, ray_storage_of
from infra.rundir import RunDir, StageResult
from pretrain.train.loop import TrainSpec
from pretrain.train.stage import (NOT_HASHED, ensure_member_pixels, fit, member_count, resources, round_steps,
                                  skip_pairs, spec_common, step_recipe)
from infra.storage import atomic_write_json, sha256_file
from shards.store import PatchStore

log = logging.getLogger(__name__)


def round_paths(run: RunDir, r: int) -> dict:
    lay = RunLayout(run.path)
    return {"features": lay.features(r), "clusters": lay.clusters(r), "train": lay.train_dir(r), "model": lay.model(r),
            "report": lay.report(r), "members": lay.members(r), "summary": lay.cluster_summary(r)}


def cnn_features_stage(cfg: Config, run: RunDir, shards_root: Path, round_: int, mapper: Callable,
                       force: bool = False) -> StageResult:
    """features/roundR.npy for R > 0: train/round(R-1)'s features, whitened to features.out_dim."""
    model = round_paths(run, round_ - 1)["model"]
    config = {"kind": "cnn", "layer": cfg.train.feature_layer, "out_dim": cfg.features.out_dim,
              "fit_sample_patches": cfg.train.feature_fit_patches, "seed": cfg.run.seed}
    inputs = {"model": run.outputs_fingerprint(layout.train_stage(round_ - 1))}

    def work():
        res = extract_features(shards_root, RunLayout(run.path).features_dir, kind="cnn", mapper=mapper,
                               fit_sample_patches=config["fit_sample_patches"], seed=cfg.run.seed, round_=round_,
                               model_path=str(model), model_sha256=run.output_sha256(model) or sha256_file(model),
                               layer=config["layer"],
                               out_dim=config["out_dim"])
        return {res["features"]: None, res["encoder"]: None}

    return run.run_stage(layout.features_stage(round_), work, config=config, inputs=inputs, force=force)


def train_round_stage(cfg: Config, run: RunDir, shards_root: Path, round_: int, trainer: Callable,
                      force: bool = False, mapper: Callable | None = None) -> StageResult:
    """Stage 3 for one round: the CNN trained with softmax over clusters/roundR.npz (after round 0 from
    the previous round's trunk, or from a random one with train.round_init=scratch). After round 0,
    with train.skip_similar, the previous trunk names the near-duplicate clusters, which are left out
    of each other's softmax."""
    inputs = {"clusters": run.outputs_fingerprint(layout.cluster_stage(round_))}
    continued = round_ > 0 and cfg.train.round_init == "previous"
    similar = round_ > 0 and cfg.train.skip_similar > 0
    if continued or similar:
        inputs["previous"] = run.outputs_fingerprint(layout.train_stage(round_ - 1))
    config = {k: v for k, v in to_dict(cfg.train).items() if k not in NOT_HASHED} | {"seed": cfg.run.seed}
    paths = round_paths(run, round_)

    def work():
        pixels = ensure_member_pixels(shards_root, paths["clusters"], paths["members"], mapper)
        t = cfg.train
        steps = round_steps(member_count(paths["clusters"]), t.views_per_member, t.epochs, t.global_batch,
                            t.max_steps_per_round)
        previous = round_paths(run, round_ - 1)["model"] if round_ > 0 else None
        skip = skip_pairs(pixels, paths["clusters"], previous, None, t.skip_similar, seed=cfg.run.seed,
                          out=paths["train"] / "similar.npz") if similar else ""
        spec = TrainSpec(mode="cluster", pixels_path=str(pixels), clusters_path=str(paths["clusters"]),
                         out_dir=str(paths["train"]), init_from=str(previous) if continued else "", steps=steps,
                         **step_recipe(cfg, t), skip_pairs=str(skip),
                         **spec_common(cfg))
        out = fit(trainer, spec, inputs, ray_storage_of(paths["train"]), f"round{round_}", paths["model"])
        return {out: None}

    return run.run_stage(layout.train_stage(round_), work, config=config, inputs=inputs, force=force,
                         resources=resources(cfg, cfg.train))


def round_report_stage(cfg: Config, run: RunDir, shards_root: Path, round_: int, force: bool = False) -> StageResult:
    """What a round made: its clusters' members, coverage and purity, and (with labels, which only
    score) the retrieval mAP of PCA+ITQ at eval.round_bits on the round's fc7 of a seeded sample."""
    paths = round_paths(run, round_)
    inputs = {"clusters": run.outputs_fingerprint(layout.cluster_stage(round_)),
              "model": run.outputs_fingerprint(layout.train_stage(round_))}
    e = cfg.eval
    config = {"round_bits": e.round_bits, "round_patches": e.round_patches, "queries_per_class": e.queries_per_class,
              "repeats": e.repeats, "precision_at": list(e.precision_at), "seed": cfg.run.seed}

    def work():
        summary = json.loads(paths["summary"].read_text())
        report = {"round": round_, **{k: summary[k] for k in ("clusters", "members", "coverage", "purity", "nmi")
                                      if k in summary}}
        store = PatchStore(shards_root)
        labels = store.labels(np.arange(len(store)))
        rows = np.flatnonzero(labels >= 0)
        if len(rows):
            rng = np.random.default_rng(cfg.run.seed)
            rows = np.sort(rng.permutation(rows)[: e.round_patches])
            model = paths["model"]
            feats = cnn_features(store.get(rows), model_path=str(model), layer="fc7",
                                 model_sha256=run.output_sha256(model) or sha256_file(model))
            bits = min(e.round_bits, feats.shape[1])
            found = itq_scores(feats, feats, labels[rows], (bits,), seed=cfg.run.seed,
                               queries_per_class=e.queries_per_class, repeats=e.repeats,
                               precision_at=e.precision_at)[bits]
            report |= {"itq_bits": e.round_bits, "itq_map": found["map"], "itq_map_std": found["map_std"],
                       "itq_patches": len(rows)}
        atomic_write_json(paths["report"], report)
        return {paths["report"]: None}

    return run.run_stage(layout.report_stage(round_), work, config=config, inputs=inputs, force=force)


def alternate(cfg: Config, run: RunDir, shards_root: Path, *, trainer: Callable, cluster_map: Callable,
              task_map: Callable, log_stage: Callable, force: list[str] = ()) -> list[dict]:
    """Runs (or resumes) every round -> their reports, also written to rounds.json and drawn in
    figures/rounds.png. log_stage(result, metrics_path or None, prefix) forwards each stage to the tracker."""
    reports = []
    for r in range(cfg.train.rounds):
        if r > 0:
            log_stage(cnn_features_stage(cfg, run, shards_root, r, task_map, force="features" in force), None, "")
        start = layout.cluster_stage(r - 1) if r > 0 and cfg.cluster.refine and cfg.cluster.method == "discover" else None
        log_stage(cluster_stage(cfg, run, shards_root, cluster_map, round_=r, start_stage=start,
                                features_stage=layout.features_stage(r),
                                force="cluster" in force), None, layout.cluster_stage(r))
        result = train_round_stage(cfg, run, shards_root, r, trainer, force="train" in force, mapper=task_map)
        log_stage(result, round_paths(run, r)["train"] / "metrics.jsonl", layout.train_stage(r))
        log_stage(round_report_stage(cfg, run, shards_root, r, force="train" in force), None, "")
        reports.append(json.loads(round_paths(run, r)["report"].read_text()))
        log.info("round %d: %s", r, ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in reports[-1].items() if k != "round"))
    lay = RunLayout(run.path)
    atomic_write_json(lay.rounds, {"rounds": reports, "config": to_dict(cfg.cluster)})
    series = {k: [rep.get(k) for rep in reports] for k in ("members", "coverage", "purity", "itq_map")}
    line_plots(lay.figure("rounds"), {k: v for k, v in series.items() if None not in v},
               xlabel="round", title="cluster <-> CNN rounds")
    return reports
