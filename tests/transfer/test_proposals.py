"""Selective search boxes in original pixels (through its internal downscale), box maps that follow the
image, the chunked proposal cache, user proposal files, proposal recall."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from infra.ray_edge import serial_map
from transfer.proposals import (ProposalError, clip_boxes, compute_proposals, flip_boxes, load_precomputed,
                                proposal_recall, scale_boxes, selective_search, settings_folder)

RECTS = np.array([[20, 30, 89, 99], [130, 20, 229, 69], [110, 140, 179, 219]], np.float32)  # in a 300 x 240
COLORS = ((220, 30, 30), (30, 200, 40), (40, 60, 230))
SETTINGS = {"mode": "fast", "max_side_px": 100, "min_size_px": 4, "max_boxes": 50}


def _scene(height, width, rects, background=235) -> np.ndarray:
    """A flat background with solid rectangles (inclusive pixel boxes) -> (H, W, 3) uint8."""
    img = np.full((height, width, 3), background, np.uint8)
    for (x1, y1, x2, y2), color in zip(np.asarray(rects, int), COLORS):
        img[y1:y2 + 1, x1:x2 + 1] = color
    return img


def _best_iou(boxes, rects) -> np.ndarray:
    """For each rect, the best IoU of any box (+1 pixel convention)."""
    plus = torch.tensor([0, 0, 1, 1], dtype=torch.float64)
    iou = box_iou(torch.from_numpy(np.asarray(rects, np.float64)) + plus, torch.from_numpy(boxes).double() + plus)
    return iou.max(dim=1).values.numpy()


def _bbox(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)


def test_selective_search_recovers_rectangles():
    boxes = selective_search(_scene(240, 300, RECTS))
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) > 3
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert (boxes >= 0).all() and (boxes[:, 2] <= 299).all() and (boxes[:, 3] <= 239).all()
    assert len(np.unique(boxes, axis=0)) == len(boxes)
    assert (_best_iou(boxes, RECTS) > 0.7).all()
    # min_size_px and max_boxes filter in original pixels, keeping selective search's order
    few = selective_search(_scene(240, 300, RECTS), min_size_px=60, max_boxes=3)
    assert len(few) <= 3 and ((few[:, 2:] - few[:, :2] + 1) >= 60).all()


def test_selective_search_is_reproducible():
    img = _scene(240, 300, RECTS)
    assert np.array_equal(selective_search(img), selective_search(img))


def test_downscaled_search_returns_original_pixels():
    # 1000 x 600 searched at 250 x 150 (factor 4): edges on the 4-pixel grid come back exactly,
    # so mapping x2 as x2 * 4 (3 pixels short) or not at all would fail here
    rects = np.array([[68, 76, 299, 251], [432, 48, 763, 171], [368, 352, 599, 547]], np.float32)
    boxes = selective_search(_scene(600, 1000, rects), max_side_px=250)
    assert boxes[:, 2].max() <= 999 and boxes[:, 3].max() <= 599
    assert np.allclose(_best_iou(boxes, rects), 1.0)
    # off the grid, and with unequal x/y factors (1000 x 602 -> 250 x 150), still close
    rects = rects + np.array([1, 3, 2, 1], np.float32)
    boxes = selective_search(_scene(602, 1000, rects), max_side_px=250)
    assert boxes[:, 3].max() <= 601 and (_best_iou(boxes, rects) > 0.95).all()


@pytest.mark.parametrize("scale", [0.5, 1.5, 2.0])
def test_scale_boxes_follows_a_resized_image(scale):
    box = np.array([[40, 30, 109, 79]], np.float32)
    img = Image.fromarray(_scene(150, 200, box))
    size = (round(200 * scale), round(150 * scale))
    resized = np.asarray(img.resize(size, Image.BILINEAR)).astype(int)
    drawn = _bbox(resized[..., 1] < 130)  # red rectangle, light background: green channel is dark inside
    assert np.abs(scale_boxes(box, scale)[0] - drawn).max() <= 1.0, (scale_boxes(box, scale), drawn)


def test_flip_boxes_follows_a_mirrored_image():
    box = np.array([[40, 30, 109, 79]], np.float32)
    img = Image.fromarray(_scene(150, 200, box))
    mirrored = np.asarray(img.transpose(Image.FLIP_LEFT_RIGHT))
    drawn = _bbox(mirrored[..., 1] < 130)
    assert np.array_equal(flip_boxes(box, 200)[0], drawn)
    assert np.array_equal(flip_boxes(flip_boxes(box, 200), 200), box)


def test_clip_boxes():
    got = clip_boxes(np.array([[-5, -1, 250, 80], [10, 20, 30, 40]]), height=60, width=200)
    assert got.dtype == np.float32 and got.tolist() == [[0, 0, 199, 59], [10, 20, 30, 40]]


def _images(tmp_path, n=5):
    ids, paths = [], []
    for k in range(n):
        rects = RECTS[:, :] * 0.4 + k  # shifted per image, so each image's boxes differ
        path = tmp_path / "images" / f"im{k}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(_scene(96, 120, rects)).save(path)
        ids.append(f"im{k}")
        paths.append(str(path))
    return ids, paths


class Recording:
    """A map_fn (serial_map underneath) that records the image ids of each task it is given."""

    def __init__(self):
        self.tasks = []

    def __call__(self, fn, arg_tuples, **kw):
        self.tasks += [list(args[0]) for args in arg_tuples]
        return serial_map(fn, arg_tuples, **kw)


def test_cache_computes_once_and_per_settings(tmp_path):
    ids, paths = _images(tmp_path)
    cache = tmp_path / "cache"
    first = compute_proposals(ids, paths, cache, settings=SETTINGS, map_fn=serial_map, chunk_size=2)
    assert list(first) == ids and all(b.dtype == np.float32 and b.shape[1] == 4 for b in first.values())
    folder = settings_folder(cache, SETTINGS)
    assert len(list(folder.glob("chunk-*.npz"))) == 3 and (folder / "settings.json").is_file()

    again = Recording()
    second = compute_proposals(ids, paths, cache, settings=SETTINGS, map_fn=again, chunk_size=2)
    assert again.tasks == [] and all(np.array_equal(first[i], second[i]) for i in ids)

    other = {**SETTINGS, "max_boxes": 5}
    third = compute_proposals(ids[:2], paths[:2], cache, settings=other, map_fn=serial_map)
    assert settings_folder(cache, other) != folder and len(list(cache.iterdir())) == 2
    assert all(len(b) <= 5 for b in third.values())
    with pytest.raises(ProposalError, match="unknown proposal settings"):
        compute_proposals(ids, paths, cache, settings={**SETTINGS, "scale": 2}, map_fn=serial_map)


def test_partial_cache_recomputes_only_the_lost_chunk(tmp_path):
    ids, paths = _images(tmp_path)
    cache = tmp_path / "cache"
    first = compute_proposals(ids, paths, cache, settings=SETTINGS, map_fn=serial_map, chunk_size=2)
    chunk = settings_folder(cache, SETTINGS) / "chunk-00001.npz"
    with np.load(chunk, allow_pickle=False) as z:
        lost = sorted(k for k in z.files if not k.startswith("__"))
    chunk.unlink()
    rec = Recording()
    second = compute_proposals(ids, paths, cache, settings=SETTINGS, map_fn=rec, chunk_size=2)
    assert rec.tasks == [lost]
    assert all(np.array_equal(first[i], second[i]) for i in ids)


def test_killed_run_keeps_finished_chunks_and_changed_images_are_redone(tmp_path):
    ids, paths = _images(tmp_path)
    cache = tmp_path / "cache"
    broken = paths[:2] + [str(tmp_path / "missing.png")] + paths[3:]  # the second task fails
    with pytest.raises(FileNotFoundError):
        compute_proposals(ids, broken, cache, settings=SETTINGS, map_fn=serial_map, chunk_size=2)
    rec = Recording()
    compute_proposals(ids, paths, cache, settings=SETTINGS, map_fn=rec, chunk_size=2)
    assert rec.tasks == [ids[2:4], ids[4:]]
    # same id, another image (a second data set under the same cache): recomputed, not served stale
    Image.fromarray(_scene(80, 100, RECTS * 0.3)).save(paths[0])
    rec = Recording()
    compute_proposals(ids, paths, cache, settings=SETTINGS, map_fn=rec, chunk_size=2)
    assert rec.tasks == [ids[:1]]


def test_load_precomputed(tmp_path):
    path = tmp_path / "props.npz"
    np.savez(path, a=np.array([[0, 0, 9, 9]], np.float64), b=np.zeros((0, 4)), c=np.zeros((3, 5)))
    got = load_precomputed(path, ["a", "b"])
    assert got["a"].dtype == np.float32 and got["a"].tolist() == [[0, 0, 9, 9]] and got["b"].shape == (0, 4)
    cases = [(tmp_path / "nope.npz", ["a"], "not found"), (path, ["a", "x", "y"], "2 of 3 .*first: 'x'"),
             (path, ["a", "c"], r"shape \(3, 5\)")]
    for p, ids, pattern in cases:
        with pytest.raises(ProposalError, match=pattern) as err:
            load_precomputed(p, ids)
        assert "\n" not in str(err.value)


def test_proposal_recall_hand_values():
    gt = [np.array([[0, 0, 9, 9], [20, 20, 29, 29], [50, 50, 59, 59]], np.float32),
          np.array([[0, 0, 9, 9]], np.float32)]
    props = [np.array([[0, 0, 9, 4],  # IoU 50/100 with +1 areas (36/81 without): covered at 0.5
                       [20, 20, 29, 28],  # IoU 0.9
                       [70, 70, 80, 80]], np.float32),
             np.zeros((0, 4), np.float32)]  # an image without proposals covers nothing
    assert proposal_recall(props, gt) == pytest.approx(2 / 4)
    assert proposal_recall(props, gt, iou=0.6) == pytest.approx(1 / 4)
    assert np.isnan(proposal_recall([np.zeros((0, 4))], [np.zeros((0, 4))]))
