"""The generated VOC set: devkit layout, annotations as real VOC XML, determinism, the difficult rule, the
stamp, the CLI, and a round trip through transfer.voc."""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transfer.synthetic import (CLASSES_USED, MIN_AREA_PX, MIN_SIDE_PX, SyntheticError, main, make_voc,
                                object_counts)
from transfer.voc import VOC_CLASSES, load_split

REPO = Path(__file__).resolve().parents[2]
SPLITS = ("train", "val", "trainval", "test")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("small"), trainval=12, test=6, seed=0)


@pytest.fixture(scope="module")
def larger(tmp_path_factory):
    """Enough objects to see the difficult rule and a default-sized test split at work."""
    return make_voc(tmp_path_factory.mktemp("larger"), trainval=40, test=100, seed=3)


def split_ids(devkit, split):
    return (devkit / "VOC2007" / "ImageSets" / "Main" / f"{split}.txt").read_text().split()


def objects(devkit, image_id):
    """The XML's objects as dicts: name, truncated, difficult, box (1-based xmin, ymin, xmax, ymax)."""
    root = ET.parse(devkit / "VOC2007" / "Annotations" / f"{image_id}.xml").getroot()
    return [{"name": o.findtext("name"), "pose": o.findtext("pose"),
             "truncated": int(o.findtext("truncated")), "difficult": int(o.findtext("difficult")),
             "box": [int(o.find("bndbox").findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")]}
            for o in root.iter("object")]


def files(devkit, pattern):
    return {p.relative_to(devkit).as_posix(): p.read_bytes() for p in sorted(devkit.rglob(pattern))}


def test_devkit_layout_and_disjoint_splits(small):
    year = small / "VOC2007"
    assert all((year / sub).is_dir() for sub in ("Annotations", "JPEGImages", "ImageSets/Main"))
    ids = {s: split_ids(small, s) for s in SPLITS}
    assert [len(ids[s]) for s in SPLITS] == [6, 6, 12, 6]
    assert all(ids[s] == sorted(ids[s]) for s in SPLITS)
    assert not set(ids["train"]) & set(ids["val"]) and not set(ids["trainval"]) & set(ids["test"])
    assert set(ids["train"]) | set(ids["val"]) == set(ids["trainval"])
    every = sorted(ids["trainval"] + ids["test"])
    assert sorted(p.stem for p in (year / "Annotations").glob("*.xml")) == every
    assert sorted(p.stem for p in (year / "JPEGImages").glob("*.jpg")) == every


def test_per_class_lists_match_the_annotations(small):
    for split in SPLITS:
        for cls in VOC_CLASSES:
            listing = small / "VOC2007" / "ImageSets" / "Main" / f"{cls}_{split}.txt"
            rows = [line.split() for line in listing.read_text().splitlines()]
            assert [r[0] for r in rows] == split_ids(small, split)
            for image_id, flag in rows:
                mine = [o for o in objects(small, image_id) if o["name"] == cls]
                want = -1 if not mine else int(any(not o["difficult"] for o in mine))
                assert int(flag) == want, (cls, split, image_id)


def test_annotations_are_voc_xml_with_boxes_inside_the_image(small):
    for image_id in split_ids(small, "trainval") + split_ids(small, "test"):
        root = ET.parse(small / "VOC2007" / "Annotations" / f"{image_id}.xml").getroot()
        assert root.tag == "annotation" and root.findtext("folder") == "VOC2007"
        assert root.findtext("filename") == f"{image_id}.jpg" and root.findtext("segmented") == "0"
        w, h, depth = (int(root.find("size").findtext(t)) for t in ("width", "height", "depth"))
        assert depth == 3 and 200 <= max(w, h) <= 320
        with Image.open(small / "VOC2007" / "JPEGImages" / f"{image_id}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (w, h)
        objs = objects(small, image_id)
        assert 1 <= len(objs) <= 4
        for o in objs:
            assert o["name"] in CLASSES_USED and o["pose"] == "Unspecified"
            assert o["truncated"] in (0, 1) and o["difficult"] in (0, 1)
            x1, y1, x2, y2 = o["box"]  # 1-based inclusive: 1..width, 1..height
            assert 1 <= x1 <= x2 <= w and 1 <= y1 <= y2 <= h


def test_same_seed_same_bytes_other_seed_differs(tmp_path, small):
    again = make_voc(tmp_path / "again", trainval=12, test=6, seed=0)
    for pattern in ("*.xml", "*.txt", "*.jpg"):
        assert files(again, pattern) == files(small, pattern), pattern
    other = make_voc(tmp_path / "other", trainval=12, test=6, seed=1)
    mine, theirs = files(small, "*.xml"), files(other, "*.xml")
    assert mine.keys() == theirs.keys() and sum(mine[k] != theirs[k] for k in mine) >= 15


def is_small(box):
    w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
    return w * h < MIN_AREA_PX or min(w, h) < MIN_SIDE_PX


def test_difficult_flags_follow_the_documented_rule(larger):
    objs = [(o, image_id) for image_id in split_ids(larger, "trainval") + split_ids(larger, "test")
            for o in objects(larger, image_id)]
    assert 0.04 <= np.mean([o["difficult"] for o, _ in objs]) <= 0.16  # VOC07 has ~ 10%
    assert all(o["difficult"] for o, _ in objs if is_small(o["box"]))
    occluded = [(o, image_id) for o, image_id in objs if o["difficult"] and not is_small(o["box"])]
    assert occluded  # otherwise only occlusion by a later object makes one difficult: another box overlaps
    for o, image_id in occluded:
        x1, y1, x2, y2 = o["box"]
        others = [p["box"] for p in objects(larger, image_id) if p["box"] != o["box"]]
        assert any(min(x2, b[2]) >= max(x1, b[0]) and min(y2, b[3]) >= max(y1, b[1]) for b in others)


def test_a_default_sized_test_split_has_every_class(larger):
    counts = object_counts(larger, "test")
    assert set(counts) == set(CLASSES_USED)
    assert all(n >= 15 and n - d >= 10 for n, d in counts.values()), counts


def test_the_stamp_makes_a_rerun_a_no_op_and_new_parameters_regenerate(tmp_path):
    devkit = make_voc(tmp_path, trainval=4, test=2, seed=0)
    stamps = {p: p.stat().st_mtime_ns for p in devkit.rglob("*")}
    assert make_voc(tmp_path, trainval=4, test=2, seed=0) == devkit
    assert {p: p.stat().st_mtime_ns for p in devkit.rglob("*")} == stamps
    assert make_voc(tmp_path, trainval=6, test=2, seed=0) == devkit
    assert len(split_ids(devkit, "trainval")) == 6 and len(list(devkit.rglob("*.xml"))) == 8
    assert '"trainval": 6' in (devkit / "synthetic.json").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["VOCdevkit"]  # no temporary folder left behind


def test_a_devkit_it_did_not_generate_is_never_overwritten(tmp_path):
    (tmp_path / "VOCdevkit" / "VOC2007" / "Annotations").mkdir(parents=True)
    with pytest.raises(SyntheticError, match="not generated"):
        make_voc(tmp_path, trainval=4, test=2)
    assert (tmp_path / "VOCdevkit" / "VOC2007" / "Annotations").is_dir()
    with pytest.raises(SyntheticError, match="trainval >= 2"):
        make_voc(tmp_path / "new", trainval=1, test=2)


def test_round_trip_through_the_voc_reader(small):
    for split in ("trainval", "test"):
        anns, skipped = load_split(small, split)
        assert skipped == 0 and [a.image_id for a in anns] == split_ids(small, split)
        for a in anns:
            objs = objects(small, a.image_id)
            np.testing.assert_array_equal(a.boxes, np.array([o["box"] for o in objs], np.float32) - 1)
            assert [VOC_CLASSES[i - 1] for i in a.labels] == [o["name"] for o in objs]
            assert a.difficult.tolist() == [bool(o["difficult"]) for o in objs]


def test_cli_prints_the_devkit_and_per_class_counts(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--trainval", "4", "--test", "2", "--seed", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(tmp_path / "VOCdevkit")
    assert [line.split()[0] for line in lines[2:]] == list(CLASSES_USED)
    assert main(["--out", str(tmp_path / "bad"), "--trainval", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: need trainval >= 2")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    help_text = subprocess.run([sys.executable, "-m", "transfer.synthetic", "--help"], cwd=REPO, env=env,
                               capture_output=True, text=True, check=True).stdout
    assert "--trainval" in help_text and "--seed" in help_text
