"""Figures: each writes one complete PNG (no temp file left), skips what has nothing to show."""
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from transfer.figures import FigureError, ap_bars, detections_grid, interpolated_precision, pr_curves
from transfer.voc import VOC_CLASSES
from transfer.voc_eval import voc07_ap


def _png(path) -> np.ndarray:
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left behind
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _curve(rng, n=30):
    tp = rng.random(n) < 0.6
    recall = np.cumsum(tp) / max(tp.sum(), 1)
    return {"recall": recall, "precision": np.cumsum(tp) / np.arange(1, n + 1)}


def test_interpolated_precision_averages_to_voc07_ap():
    rng = np.random.default_rng(0)
    for _ in range(5):
        c = _curve(rng)
        assert np.mean(interpolated_precision(c["recall"], c["precision"])) == pytest.approx(
            voc07_ap(c["recall"], c["precision"]))
    assert interpolated_precision(np.zeros(0), np.zeros(0)).tolist() == [0.0] * 11


def _pr(tmp_path, names, nan=()):
    rng = np.random.default_rng(1)
    curves = {n: _curve(rng) for n in names}
    ap = {n: np.nan if n in nan else voc07_ap(c["recall"], c["precision"]) for n, c in curves.items()}
    ap["no_curve"] = 0.5  # an AP without a curve is not drawn either
    return _png(pr_curves(curves, ap, tmp_path / "pr.png"))


def test_pr_curves_skips_classes_without_positives(tmp_path):
    # 5 columns: 5 drawn classes fill one row, a 6th would add a second row
    five = _pr(tmp_path / "a", VOC_CLASSES[:5])
    six = _pr(tmp_path / "b", VOC_CLASSES[:6])
    with_nan = _pr(tmp_path / "c", VOC_CLASSES[:7], nan=VOC_CLASSES[5:7])
    assert six.shape[0] > five.shape[0] + 100
    assert with_nan.shape == five.shape
    assert five.shape[1] >= 1000 and five.std() > 10  # something was drawn


def test_pr_curves_with_nothing_to_plot_raises(tmp_path):
    curves = {"cat": {"recall": np.zeros(0), "precision": np.zeros(0)}}
    with pytest.raises(FigureError, match="nothing to plot"):
        pr_curves(curves, {"cat": np.nan}, tmp_path / "pr.png")
    assert not (tmp_path / "pr.png").exists()


def _dets(rng, h, w, n):
    xy = rng.uniform(0, [w / 2, h / 2], (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(20, [w / 2, h / 2], (n, 2))], 1).astype(np.float32)
    return boxes, rng.uniform(0.2, 1.0, n).astype(np.float32), rng.integers(1, 21, n)


def test_detections_grid_six_photos(tmp_path):
    rng = np.random.default_rng(0)
    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee()] * 2
    dets = [_dets(rng, *im.shape[:2], 8) for im in photos]
    dets[1] = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))  # none
    gts = [(b[:3], lab[:3], np.array([False, True, False])) for b, _, lab in
           (_dets(rng, *im.shape[:2], 3) for im in photos)]
    path = detections_grid(photos, dets, gts, VOC_CLASSES, tmp_path / "dets.png")
    png = _png(path)
    assert path.stat().st_size < 1.5e6
    assert png.shape[1] >= 900 and png.shape[0] >= 500


def test_detections_grid_draws_only_confident_detections(tmp_path):
    image = np.full((120, 160, 3), 90, np.uint8)
    box = np.array([[20, 30, 100, 90]], np.float32)
    gt = [(box, np.array([8]), np.array([False]))]

    def draw(score, name):
        dets = [(box, np.array([score], np.float32), np.array([8]))]
        return _png(detections_grid([image], dets, gt, VOC_CLASSES, tmp_path / name / "d.png"))

    none = _png(detections_grid([image], [(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int))], gt, VOC_CLASSES,
                                tmp_path / "none" / "d.png"))
    assert np.array_equal(draw(0.1, "low"), none)
    assert not np.array_equal(draw(0.9, "high"), none)


def test_detections_grid_rejects_misaligned_inputs(tmp_path):
    image = np.zeros((50, 50, 3), np.uint8)
    empty = (np.zeros((0, 4)), np.zeros(0), np.zeros(0, int))
    with pytest.raises(FigureError, match="must match"):
        detections_grid([image, image], [empty], [empty, empty], VOC_CLASSES, tmp_path / "d.png")


def test_ap_bars_skips_classes_nan_in_every_run(tmp_path):
    rng = np.random.default_rng(0)
    runs = {r: dict(zip(VOC_CLASSES, rng.uniform(0.1, 0.7, 20))) for r in ("pretrained", "random")}
    runs["random"]["cow"] = np.nan  # nan in one run only: still drawn
    full = _png(ap_bars(runs, tmp_path / "a" / "ap.png"))
    for run in runs.values():
        run["sheep"] = np.nan
    skipped = _png(ap_bars(runs, tmp_path / "b" / "ap.png"))
    del runs["pretrained"]["sheep"], runs["random"]["sheep"]
    without = _png(ap_bars(runs, tmp_path / "c" / "ap.png"))
    assert skipped.shape == without.shape != full.shape
    with pytest.raises(FigureError, match="nothing to plot"):
        ap_bars({"random": {"cat": np.nan}}, tmp_path / "d" / "ap.png")
