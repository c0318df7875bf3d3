"""The classification-transfer stages, each recorded in the run directory's manifest and skipped when done:

    data      the protocol's splits -> data/index.npz (labels, the images any split uses, the splits)
    features  image-level features of those images, in parts of `features.part_images` (Ray tasks when
              the set is large) -> features/features.npy (rows in index order) and features/meta.json
    eval      per split a linear classifier and k-NN -> results.json, results.md, eval/predictions.npz,
              figures/confusion.png

Plain functions: the driver (transfer/classify.py) hands in the labelled set, the feature spec and the
task map.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import time
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from infra import storage
from infra.layout import ClassifyLayout
from infra.rundir import RunDir, StageResult
from infra.storage import atomic_write_bytes, atomic_write_json, atomic_write_npz, atomic_write_text
from transfer.classify_config import ClassifyConfig
from transfer.figures import confusion_figure
from transfer.image_features import FeatureSpec, extract_part
from transfer.labelled import LabelledSet
from transfer.probes import confusion, knn_probe, linear_probe, per_class_accuracy

log = logging.getLogger(__name__)
PROBES = ("linear", "knn")


def set_fingerprint(lset: LabelledSet) -> str:
    """A hash of the set's files (paths, sizes, mtimes) and labels: a changed set reruns every stage."""
    h = hashlib.sha256(lset.protocol.encode())
    src = lset.source
    for path in src.files or src.binaries:
        st = os.stat(path)
        h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(lset.labels.tobytes())
    return h.hexdigest()[:16]


def read_index(run: RunDir) -> dict[str, np.ndarray]:
    with storage.open_read(ClassifyLayout(run.path).data_index) as f:
        return dict(np.load(io.BytesIO(f.read()), allow_pickle=False))


def split_of(index: dict[str, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Split k as rows of features.npy (train rows, test rows)."""
    return tuple(np.searchsorted(index["used"], index[f"{part}_{k}"]) for part in ("train", "test"))


def data_stage(cfg: ClassifyConfig, run: RunDir, lset: LabelledSet, force: bool = False) -> StageResult:
    """The splits -> data/index.npz and data/summary.json."""
    d = cfg.data
    config = {"protocol": lset.protocol, "splits": len(lset.splits), "train_per_class": d.train_per_class,
              "train_fraction": d.train_fraction, "test_per_class": d.test_per_class, "split_seed": d.split_seed}
    lay = ClassifyLayout(run.path)

    def work():
        used = np.unique(np.concatenate([np.concatenate(s) for s in lset.splits]))
        arrays = {"labels": lset.labels, "used": used, "classes": np.array(lset.classes)}
        for k, (train, test) in enumerate(lset.splits):
            arrays[f"train_{k}"], arrays[f"test_{k}"] = train, test
        summary = {**lset.summary(), "used": int(len(used)), "class_names": list(lset.classes)}
        log.info("data: %d images of %d classes, %d split(s), %d used", len(lset.labels), len(lset.classes),
                 len(lset.splits), len(used))
        return {atomic_write_npz(lay.data_index, **arrays): None, atomic_write_json(lay.data_summary, summary): None}

    return run.run_stage(ClassifyLayout.DATA, work, config=config, inputs={"set": set_fingerprint(lset)},
                         force=force)


def _read_npy(path) -> np.ndarray:
    with storage.open_read(path) as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


def features_stage(cfg: ClassifyConfig, run: RunDir, lset: LabelledSet, spec: FeatureSpec, map_fn: Callable,
                   serial_fn: Callable, force: bool = False) -> StageResult:
    """Features of the used images -> features/features.npy and meta.json. `map_fn` (Ray tasks) when
    there are at least features.ray_min_images of them, else `serial_fn` (this process)."""
    f = cfg.features
    lay = ClassifyLayout(run.path)
    config = {"spec": {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("batch", "ckpt")}}
    inputs = {"data": run.outputs_fingerprint(ClassifyLayout.DATA),
              "ckpt": storage.sha256_file(spec.ckpt) if spec.ckpt else ""}

    def work():
        used = read_index(run)["used"]
        parts = [used[s : s + f.part_images] for s in range(0, len(used), f.part_images)]
        on_ray = len(used) >= f.ray_min_images
        mapper = map_fn if on_ray else serial_fn
        t0 = time.perf_counter()
        records = mapper(extract_part, [(spec, lset.source, idx, lay.feature_part(i)) for i, idx in enumerate(parts)],
                         desc=f"features ({spec.method}{'/' + spec.init if spec.method == 'trunk' else ''})",
                         num_cpus=1, num_gpus=f.gpus_per_task if on_ray else 0, max_retries=cfg.ray.task_retries)
        wall = time.perf_counter() - t0
        feats = np.concatenate([_read_npy(lay.feature_part(i)) for i in range(len(parts))])
        buf = io.BytesIO()
        np.save(buf, feats)
        out = atomic_write_bytes(lay.features, buf.getvalue())
        storage.rmtree(lay.features.parent / "parts")  # features.npy holds them now
        meta = {"rows": int(feats.shape[0]), "dim": int(feats.shape[1]), "parts": len(parts),
                "where": "ray tasks" if on_ray else "this process", "device": records[0]["device"],
                "wall_s": round(wall, 3), "images_per_s": round(len(used) / max(wall, 1e-9), 1),
                "compute_images_per_s": round(len(used) / max(sum(r["compute_s"] for r in records), 1e-9), 1),
                "decode_s": round(sum(r["decode_s"] for r in records), 3),
                "compute_s": round(sum(r["compute_s"] for r in records), 3)}
        log.info("features: %s", json.dumps(meta))
        return {out: None, atomic_write_json(lay.features_meta, meta): None}

    return run.run_stage(ClassifyLayout.FEATURES, work, config=config, inputs=inputs, force=force,
                         resources={"ray_min_images": f.ray_min_images, "gpus_per_task": f.gpus_per_task})


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def score_splits(feats: np.ndarray, labels: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]],
                 n_classes: int, cfg: ClassifyConfig) -> dict:
    """Runs both probes on every split: feats (R, D) rows, labels (R,), splits as row indices ->
    {probe: {accuracy, accuracy_std, per_split, chosen, cv_accuracy, per_class, confusion}, predictions}."""
    p = cfg.probe
    out = {name: {"per_split": [], "chosen": [], "cv_accuracy": [], "confusion": np.zeros((n_classes,) * 2, np.int64),
                  "per_class_splits": []} for name in PROBES}
    predictions = {}
    for k, (train, test) in enumerate(tqdm(splits, desc="probes", unit="split")):
        x_tr, y_tr, x_te, y_te = feats[train], labels[train], feats[test], labels[test]
        results = {
            "linear": linear_probe(x_tr, y_tr, x_te, y_te, kind=p.linear, cs=p.cs, cv_folds=p.cv_folds,
                                   max_iter=p.max_iter, seed=cfg.run.seed + k),
            "knn": knn_probe(x_tr, y_tr, x_te, y_te, ks=p.knn_k, cv_folds=p.cv_folds, seed=cfg.run.seed + k),
        }
        for name, r in results.items():
            conf = confusion(y_te, r.predictions, n_classes)
            o = out[name]
            o["per_split"].append(r.accuracy)
            o["chosen"].append(r.chosen)
            o["cv_accuracy"].append(r.cv_accuracy)
            o["confusion"] += conf
            o["per_class_splits"].append(per_class_accuracy(conf))
            predictions[f"{name}_{k}"] = r.predictions
        log.info("split %d: linear %.4f (%s), knn %.4f (%s)", k, results["linear"].accuracy,
                 results["linear"].chosen, results["knn"].accuracy, results["knn"].chosen)
    for o in out.values():
        o["accuracy"], o["accuracy_std"] = _mean_std(o["per_split"])
        with np.errstate(all="ignore"):
            o["per_class"] = np.nanmean(np.stack(o.pop("per_class_splits")), 0)
    return {**out, "predictions": predictions}


def _fmt(mean: float, std: float, n: int) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if n > 1 else f"{100 * mean:.2f}"


def format_results(record: dict) -> str:
    """results.json -> results.md: the headline table, then accuracy per class."""
    n = record["splits"]
    lines = [f"# Classification ({record['protocol']}, {record['variant']})", "",
             f"{record['images_used']} images of {len(record['classes'])} classes, {n} split(s) "
             f"(train {record['train_per_split']}, test {record['test_per_split']} images a split); "
             f"features {record['features']['dim']}-D ({record['features']['desc']}), "
             f"{record['features']['images_per_s']} images/s on {record['features']['device']}", "",
             "| probe | accuracy % (mean ± std over splits) | chosen on the training split |", "|---|---:|---|"]
    for name in PROBES:
        r = record[name]
        chosen = sorted({json.dumps(c, sort_keys=True) for c in r["chosen"]})
        lines.append(f"| {name} | {_fmt(r['accuracy'], r['accuracy_std'], n)} | {', '.join(chosen)} |")
    lines += ["", "| class | linear % | k-NN % |", "|---|---:|---:|"]
    for c in record["classes"]:
        cells = [record[name]["per_class"][c] for name in PROBES]
        lines.append(f"| {c} | " + " | ".join("n/a" if v is None else f"{100 * v:.1f}" for v in cells) + " |")
    return "\n".join(lines) + "\n"


def eval_stage(cfg: ClassifyConfig, run: RunDir, *, variant: str, spec: FeatureSpec, desc: str,
               force: bool = False) -> StageResult:
    """Both probes on every split -> results.json, results.md, eval/predictions.npz, figures/confusion.png."""
    lay = ClassifyLayout(run.path)
    config = {"probe": dataclasses.asdict(cfg.probe), "seed": cfg.run.seed}
    inputs = {"data": run.outputs_fingerprint(ClassifyLayout.DATA),
              "features": run.outputs_fingerprint(ClassifyLayout.FEATURES)}

    def work():
        index = read_index(run)
        classes = tuple(str(c) for c in index["classes"])
        feats = _read_npy(lay.features)
        labels = index["labels"][index["used"]]
        n_splits = sum(1 for k in index if k.startswith("train_"))
        scored = score_splits(feats, labels, [split_of(index, k) for k in range(n_splits)], len(classes), cfg)
        fmeta = json.loads(storage.to_path(lay.features_meta).read_text())
        record = {"protocol": str(json.loads(storage.to_path(lay.data_summary).read_text())["protocol"]),
                  "variant": variant, "classes": list(classes), "splits": n_splits,
                  "images_used": int(len(labels)),
                  "train_per_split": sorted({len(index[f"train_{k}"]) for k in range(n_splits)}),
                  "test_per_split": sorted({len(index[f"test_{k}"]) for k in range(n_splits)}),
                  "features": {**fmeta, "desc": desc, "spec": dataclasses.asdict(spec)}}
        for name in PROBES:
            s = scored[name]
            record[name] = {"accuracy": s["accuracy"], "accuracy_std": s["accuracy_std"],
                            "per_split": s["per_split"], "chosen": s["chosen"], "cv_accuracy": s["cv_accuracy"],
                            "per_class": {c: (None if np.isnan(v) else float(v)) for c, v in zip(classes, s["per_class"])},
                            "confusion": s["confusion"].tolist()}
        out = [atomic_write_json(lay.results, record), atomic_write_text(lay.results_md, format_results(record)),
               atomic_write_npz(lay.predictions, **scored["predictions"]),
               confusion_figure(scored["linear"]["confusion"], classes, lay.confusion_figure,
                                title=f"{variant}, linear")]
        return {p: None for p in out}

    return run.run_stage(ClassifyLayout.EVAL, work, config=config, inputs=inputs, force=force)
