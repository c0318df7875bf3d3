import tarfile

import numpy as np
import pytest
from PIL import Image

from shards.sources import SourceError, list_items, load_image, source_fingerprint, to_rgb_uint8
from tests.conftest import make_image_folder


def test_imagenet_layout_keeps_class_as_label(tmp_path):
    make_image_folder(tmp_path, classes=("cat", "coffee"), per_class=2)
    listing = list_items(str(tmp_path))
    assert listing.kind == "imagenet"
    assert listing.classes == ["cat", "coffee"]
    assert [(it.key, it.label) for it in listing.items] == [
        ("cat/cat_0.jpg", 0), ("cat/cat_1.jpg", 0), ("coffee/coffee_0.jpg", 1), ("coffee/coffee_1.jpg", 1)]
    img = load_image(listing.items[0])
    assert img.dtype == np.uint8 and img.shape == (160, 200, 3)


def test_flat_folder_tar_and_voc_give_the_same_pixels(tmp_path):
    make_image_folder(tmp_path / "tree", classes=("cat",), per_class=2)
    flat = tmp_path / "tree" / "cat"
    with tarfile.open(tmp_path / "imgs.tar", "w") as tar:
        for p in sorted(flat.iterdir()):
            tar.add(p, arcname=f"x/{p.name}")
    voc = tmp_path / "VOCdevkit" / "VOC2007" / "JPEGImages"
    voc.mkdir(parents=True)
    for p in flat.iterdir():
        (voc / p.name).write_bytes(p.read_bytes())
    a, b, c = list_items(str(flat)), list_items(str(tmp_path / "imgs.tar")), list_items(str(tmp_path / "VOCdevkit"))
    assert (a.kind, b.kind, c.kind) == ("folder", "tar", "voc")
    assert len(a.items) == len(b.items) == len(c.items) == 2
    for x, y, z in zip(a.items, b.items, c.items):
        assert np.array_equal(load_image(x), load_image(y)) and np.array_equal(load_image(x), load_image(z))


def test_builtin_sources():
    demo, digits = list_items("demo"), list_items("digits")
    assert len(demo.items) >= 15 and all(it.label == -1 for it in demo.items)
    assert len(digits.items) == 1797 and digits.classes == [str(i) for i in range(10)]
    d = load_image(digits.items[0])
    assert d.shape == (8, 8, 3) and d.max() > 200  # 0..16 rescaled to 0..255
    assert load_image(demo.items[0]).shape[2] == 3


def test_missing_and_empty_sources_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="source not found"):
        list_items(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no images"):
        list_items(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="not a tar"):
        list_items(str(tmp_path / "notes.txt"))


def test_fingerprint_follows_content(tmp_path):
    make_image_folder(tmp_path, classes=("cat",), per_class=2)
    before = source_fingerprint(list_items(str(tmp_path)))
    assert source_fingerprint(list_items(str(tmp_path))) == before
    Image.fromarray(np.zeros((50, 60, 3), np.uint8)).save(tmp_path / "cat" / "cat_0.jpg")
    assert source_fingerprint(list_items(str(tmp_path))) != before


def test_to_rgb_uint8_handles_gray_bool_float_rgba():
    assert to_rgb_uint8(np.ones((4, 5), bool)).tolist()[0][0] == [255, 255, 255]
    assert to_rgb_uint8(np.full((4, 5), 0.5)).max() == 127
    assert to_rgb_uint8(np.zeros((4, 5, 4), np.uint8)).shape == (4, 5, 3)


def write_voc_xml(path, width, height, objects):
    """objects: [(name, (xmin, ymin, xmax, ymax) 1-based inclusive, difficult)]."""
    objs = "".join(
        f"<object><name>{n}</name><difficult>{int(d)}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b, d in objects)
    path.write_text(f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
                    f"{objs}</annotation>")


def test_voc_boxes_give_labelled_object_patches_and_unlabelled_background(tmp_path):
    from shards.build import build_shards
    from shards.store import PatchStore
    from shards.writer import PatchParams

    year = tmp_path / "VOCdevkit" / "VOC2007"
    (year / "JPEGImages").mkdir(parents=True)
    (year / "Annotations").mkdir()
    img = np.zeros((120, 160, 3), np.uint8)
    img[10:50, 20:80] = (255, 0, 0)  # a red "cat", 60 x 40
    img[60:110, 100:140] = (0, 0, 255)  # a blue "dog", 40 x 50
    Image.fromarray(img).save(year / "JPEGImages" / "a.jpg", quality=95)
    write_voc_xml(year / "Annotations" / "a.xml", 160, 120, [
        ("cat", (21, 11, 80, 50), False), ("dog", (101, 61, 140, 110), False),
        ("dog", (1, 100, 8, 108), False),  # smaller than MIN_BOX_PX: left out
        ("cat", (120, 5, 150, 40), True)])  # difficult: left out
    listing = list_items(str(tmp_path / "VOCdevkit"), "vocboxes")
    assert listing.kind == "vocboxes" and listing.classes == ["cat", "dog"]
    (item,) = listing.items
    labels = [b[4] for b in item.boxes]
    assert labels[:2] == [0, 1] and labels[2:] == [-1]  # objects, then one background square
    x0, y0, x1, y1 = item.boxes[0][:4]
    assert (x1 - x0, y1 - y0) == (60, 60) and (x0, y0) == (20, 0)  # the square around the cat, shifted in

    out = tmp_path / "shards"
    build_shards(listing, out, PatchParams(patch_px=32, patches_per_record=2), images_per_shard=1)
    store = PatchStore(out)
    assert len(store) == 3 and store.labels(np.arange(3)).tolist() == [0, 1, -1]
    cat, dog, _ = store.get(np.arange(3)).astype(int)
    assert cat[16, 16, 0] > 200 and cat[16, 16, 2] < 60 and dog[16, 16, 2] > 200
    bg = item.boxes[2][:4]
    for obj in item.boxes[:2]:  # the background square covers at most 10% of any object box
        w = max(0, min(bg[2], obj[2]) - max(bg[0], obj[0]))
        h = max(0, min(bg[3], obj[3]) - max(bg[1], obj[1]))
        assert w * h <= 0.1 * (obj[2] - obj[0]) * (obj[3] - obj[1])
