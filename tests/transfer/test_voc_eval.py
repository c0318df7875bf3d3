"""VOC07 AP against hand-computed PR curves; the vectorised matcher against a loop copy of VOCevaldet.m."""
import math

import numpy as np
import pytest

from transfer.voc import Annotation
from transfer.voc_eval import eval_class, evaluate_detections, format_table, voc07_ap


def D(*rows):
    """Detections (K, 5): x1, y1, x2, y2, score."""
    return np.array(rows, np.float32).reshape(-1, 5)


def B(*rows):
    return np.array(rows, np.float32).reshape(-1, 4)


def F(*flags):
    return np.array(flags, bool)


def test_duplicate_and_miss():
    # 3 positives: image 0 has g0 = [0,0,9,9], g1 = [20,20,29,29]; image 1 has g2 = [0,0,9,9].
    # ranked: 0.9 on g0 TP | 0.8 on g0 again FP (duplicate) | 0.7 on g2 TP | 0.6 on nothing FP | 0.5 on g1 TP
    # cum tp 1 1 2 2 3, cum fp 0 1 1 2 2 -> recall 1/3 1/3 2/3 2/3 1, precision 1 1/2 2/3 1/2 3/5
    # 11-point: t = 0, .1, .2, .3 -> 1 (recall 1/3 reaches .3); t = .4, .5, .6 -> max(2/3, 1/2, 3/5) = 2/3;
    # t = .7 .. 1 -> 3/5. AP = (4 * 1 + 3 * 2/3 + 4 * 3/5) / 11 = 8.4 / 11
    dets = [D([20, 20, 29, 29, .5], [0, 0, 9, 9, .8], [0, 0, 9, 9, .9]),  # input order is not rank order
            D([50, 50, 59, 59, .6], [0, 0, 9, 9, .7])]
    r = eval_class(dets, [B([0, 0, 9, 9], [20, 20, 29, 29]), B([0, 0, 9, 9])], [F(0, 0), F(0)])
    assert r["npos"] == 3
    np.testing.assert_allclose(r["recall"], [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
    np.testing.assert_allclose(r["precision"], [1, 1 / 2, 2 / 3, 1 / 2, 3 / 5])
    assert r["ap"] == pytest.approx(8.4 / 11, abs=1e-12)


def test_difficult_match_is_ignored_not_false_positive():
    # image 0: a = [0,0,9,9], b = [30,30,39,39] difficult. npos = 1 (b not counted).
    # ranked: 0.9 on b ignored | 0.8 on a TP | 0.7 on nothing FP | 0.6 on b again ignored (not a duplicate FP)
    # counted detections: TP, FP -> recall 1 1, precision 1 1/2 -> AP 1.
    # (Were b's matches FPs: precision 0 1/2 1/3 1/4 -> AP 1/2; were b a positive: recall <= 1/2.)
    dets = [D([30, 30, 39, 39, .9], [0, 0, 9, 9, .8], [60, 60, 69, 69, .7], [30, 30, 39, 39, .6])]
    r = eval_class(dets, [B([0, 0, 9, 9], [30, 30, 39, 39])], [F(0, 1)])
    assert r["npos"] == 1
    np.testing.assert_allclose(r["recall"], [1, 1])
    np.testing.assert_allclose(r["precision"], [1, 1 / 2])
    assert r["ap"] == 1.0


def test_iou_exactly_at_threshold_is_not_a_match():
    gt = [B([0, 0, 9, 9])]  # 10 x 10 = 100 pixels
    # [0,0,9,19]: 10 x 20 = 200 pixels, intersection 100 -> IoU 100 / 200 = 0.5, not > 0.5 -> FP
    assert eval_class([D([0, 0, 9, 19, 1])], gt, [F(0)])["ap"] == 0.0
    # [0,0,9,18]: 190 pixels -> IoU 100 / 190 = 0.526 -> TP. (Without the +1 convention it would be
    # 81 / (81 + 162 - 81) = 0.5 exactly: not a match.)
    assert eval_class([D([0, 0, 9, 18, 1])], gt, [F(0)])["ap"] == 1.0
    assert eval_class([D([0, 0, 9, 18, 1])], gt, [F(0)], iou_thresh=0.6)["ap"] == 0.0


def test_tied_overlap_goes_to_the_first_box_even_if_taken():
    # two identical boxes in one image: the devkit's argmax takes the first one for both detections, so the
    # second is a duplicate FP, not a match of the other box: recall 1/2 1/2, precision 1 1/2
    # -> t = 0 .. .5 (6 thresholds): 1 -> AP 6/11
    r = eval_class([D([0, 0, 9, 9, .9], [0, 0, 9, 9, .8])], [B([0, 0, 9, 9], [0, 0, 9, 9])], [F(0, 0)])
    np.testing.assert_allclose(r["recall"], [.5, .5])
    assert r["ap"] == pytest.approx(6 / 11, abs=1e-12)


def test_recall_thresholds_are_matlabs_0_to_1_step_0_1():
    # MATLAB's 0:0.1:1 holds 0.1 * 3 = 0.30000000000000004 (> 3/10) but 1 - 0.1 * 4 = 0.6 (== 3/5).
    # 10 positives, 3 found first: recall .1 .2 .3 at precision 1 -> thresholds 0, .1, .2 reached -> 3/11
    gt = [B([0, 0, 9, 9]) for _ in range(10)]
    dets = [D([0, 0, 9, 9, 1]) if i < 3 else D() for i in range(10)]
    assert eval_class(dets, gt, [F(0)] * 10)["ap"] == pytest.approx(3 / 11, abs=1e-12)
    # 5 positives, 3 found: recall .2 .4 .6 -> thresholds 0 .. .6 reached -> 7/11
    assert eval_class(dets[:5], gt[:5], [F(0)] * 5)["ap"] == pytest.approx(7 / 11, abs=1e-12)


def test_perfect_none_and_no_positives():
    gt, diff = [B([0, 0, 9, 9], [20, 0, 29, 9]), B([5, 5, 40, 40])], [F(0, 0), F(0)]
    perfect = [D([0, 0, 9, 9, .3], [20, 0, 29, 9, .9]), D([5, 5, 40, 40, .5])]
    r = eval_class(perfect, gt, diff)
    assert r["ap"] == 1.0 and r["npos"] == 3 and r["recall"][-1] == 1.0
    r = eval_class([D(), np.zeros((0,))], gt, diff)
    assert r["ap"] == 0.0 and len(r["recall"]) == 0 and r["npos"] == 3
    r = eval_class(perfect, [B(), B([5, 5, 40, 40])], [F(), F(1)])  # only a difficult box: no positives
    assert math.isnan(r["ap"]) and r["npos"] == 0
    assert voc07_ap([], []) == 0.0


def _ann(boxes, labels, difficult):
    return Annotation(image_id="x", image_path=None, width=100, height=100, boxes=B(*boxes),
                      labels=np.array(labels, np.int64), difficult=F(*difficult))


def test_evaluate_detections_map_skips_classes_without_positives():
    names = ("cat", "dog", "cow")
    anns = [_ann([[0, 0, 9, 9], [20, 20, 29, 29]], [1, 2], [0, 0]), _ann([[0, 0, 9, 9]], [2], [0])]
    dets = {1: [D([0, 0, 9, 9, .9]), D([0, 0, 9, 9, .8])],  # cat: TP then FP -> AP 1
            2: [D([20, 20, 29, 29, .4]), D([50, 50, 60, 60, .9])],  # dog: FP then TP, 2 positives:
            # recall 0 1/2, precision 0 1/2 -> t <= .5 : 1/2 -> 6 * 0.5 / 11 = 3/11
            3: [D([0, 0, 9, 9, .9]), D()]}  # cow: no positives -> nan, not in mAP
    r = evaluate_detections(dets, anns, names)
    assert r["npos"] == {"cat": 1, "dog": 2, "cow": 0}
    assert r["ap"]["cat"] == 1.0 and r["ap"]["dog"] == pytest.approx(3 / 11) and math.isnan(r["ap"]["cow"])
    assert r["map"] == pytest.approx((1 + 3 / 11) / 2)
    np.testing.assert_allclose(r["curves"]["dog"]["precision"], [0, .5])
    table = format_table(r)
    assert "| cat | 1 | 100.0 |" in table and "| dog | 2 | 27.3 |" in table and "| cow | 0 | n/a |" in table
    assert table.splitlines()[-1] == "| **mAP** | 3 | 63.6 |"
    with pytest.raises(ValueError, match=r"classes \[3\]"):
        evaluate_detections({1: dets[1], 2: dets[2]}, anns, names)
    with pytest.raises(ValueError, match="1 detection lists for 2 images"):
        evaluate_detections({**dets, 2: dets[2][:1]}, anns, names)
    with pytest.raises(ValueError, match="expected a"):
        evaluate_detections({**dets, 1: [B([0, 0, 9, 9]), D()]}, anns, names)


# ---- reference: VOCevaldet.m transcribed one detection at a time ----
MATLAB_T = [0.0, 0.1, 0.2, 0.30000000000000004, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # what 0:0.1:1 holds


def slow_eval(dets, gts, diffs, thresh):
    """-> (ap, recall, precision over non-ignored detections), with plain Python loops."""
    flat = [(float(row[4]), i, [float(v) for v in row[:4]]) for i, d in enumerate(dets) for row in d]
    ranked = sorted(flat, key=lambda x: -x[0])  # stable, like MATLAB's sort
    taken = [[False] * len(g) for g in gts]
    npos = sum(not x for d in diffs for x in d)
    tp, fp = [], []
    for _, i, bb in ranked:
        ovmax, jmax = -math.inf, None
        for j, g in enumerate(gts[i]):
            iw = min(bb[2], g[2]) - max(bb[0], g[0]) + 1
            ih = min(bb[3], g[3]) - max(bb[1], g[1]) + 1
            if iw > 0 and ih > 0:
                ua = ((bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (g[2] - g[0] + 1) * (g[3] - g[1] + 1)
                      - iw * ih)
                if iw * ih / ua > ovmax:
                    ovmax, jmax = iw * ih / ua, j
        if ovmax > thresh and diffs[i][jmax]:
            tp.append(0), fp.append(0)
        elif ovmax > thresh and not taken[i][jmax]:
            taken[i][jmax] = True
            tp.append(1), fp.append(0)
        else:
            tp.append(0), fp.append(1)
    ctp, cfp = np.cumsum(tp, dtype=float), np.cumsum(fp, dtype=float)
    rec = ctp / npos
    with np.errstate(invalid="ignore"):
        prec = ctp / (ctp + cfp)
    ap = 0.0
    for t in MATLAB_T:
        p = [pr for pr, r in zip(prec, rec) if r >= t and not math.isnan(pr)]  # MATLAB's max skips NaN
        ap += (max(p) if p else 0.0) / 11
    kept = (np.array(tp) + np.array(fp)) > 0
    return ap, rec[kept], prec[kept]


def random_case(rng, n_images=25):
    gts, diffs, dets = [], [], []
    for _ in range(n_images):
        g = rng.integers(0, 60, (rng.integers(0, 5), 2))
        g = np.concatenate([g, g + rng.integers(2, 40, g.shape)], 1).astype(np.float32)
        if len(g) > 1 and rng.random() < 0.2:
            g[1] = g[0]  # duplicated ground truth
        on_gt = g[rng.integers(0, len(g), rng.integers(0, 6))] if len(g) else np.zeros((0, 4), np.float32)
        jitter = on_gt + rng.integers(-4, 5, on_gt.shape)
        noise = rng.integers(0, 60, (rng.integers(0, 4), 2))
        noise = np.concatenate([noise, noise + rng.integers(2, 40, noise.shape)], 1)
        boxes = np.concatenate([on_gt, jitter, noise]).astype(np.float32)
        scores = rng.integers(0, 8, len(boxes)) / 8  # coarse scores: many ties across images
        gts.append(g)
        diffs.append(rng.random(len(g)) < 0.25)
        dets.append(np.concatenate([boxes, scores[:, None]], 1).astype(np.float32))
    return dets, gts, diffs


@pytest.mark.parametrize("seed", range(40))
def test_matches_the_devkit_loop(seed):
    rng = np.random.default_rng(seed)
    dets, gts, diffs = random_case(rng)
    thresh = (0.5, 0.3, 0.7)[seed % 3]
    r = eval_class(dets, gts, diffs, iou_thresh=thresh)
    if r["npos"] == 0:
        assert math.isnan(r["ap"])
        return
    ap, rec, prec = slow_eval(dets, gts, diffs, thresh)
    assert r["ap"] == pytest.approx(ap, abs=1e-15)  # the devkit's running sum of p/11 rounds differently
    np.testing.assert_array_equal(r["recall"], rec)
    np.testing.assert_array_equal(r["precision"], prec)


def test_evaluate_detections_agrees_with_eval_class():
    rng = np.random.default_rng(7)
    dets, gts, diffs = random_case(rng, n_images=30)
    labels = [rng.integers(1, 4, len(g)) for g in gts]
    anns = [Annotation("x", None, 100, 100, g, lab, d) for g, lab, d in zip(gts, labels, diffs)]
    det_labels = [rng.integers(1, 4, len(d)) for d in dets]
    per_class = {c: [d[lab == c] for d, lab in zip(dets, det_labels)] for c in (1, 2, 3)}
    r = evaluate_detections(per_class, anns, ("a", "b", "c"))
    for c, name in enumerate(("a", "b", "c"), 1):
        one = eval_class(per_class[c], [g[lab == c] for g, lab in zip(gts, labels)],
                         [d[lab == c] for d, lab in zip(diffs, labels)])
        assert one["npos"] == r["npos"][name]
        assert one["ap"] == r["ap"][name] or (math.isnan(one["ap"]) and math.isnan(r["ap"][name]))
        ref = slow_eval(per_class[c], [g[lab == c] for g, lab in zip(gts, labels)],
                        [d[lab == c] for d, lab in zip(diffs, labels)], 0.5)[0]
        assert r["ap"][name] == pytest.approx(ref, abs=1e-15, nan_ok=True)
