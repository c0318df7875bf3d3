import numpy as np

from shards.patches import crop_patches, image_patches, sample_boxes
from tests.conftest import rgb_noise


def test_boxes_are_square_inside_and_within_scale():
    rng = np.random.default_rng(0)
    boxes = sample_boxes(300, 451, 500, patch_px=96, scale_range=(0.4, 0.8), rng=rng)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert np.array_equal(w, h)
    assert boxes[:, :2].min() >= 0 and boxes[:, 2].max() <= 451 and boxes[:, 3].max() <= 300
    assert w.min() >= 120 and w.max() <= 240


def test_patches_depend_only_on_seed_and_key():
    img = rgb_noise((200, 300, 3))
    b1, p1 = image_patches(img, "a.jpg", n=5, patch_px=32, scale_range=(0.2, 0.5), seed=1)
    b2, p2 = image_patches(img, "a.jpg", n=5, patch_px=32, scale_range=(0.2, 0.5), seed=1)
    b3, _ = image_patches(img, "b.jpg", n=5, patch_px=32, scale_range=(0.2, 0.5), seed=1)
    assert np.array_equal(b1, b2) and np.array_equal(p1, p2) and not np.array_equal(b1, b3)
    assert p1.shape == (5, 32, 32, 3) and p1.dtype == np.uint8


def test_small_input_becomes_one_resized_patch():
    boxes, patches = image_patches(rgb_noise((8, 10, 3)), "d", n=7, patch_px=32, scale_range=(0.2, 0.5), seed=0)
    assert boxes.tolist() == [[1, 0, 9, 8]] and patches.shape == (1, 32, 32, 3)


def test_crop_of_exact_size_is_identity():
    img = rgb_noise((64, 64, 3))
    out = crop_patches(img, np.array([[8, 16, 40, 48]]), 32)
    assert np.array_equal(out[0], img[16:48, 8:40])
