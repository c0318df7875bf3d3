"""The detection-transfer stages, each recorded in the run directory's manifest and skipped when done:

    data   VOC splits + proposals -> data/{train,test}.npz (transfer.data's roidb) and data/summary.json
    train  Fast R-CNN fine-tuning from conv1-5 (or random) -> detector.safetensors
    test   detections on the test split, VOC07 AP -> results.json, results.md, figures/*.png

Plain functions: the driver (transfer/voc07.py) hands in the Ray task map and the trainer.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

from infra.configlib import config_hash, to_dict
from infra import storage
from infra.layout import TransferLayout
from infra.rundir import RunDir, StageResult
from infra.session import fresh_storage
from infra.storage import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file
from transfer.config import TransferConfig
from transfer.data import RoiDB, read_roidb, write_roidb
from transfer.engine import DetectorSpec, detect, detect_all, load_detector
from transfer.figures import detections_grid, pr_curves
from transfer.proposals import compute_proposals, load_precomputed, proposal_recall
from transfer.voc import VOC_CLASSES, load_split
from transfer.voc_eval import evaluate_detections, format_table

log = logging.getLogger(__name__)


def voc_fingerprint(year_dir: Path, splits: tuple[str, ...]) -> str:
    """A hash of the splits' id lists and their annotation files' sizes and mtimes."""
    h = hashlib.sha256(str(year_dir.resolve()).encode())
    for split in splits:
        listing = year_dir / "ImageSets" / "Main" / f"{split}.txt"
        text = listing.read_text() if listing.is_file() else ""
        h.update(text.encode())
        for image_id in text.split():
            p = year_dir / "Annotations" / f"{image_id}.xml"
            st = p.stat() if p.is_file() else None
            h.update(f"{image_id}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}\n".encode())
    return h.hexdigest()[:16]


def _proposals(cfg: TransferConfig, annotations: list, map_fn: Callable) -> dict[str, np.ndarray]:
    ids = [a.image_id for a in annotations]
    p = cfg.proposals
    if p.method == "file":
        return load_precomputed(p.file, ids)
    cache = Path(p.cache_dir) if p.cache_dir else Path(cfg.run.root) / "proposals"
    settings = {"mode": p.mode, "max_side_px": p.max_side_px, "min_size_px": p.min_size_px,
                "max_boxes": p.max_boxes}
    return compute_proposals(ids, [str(a.image_path) for a in annotations], cache, settings=settings, map_fn=map_fn)


def _split_summary(annotations: list, proposals: dict[str, np.ndarray], skipped: int) -> dict:
    gt = [a.boxes[~a.difficult] for a in annotations]
    counts = [len(proposals[a.image_id]) for a in annotations]
    return {"images": len(annotations), "skipped": skipped, "objects": int(sum(len(a.boxes) for a in annotations)),
            "difficult": int(sum(a.difficult.sum() for a in annotations)),
            "proposals_per_image": float(np.mean(counts)) if counts else 0.0,
            "proposal_recall_iou50": proposal_recall([proposals[a.image_id] for a in annotations], gt)}


def data_stage(cfg: TransferConfig, run: RunDir, year_dir: Path, map_fn: Callable, force: bool = False) -> StageResult:
    """Reads both splits, computes (or loads) their proposals, writes data/{train,test}.npz."""
    d = cfg.data
    splits = (d.train_split, d.test_split)
    config = {"splits": splits, "max_images": d.max_images,
              "proposals": {k: v for k, v in to_dict(cfg.proposals).items() if k != "cache_dir"}}
    inputs = {"voc": voc_fingerprint(year_dir, splits)}
    if cfg.proposals.method == "file":
        inputs["proposals_file"] = sha256_file(cfg.proposals.file)

    def work():
        summary, out = {}, {}
        for role, split in zip(("train", "test"), splits):
            annotations, skipped = load_split(year_dir, split)
            annotations = annotations[:d.max_images] if d.max_images else annotations
            proposals = _proposals(cfg, annotations, map_fn)
            path = write_roidb(TransferLayout(run.path).roidb(role), annotations, proposals)
            summary[role] = {"split": split, **_split_summary(annotations, proposals, skipped)}
            out[path] = None
            log.info("data %s (%s): %s", role, split, json.dumps(summary[role]))
        out[atomic_write_json(TransferLayout(run.path).data_summary, summary)] = None
        return out

    return run.run_stage(TransferLayout.DATA, work, config=config, inputs=inputs, force=force)


def detector_spec(cfg: TransferConfig, run: RunDir, *, init: str, ckpt: str) -> DetectorSpec:
    m, t = cfg.model, cfg.train
    return DetectorSpec(
        roidb=str(TransferLayout(run.path).roidb("train")), out_dir=str(TransferLayout(run.path).train_dir), ckpt=ckpt,
        init=init,
        arch=m.arch, width=m.width, num_classes=len(VOC_CLASSES) + 1, fc_dim=m.fc_dim, dropout=m.dropout,
        box_regression=m.box_regression, freeze_conv1=m.freeze_conv1, fc_init_std=m.fc_init_std,
        iterations=t.iterations, lr=t.lr, lr_steps=t.lr_steps, lr_gamma=t.lr_gamma, momentum=t.momentum,
        weight_decay=t.weight_decay, images_per_batch=t.images_per_batch, rois_per_batch=t.rois_per_batch,
        fg_fraction=t.fg_fraction, fg_iou=t.fg_iou, bg_iou=t.bg_iou, flip=t.flip, scale_px=t.scale_px,
        max_size_px=t.max_size_px, loader_workers=t.loader_workers, checkpoint_every=t.checkpoint_every,
        log_every=t.log_every, seed=cfg.run.seed)


# Changing these between a killed run and its relaunch still resumes it.
RESUMABLE = ("loader_workers", "checkpoint_every", "log_every", "progress", "out_dir", "roidb")


def train_stage(cfg: TransferConfig, run: RunDir, trainer: Callable, *, init: str, ckpt: str,
                force: bool = False) -> StageResult:
    """Fine-tunes the detector -> detector.safetensors. `trainer(config, name=, storage_path=)`."""
    spec = detector_spec(cfg, run, init=init, ckpt=ckpt)
    config = {k: v for k, v in dataclasses.asdict(spec).items() if k not in RESUMABLE + ("ckpt",)}
    inputs = {"data": run.outputs_fingerprint(TransferLayout.DATA), "ckpt": sha256_file(ckpt) if ckpt else ""}
    lay = TransferLayout(run.path)

    def work():
        ckpts = lay.train_dir / "ckpt"
        fresh_storage(ckpts, config_hash({"spec": config, "inputs": inputs}))
        if not any(p.name == "model.safetensors" for p in ckpts.rglob("*")):  # a new run, not a resumed one:
            storage.remove(lay.train_metrics)  # start its log afresh
        final = trainer(dataclasses.asdict(spec), name="detector", storage_path=str(ckpts))
        out = atomic_write_bytes(lay.detector, (Path(final) / "model.safetensors").read_bytes())
        return {out: None}

    return run.run_stage(TransferLayout.TRAIN, work, config=config, inputs=inputs, force=force)


def _figures(cfg: TransferConfig, run: RunDir, model, db: RoiDB, result: dict, device, settings: dict) -> list[Path]:
    figs = TransferLayout(run.path).figures
    out = [pr_curves(result["curves"], result["ap"], figs / "pr_curves.png")]
    n = min(cfg.test.figure_images, len(db))
    if n:
        images = [db.image(i) for i in range(n)]
        dets = [detect(model, images[i], db.boxes(i), device=device, **settings) for i in range(n)]
        out.append(detections_grid(images, dets, [db.gt(i) for i in range(n)], VOC_CLASSES,
                                   figs / "detections.png"))
    return out


def test_stage(cfg: TransferConfig, run: RunDir, *, device, init: str, ckpt: str, force: bool = False) -> StageResult:
    """Detects on the test split and scores it -> results.json, results.md, figures/{pr_curves,detections}.png."""
    t = cfg.test
    settings = {"scale_px": cfg.train.scale_px, "max_size_px": cfg.train.max_size_px, "nms_iou": t.nms_iou,
                "score_thresh": t.score_thresh, "max_per_image": t.max_per_image}
    config = {**settings, "figure_images": t.figure_images}
    inputs = {"data": run.outputs_fingerprint(TransferLayout.DATA),
              "detector": run.outputs_fingerprint(TransferLayout.TRAIN)}
    lay = TransferLayout(run.path)

    def work():
        db = read_roidb(lay.roidb("test"))
        model = load_detector(lay.detector, device)
        dets, forward_s = detect_all(model, db, device=device, loader_workers=cfg.train.loader_workers, **settings)
        t0 = time.perf_counter()
        result = evaluate_detections(dets, db.ground_truth(), VOC_CLASSES)
        eval_s = time.perf_counter() - t0
        timing = {"test_images": len(db), "test_forward_s": round(forward_s, 3),
                  "test_images_per_s": round(len(db) / max(forward_s, 1e-9), 2), "eval_s": round(eval_s, 4),
                  "eval_fraction": round(eval_s / max(forward_s, 1e-9), 4), "device": str(device)}
        # a class without positives has no AP: null in JSON (NaN is not JSON)
        ap = {k: (None if np.isnan(v) else v) for k, v in result["ap"].items()}
        record = {"map": result["map"], "ap": ap, "npos": result["npos"], "init": init,
                  "ckpt": str(storage.absolute(ckpt)) if ckpt else "", "iterations": cfg.train.iterations,
                  "timing": timing}
        header = (f"# VOC07 detection ({init} init{', ' + ckpt if ckpt else ''})\n\n"
                  f"{len(db)} test images, {cfg.train.iterations} iterations; "
                  f"test {timing['test_images_per_s']} img/s, evaluation {eval_s:.3f} s\n\n")
        out = [atomic_write_json(lay.results, record),
               atomic_write_text(lay.results_md, header + format_table(result) + "\n")]
        out += _figures(cfg, run, model, db, result, device, settings)
        return {p: None for p in out}

    return run.run_stage(TransferLayout.TEST, work, config=config, inputs=inputs, force=force)
