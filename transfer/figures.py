"""Figures for a detection transfer run: per-class precision-recall curves, example detections, AP bars.

Each function draws on its own `matplotlib.figure.Figure` with the Agg canvas (no pyplot, so no global
state and no display needed, also inside Ray workers) and writes one PNG atomically.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from infra.storage import atomic_write_bytes
from transfer.voc_eval import RECALL_THRESHOLDS  # the metric's own recall thresholds, so the dots match its AP

_CLASS_COLORS = colormaps["tab20"]  # 20 distinct qualitative colours, one per VOC class


class FigureError(ValueError):
    """Nothing to draw, or inputs that do not line up; one-line message for the user."""


def _save(fig: Figure, path, dpi: int) -> Path:
    buf = io.BytesIO()
    FigureCanvasAgg(fig)  # attaches itself to fig
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write_bytes(path, buf.getvalue())


def interpolated_precision(recall: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """recall, precision: (D,) float -> (11,) float64, max precision at recall >= t for t = 0, 0.1, ..., 1
    (0 where no recall reaches t); their mean is the VOC07 AP."""
    recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    return np.array([precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in RECALL_THRESHOLDS])


def pr_curves(curves: dict[str, dict], ap: dict[str, float], path, *, cols: int = 5) -> Path:
    """One subplot per class with a curve and a finite AP (nan AP: no positives, skipped), in `cols` columns.

    curves[name]: {"recall": (D,) float, "precision": (D,) float}; ap[name]: float in [0, 1] or nan.
    Draws the raw curve and the 11-point interpolated precision. FigureError if no class is left.
    """
    names = [n for n in curves if math.isfinite(ap.get(n, math.nan))]
    if not names:
        raise FigureError("nothing to plot: no class has a precision-recall curve and a finite AP")
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(2.4 * cols, 2.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        rec, prec = np.asarray(curves[name]["recall"]), np.asarray(curves[name]["precision"])
        ax.plot(rec, prec, color="tab:blue", lw=1)
        ax.step(RECALL_THRESHOLDS, interpolated_precision(rec, prec), where="post", color="tab:orange",
                lw=0.8, marker="o", ms=2.5)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), title=f"{name} AP {100 * ap[name]:.1f}")
        ax.title.set_fontsize(9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_axis_off()
    for ax in axes[(rows - 1) * cols:]:
        ax.set_xlabel("recall", fontsize=8)
    for ax in axes[::cols]:
        ax.set_ylabel("precision", fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi=100)


def _draw_boxes(ax, dets, gt, class_names: tuple[str, ...], score_min: float, height: int) -> None:
    # imshow centres pixel i at i, so the inclusive box x1..x2 covers x1 - 0.5 .. x2 + 0.5
    gt_boxes, _, difficult = (np.asarray(a) for a in gt)
    for (x1, y1, x2, y2), hard in zip(gt_boxes.reshape(-1, 4), difficult.reshape(-1)):
        ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1 + 1, y2 - y1 + 1, fill=False, lw=0.8,
                               ls=":" if hard else "--", ec="0.6" if hard else "white"))
    boxes, scores, labels = (np.asarray(a) for a in dets)
    boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
    for i in np.argsort(scores, kind="stable"):  # best last, so it is drawn on top
        if scores[i] < score_min:
            continue
        (x1, y1, x2, y2), label = boxes[i], int(labels[i])
        color = _CLASS_COLORS((label - 1) % _CLASS_COLORS.N)
        ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1 + 1, y2 - y1 + 1, fill=False, lw=1.5, ec=color))
        # the label sits above the box, or inside it where there is no room above
        ax.text(x1 - 0.5, y1 - 0.5, f"{class_names[label - 1]} {scores[i]:.2f}", fontsize=6, color="black",
                va="top" if y1 < 0.05 * height else "bottom", clip_on=True,
                bbox=dict(facecolor=color, edgecolor="none", pad=1, alpha=0.85))


def detections_grid(images: list[np.ndarray], detections: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                    ground_truth: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                    class_names: tuple[str, ...], path, *, score_min: float = 0.3, cols: int = 3) -> Path:
    """Test images in a grid of `cols` columns with their detections and ground truth.

    images[i]: (H, W, 3) uint8 RGB. detections[i]: (boxes (D, 4) float x1,y1,x2,y2 inclusive pixels,
    scores (D,) float, labels (D,) int in 1..C); those with score >= score_min are drawn, coloured by class.
    ground_truth[i]: (boxes (G, 4), labels (G,) int, difficult (G,) bool): white dashed, difficult grey dotted.
    """
    if not images:
        raise FigureError("nothing to plot: no images")
    if not len(images) == len(detections) == len(ground_truth):
        raise FigureError(f"got {len(images)} images, {len(detections)} detection sets and "
                          f"{len(ground_truth)} ground-truth sets; they must match")
    rows, cols = math.ceil(len(images) / cols), min(cols, len(images))
    aspect = float(np.mean([im.shape[0] / im.shape[1] for im in images]))
    # ~330 px per image keeps six photos well under 1.5 MB of PNG
    fig = Figure(figsize=(3.3 * cols, 3.3 * aspect * rows + 0.1))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, image, dets, gt in zip(axes, images, detections, ground_truth):
        ax.imshow(image)
        _draw_boxes(ax, dets, gt, class_names, score_min, image.shape[0])
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.005, top=0.995, wspace=0.02, hspace=0.02)
    return _save(fig, path, dpi=100)


def ap_bars(ap_by_run: dict[str, dict[str, float]], path) -> Path:
    """Grouped bars of per-class AP (%) for several runs, e.g. {"pretrained": {name: ap}, "random": {...}}.

    ap values in [0, 1] or nan; a class that is nan (or missing) in every run is skipped. A run's mAP in the
    legend is its mean over its classes with a finite AP, as in voc_eval.evaluate_detections.
    """
    names = list(dict.fromkeys(n for run in ap_by_run.values() for n in run))
    names = [n for n in names if any(math.isfinite(run.get(n, math.nan)) for run in ap_by_run.values())]
    if not names:
        raise FigureError("nothing to plot: no run has a finite AP for any class")
    width = 0.8 / len(ap_by_run)
    fig = Figure(figsize=(max(6.0, 0.45 * len(names) * max(1, len(ap_by_run) / 2)), 4.0))
    ax = fig.subplots()
    x = np.arange(len(names))
    for k, (run, ap) in enumerate(ap_by_run.items()):
        values = np.array([100 * ap.get(n, math.nan) for n in names])
        finite = [v for v in ap.values() if math.isfinite(v)]
        label = f"{run} (mAP {100 * np.mean(finite):.1f})" if finite else f"{run} (mAP n/a)"
        # nan bars are left out rather than drawn as 0, which would read as a measured zero
        ok = np.isfinite(values)
        ax.bar(x[ok] - 0.4 + width * (k + 0.5), values[ok], width, label=label)
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    ax.set(xlim=(-0.6, len(names) - 0.4), ylim=(0, 100), ylabel="AP (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi=110)


def confusion_figure(conf: np.ndarray, classes: tuple[str, ...], path, *, title: str = "") -> Path:
    """conf: (C, C) counts, row = true class, column = predicted -> a row-normalised heat map with each
    class's accuracy on the diagonal (cells labelled in % when C <= 20)."""
    conf = np.asarray(conf, np.float64)
    if conf.ndim != 2 or conf.shape != (len(classes), len(classes)):
        raise FigureError(f"confusion matrix {conf.shape} does not match {len(classes)} classes")
    rows = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    n = len(classes)
    side = min(14.0, 2.5 + 0.45 * n)
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.add_subplot()
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = np.arange(n)
    labels = classes if n <= 40 else [c if i % max(1, n // 40) == 0 else "" for i, c in enumerate(classes)]
    ax.set_xticks(ticks, labels, rotation=90, fontsize=8)
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if rows[i, j] >= 0.005:
                    ax.text(j, i, f"{100 * rows[i, j]:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if rows[i, j] > 0.5 else "black")
    acc = np.trace(conf) / max(conf.sum(), 1)
    ax.set_title(f"{title + ': ' if title else ''}accuracy {100 * acc:.1f}% over {int(conf.sum())} predictions")
    fig.tight_layout()
    return _save(fig, path, dpi=110)
