"""PASCAL VOC 2007 detection metric (per-class 11-point interpolated AP and their mean) as plain numpy.

Follows the official devkit's VOCevaldet.m: a class's detections from all images are ranked by descending
score; each takes the ground truth of its image with the highest IoU (+1 pixel convention); IoU > threshold
on a `difficult` box is ignored, on a box not yet taken is a true positive, on a taken one a false positive
(duplicate); anything else is a false positive. Difficult boxes are not counted as positives.
The greedy matching only interacts within an image, so it is done for all images at once on the list of
(detection, ground truth of the same image) pairs instead of in a Python loop.
"""
from __future__ import annotations

import numpy as np

from transfer.voc import VOC_CLASSES

# The devkit's recall thresholds are MATLAB's 0:0.1:1, which builds its first half as k*0.1 and its second
# half as 1 - (10-k)*0.1: t=0.3 is 0.30000000000000004 (a recall of exactly 3/10 does not reach it) while
# t=0.6, 0.7 are the doubles nearest 0.6, 0.7 (np.arange's 0.6000000000000001 would miss a recall of 3/5).
RECALL_THRESHOLDS = tuple(0.1 * k if 2 * k <= 10 else 1 - 0.1 * (10 - k) for k in range(11))


def voc07_ap(recall, precision) -> float:
    """recall, precision: (D,) float -> mean over t in 0, 0.1, ..., 1 of max(precision[recall >= t])
    (0 where no recall reaches t)."""
    recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    best = [precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in RECALL_THRESHOLDS]
    # The devkit adds p/11 eleven times; summing first differs only in the last bit and keeps a perfect
    # detector at exactly 1 (eleven 1/11 add up to 1.0000000000000002).
    return float(sum(best) / 11)


def _area(b: np.ndarray) -> np.ndarray:
    return (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)


def _pair_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a, b: (P, 4) float64 inclusive boxes -> (P,) IoU of a[i] with b[i]; 0 where they do not overlap."""
    iw = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]) + 1
    ih = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]) + 1
    overlap = (iw > 0) & (ih > 0)
    inter = iw * ih
    return np.where(overlap, inter / np.where(overlap, _area(a) + _area(b) - inter, 1.0), 0.0)


def _match(boxes, img, gt_boxes, gt_start, gt_count, gt_difficult, iou_thresh):
    """boxes: (D, 4) detections in rank order, img: (D,) their image; gt_boxes (G, 4), gt_difficult (G,)
    grouped by image, image i owning rows gt_start[i]:gt_start[i] + gt_count[i] -> tp, ignored: (D,) bool."""
    d = len(boxes)
    n_gt = gt_count[img]
    first_pair = np.cumsum(n_gt) - n_gt
    pair_det = np.repeat(np.arange(d), n_gt)  # (P,) one entry per (detection, ground truth of its image)
    pair_gt = np.repeat(gt_start[img] - first_pair, n_gt) + np.arange(len(pair_det))
    tp, ignored = np.zeros(d, bool), np.zeros(d, bool)
    if not len(pair_det):
        return tp, ignored
    iou = _pair_iou(boxes[pair_det], gt_boxes[pair_gt])
    has = n_gt > 0
    ovmax = np.full(d, -np.inf)
    ovmax[has] = np.maximum.reduceat(iou, first_pair[has])
    # the devkit's loop updates on a strictly larger IoU, so ties go to the first ground truth of the image
    best = np.flatnonzero(iou == ovmax[pair_det])
    best = best[np.r_[True, pair_det[best[1:]] != pair_det[best[:-1]]]]
    jmax = np.zeros(d, np.int64)
    jmax[pair_det[best]] = pair_gt[best]
    hit = ovmax > iou_thresh
    ignored[hit] = gt_difficult[jmax[hit]]
    cand = np.flatnonzero(hit & ~ignored)
    # a box's first (highest-ranked) claimant is its true positive; later ones are duplicates: false positives
    _, first = np.unique(jmax[cand], return_index=True)
    tp[cand[first]] = True
    return tp, ignored


def _eval_flat(det, det_img, gt_boxes, gt_difficult, gt_count, iou_thresh) -> dict:
    """det: (D, 5) float64 x1, y1, x2, y2, score, det_img: (D,); ground truth grouped by image (gt_count)."""
    npos = int(np.count_nonzero(~gt_difficult))
    order = np.argsort(-det[:, 4], kind="stable")  # MATLAB's sort is stable too: ties keep image order
    gt_start = np.cumsum(gt_count) - gt_count
    tp, ignored = _match(det[order, :4], det_img[order], gt_boxes, gt_start, gt_count, gt_difficult,
                         iou_thresh)
    # The devkit keeps detections of difficult boxes as entries with tp = fp = 0. Each repeats the previous
    # (recall, precision) point, or, before the first counted detection, is recall 0 with precision
    # 0/0 = NaN, which MATLAB's max() skips. Dropping them leaves the 11-point AP identical and gives curves
    # with one point per counted detection. (Only if EVERY detection is ignored is the devkit's AP NaN;
    # ours is 0, as in py-faster-rcnn.)
    tp = tp[~ignored]
    ctp = np.cumsum(tp, dtype=np.float64)
    precision = ctp / np.arange(1, len(tp) + 1)  # tp / (tp + fp): a counted detection is one or the other
    if npos == 0:
        return {"recall": np.full(len(tp), np.nan), "precision": precision, "ap": float("nan"), "npos": 0}
    recall = ctp / npos
    return {"recall": recall, "precision": precision, "ap": voc07_ap(recall, precision), "npos": npos}


def _stack(arrays, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (K_i, cols) arrays -> ((sum K_i, cols) float64, (sum K_i,) int64 image index)."""
    out = []
    for i, a in enumerate(arrays):
        a = np.asarray(a, np.float64)
        if a.size == 0:
            a = a.reshape(0, cols)
        if a.ndim != 2 or a.shape[1] != cols:
            raise ValueError(f"image {i}: expected a (K, {cols}) array, got shape {a.shape}")
        out.append(a)
    counts = np.array([len(a) for a in out], np.int64)
    flat = np.concatenate(out) if out else np.zeros((0, cols))
    return flat, np.repeat(np.arange(len(out)), counts)


def _flags(arrays, dtype) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype).reshape(-1) for a in arrays] or [np.zeros(0, dtype)])


def eval_class(dets, gt_boxes, gt_difficult, iou_thresh: float = 0.5) -> dict:
    """One class over n images. dets[i]: (K, 5) float x1, y1, x2, y2, score; gt_boxes[i]: (G, 4);
    gt_difficult[i]: (G,) bool -> {"recall", "precision": (D',) float64 over the D' detections not ignored,
    "ap": float (nan if npos == 0), "npos": int (number of non-difficult boxes)}."""
    if not len(dets) == len(gt_boxes) == len(gt_difficult):
        raise ValueError(f"{len(dets)} detection lists for {len(gt_boxes)} ground-truth lists")
    det, det_img = _stack(dets, 5)
    gt, gt_img = _stack(gt_boxes, 4)
    difficult = _flags(gt_difficult, bool)
    if len(difficult) != len(gt):
        raise ValueError(f"{len(gt)} ground-truth boxes but {len(difficult)} difficult flags")
    return _eval_flat(det, det_img, gt, difficult, np.bincount(gt_img, minlength=len(dets)), iou_thresh)


def evaluate_detections(detections: dict, annotations: list, class_names=VOC_CLASSES,
                        iou_thresh: float = 0.5) -> dict:
    """detections[c] for c in 1..len(class_names): list aligned with `annotations` of (K, 5) x1, y1, x2, y2,
    score. annotations: objects with boxes (N, 4), labels (N,) in 1..C, difficult (N,) (transfer.voc's).
    -> {"ap": {name: float | nan}, "map": float (mean over classes with npos > 0), "npos": {name: int},
        "curves": {name: {"recall": ndarray, "precision": ndarray}}}"""
    n = len(annotations)
    gt, gt_img = _stack([a.boxes for a in annotations], 4)
    labels = _flags([a.labels for a in annotations], np.int64)
    difficult = _flags([a.difficult for a in annotations], bool)
    if not len(labels) == len(difficult) == len(gt):
        raise ValueError(f"annotations hold {len(gt)} boxes, {len(labels)} labels, {len(difficult)} flags")
    missing = [c for c in range(1, len(class_names) + 1) if c not in detections]
    if missing:
        raise ValueError(f"no detections given for classes {missing}")
    result = {"ap": {}, "npos": {}, "curves": {}}
    for c, name in enumerate(class_names, start=1):
        if len(detections[c]) != n:
            raise ValueError(f"class {name}: {len(detections[c])} detection lists for {n} images")
        det, det_img = _stack(detections[c], 5)
        mine = labels == c
        r = _eval_flat(det, det_img, gt[mine], difficult[mine], np.bincount(gt_img[mine], minlength=n),
                       iou_thresh)
        result["ap"][name], result["npos"][name] = r["ap"], r["npos"]
        result["curves"][name] = {"recall": r["recall"], "precision": r["precision"]}
    scored = [ap for name, ap in result["ap"].items() if result["npos"][name] > 0]
    result["map"] = float(np.mean(scored)) if scored else float("nan")
    return result


def _percent(ap: float) -> str:
    return "n/a" if np.isnan(ap) else f"{100 * ap:.1f}"


def format_table(result: dict) -> str:
    """evaluate_detections' result -> markdown table: class | npos | AP (%), then the mAP row."""
    rows = ["| class | npos | AP (%) |", "|---|---:|---:|"]
    rows += [f"| {name} | {result['npos'][name]} | {_percent(ap)} |" for name, ap in result["ap"].items()]
    rows.append(f"| **mAP** | {sum(result['npos'].values())} | {_percent(result['map'])} |")
    return "\n".join(rows)
