"""Fast R-CNN data: proposals rescaled and mirrored with the image, RoI sampling, batch order."""
import numpy as np
import torch
from PIL import Image

from pretrain.models.inputs import MEAN, STD
from transfer.data import (BatchOrder, TrainImages, collate, prepare_image, read_roidb, sample_rois, usable_images,
                           write_roidb)
from transfer.voc import Annotation


def _scene(tmp_path, name="a", size=(150, 200), rect=(40, 30, 109, 79)):
    """A gray image with one red rectangle (inclusive pixel box x1, y1, x2, y2) -> its Annotation."""
    img = np.full((*size, 3), 128, np.uint8)
    x1, y1, x2, y2 = rect
    img[y1:y2 + 1, x1:x2 + 1] = (255, 0, 0)
    path = tmp_path / f"{name}.png"
    Image.fromarray(img).save(path)
    return Annotation(image_id=name, image_path=path, width=size[1], height=size[0],
                      boxes=np.array([rect], np.float32), labels=np.array([8], np.int64),
                      difficult=np.array([False]))


def _red_bbox(image: torch.Tensor) -> tuple[int, int, int, int]:
    """The inclusive bbox of the red pixels of a normalised (3, h, w) image."""
    rgb = image * STD + MEAN
    ys, xs = torch.nonzero((rgb[0] > 0.8) & (rgb[1] < 0.2), as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def test_proposals_are_rescaled_and_mirrored_with_the_image(tmp_path):
    ann = _scene(tmp_path)
    rect = ann.boxes[0]
    write_roidb(tmp_path / "db.npz", [ann], {"a": rect[None]})  # the one proposal is the object itself
    data = TrainImages(read_roidb(tmp_path / "db.npz"), scale_px=300, max_size_px=1000, rois_per_image=8,
                       fg_fraction=1.0, fg_iou=0.5, bg_iou=(0.1, 0.5))
    for flip in (False, True):
        s = data[(0, flip, 0)]
        assert s["image"].shape[1:] == (300, 400)  # shorter side 150 -> 300
        assert (s["labels"] == 8).all() and len(s["rois"]) == 2  # the proposal and the ground truth
        drawn = _red_bbox(s["image"])
        for roi in s["rois"].numpy():
            # box * 2 spans pixels x1*2 .. x2*2 (+1 for the last source pixel's second copy)
            assert np.allclose(roi, drawn, atol=1.5), (flip, roi, drawn)


def test_prepare_image_caps_the_longer_side():
    x, scale = prepare_image(np.zeros((100, 400, 3), np.uint8), scale_px=600, max_size_px=1000)
    assert scale == 2.5 and x.shape == (3, 250, 1000)
    assert torch.allclose(x, torch.full_like(x, -1.0))  # normalised like pretraining


def test_sample_rois_follows_fast_rcnn_thresholds():
    gt = np.array([[0, 0, 99, 99]], np.float32)
    shifts = np.arange(0, 100, 2, dtype=np.float32)  # IoU from 1 down to 0
    boxes = np.stack([shifts, np.zeros_like(shifts), shifts + 99, np.full_like(shifts, 99)], 1)
    iou = (100 - shifts) / (100 + shifts)
    rng = np.random.default_rng(0)
    rois, labels, targets = sample_rois(boxes, gt, np.array([5]), num_rois=16, fg_fraction=0.25, fg_iou=0.5,
                                        bg_iou=(0.1, 0.5), rng=rng)
    picked = iou[[int(np.flatnonzero((boxes == r).all(1))[0]) for r in rois]]
    assert len(rois) == 16 and (labels[:4] == 5).all() and (labels[4:] == 0).all()
    assert (picked[:4] >= 0.5).all() and ((picked[4:] >= 0.1) & (picked[4:] < 0.5)).all()
    assert (targets[:4] == gt).all()
    # too few candidates: fewer RoIs, never a box outside the ranges
    rois, labels, _ = sample_rois(boxes[:3], gt, np.array([5]), num_rois=16, fg_fraction=0.25, fg_iou=0.5,
                                  bg_iou=(0.1, 0.5), rng=rng)
    assert len(rois) == 3 and (labels == 5).all()


def test_batch_order_is_seeded_resumable_and_split_over_ranks():
    usable = np.array([0, 2, 3, 5, 7, 8])
    full = list(BatchOrder(usable, images_per_batch=2, iterations=9, seed=1, flip=True))
    assert full == list(BatchOrder(usable, images_per_batch=2, iterations=9, seed=1, flip=True))
    assert full[4:] == list(BatchOrder(usable, images_per_batch=2, iterations=9, seed=1, flip=True, start=4))
    first_epoch = [i for batch in full[:3] for i, _, _ in batch]
    assert sorted(first_epoch) == sorted(usable)  # one epoch sees every image once
    assert {f for batch in full for _, f, _ in batch} == {False, True}
    r0 = BatchOrder(usable, images_per_batch=1, iterations=3, seed=1, flip=False, rank=0, world_size=2)
    r1 = BatchOrder(usable, images_per_batch=1, iterations=3, seed=1, flip=False, rank=1, world_size=2)
    seen = [i for b in list(r0) + list(r1) for i, _, _ in b]
    assert sorted(seen) == sorted(usable)


def test_collate_pads_and_indexes_rois(tmp_path):
    anns = [_scene(tmp_path, "a"), _scene(tmp_path, "b", size=(200, 150), rect=(10, 10, 60, 90))]
    anns.append(Annotation(image_id="c", image_path=anns[0].image_path, width=200, height=150,
                           boxes=anns[0].boxes, labels=anns[0].labels, difficult=np.array([True])))
    write_roidb(tmp_path / "db.npz", anns, {a.image_id: a.boxes for a in anns})
    db = read_roidb(tmp_path / "db.npz")
    assert list(usable_images(db)) == [0, 1]  # c's only object is difficult
    assert db.ids.tolist() == ["a", "b", "c"] and db.gt(2)[2].tolist() == [True]
    data = TrainImages(db, scale_px=100, max_size_px=200, rois_per_image=4, fg_fraction=0.5, fg_iou=0.5,
                       bg_iou=(0.1, 0.5))
    batch = collate([data[(0, False, 1)], data[(1, True, 2)]])
    assert batch["images"].shape == (2, 3, 133, 133)
    assert batch["rois"][:, 0].tolist() == [0.0] * 2 + [1.0] * 2
    assert len(batch["labels"]) == len(batch["targets"]) == 4
