"""VOC devkit reader on a hand-written two-image tree: boxes, labels, difficult flags, splits, errors."""
import logging

import numpy as np
import pytest
from PIL import Image

from transfer.voc import (VOC_CLASSES, VocError, find_year_dir, load_image, load_split, parse_annotation,
                         read_image_set)

XML_1 = """<annotation>
  <folder>VOC2007</folder><filename>000001.jpg</filename>
  <size><width>64</width><height>48</height><depth>3</depth></size>
  <object><name>dog</name><pose>Left</pose><truncated>0</truncated><difficult>0</difficult>
    <bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object>
  <object><name>person</name><truncated>1</truncated><difficult>1</difficult>
    <bndbox><xmin>10</xmin><ymin>5</ymin><xmax>64</xmax><ymax>48</ymax></bndbox></object>
</annotation>"""

# no <size>: the reader falls back to the JPEG header; no <difficult>: not difficult
XML_2 = """<annotation><filename>000002.jpg</filename>
  <object><name> car </name>
    <bndbox><xmin>3</xmin><ymin>4</ymin><xmax>20</xmax><ymax>21</ymax></bndbox></object>
</annotation>"""

BROKEN = {  # image id -> (XML, what the warning must say)
    "000003": ("<annotation><object><name>dog</name>", "not valid XML"),
    "000004": (XML_1.replace("person", "unicorn"), "unknown class 'unicorn'"),
    "000005": (XML_1.replace("<xmax>30</xmax>", "<xmax>0</xmax>"), "out of order"),
    "000006": (XML_1.replace("<ymin>2</ymin>", "<ymin>two</ymin>"), "not a number"),
}


def _jpeg(path, size):
    Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(path)


def make_tree(root, extra_ids=()):
    """VOCdevkit/VOC2007: images 000001 (64x48) and 000002 (50x40); splits trainval (both), test (2nd)."""
    year = root / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (year / sub).mkdir(parents=True)
    for image_id, xml, size in (("000001", XML_1, (64, 48)), ("000002", XML_2, (50, 40))):
        (year / "Annotations" / f"{image_id}.xml").write_text(xml)
        _jpeg(year / "JPEGImages" / f"{image_id}.jpg", size)
    main = year / "ImageSets" / "Main"
    (main / "trainval.txt").write_text("\n".join(["000001", "000002", *extra_ids]) + "\n")
    (main / "test.txt").write_text("000002\n")
    (main / "dog_trainval.txt").write_text("000001  1\n000002 -1\n")  # a per-class list, not a split
    return year


def test_boxes_labels_and_difficult_flags(tmp_path):
    make_tree(tmp_path)
    anns, skipped = load_split(tmp_path / "VOCdevkit", "trainval")
    assert skipped == 0 and [a.image_id for a in anns] == ["000001", "000002"]
    a, b = anns
    assert (a.width, a.height) == (64, 48) and (b.width, b.height) == (50, 40)  # b: from the JPEG header
    # XML values are 1-based: minus 1; the person box ends at the last pixel (63, 47)
    np.testing.assert_array_equal(a.boxes, [[0, 1, 29, 39], [9, 4, 63, 47]])
    np.testing.assert_array_equal(b.boxes, [[2, 3, 19, 20]])
    assert a.boxes.dtype == np.float32 and a.labels.dtype == np.int64 and a.difficult.dtype == bool
    assert VOC_CLASSES[11] == "dog" and VOC_CLASSES[14] == "person" and VOC_CLASSES[6] == "car"
    assert a.labels.tolist() == [12, 15] and b.labels.tolist() == [7]
    assert a.difficult.tolist() == [False, True] and b.difficult.tolist() == [False]
    assert a.image_path == tmp_path / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000001.jpg"
    img = load_image(b)
    assert img.shape == (40, 50, 3) and img.dtype == np.uint8


def test_splits_and_devkit_folder(tmp_path):
    year = make_tree(tmp_path)
    assert find_year_dir(tmp_path / "VOCdevkit") == year and find_year_dir(year) == year
    assert read_image_set(year, "test") == ["000002"]
    anns, skipped = load_split(year, "test")
    assert [a.image_id for a in anns] == ["000002"] and skipped == 0


def test_wrong_path_and_missing_split_are_one_line_errors(tmp_path):
    make_tree(tmp_path)
    with pytest.raises(VocError, match="no VOC devkit at") as exc:
        load_split(tmp_path / "nowhere", "trainval")
    assert "\n" not in str(exc.value) and "JPEGImages" in str(exc.value)
    with pytest.raises(VocError, match=r"no split 'val'.*found: test, trainval\)") as exc:
        load_split(tmp_path / "VOCdevkit", "val")
    assert "\n" not in str(exc.value)


def test_malformed_annotations_and_missing_images_are_skipped_and_counted(tmp_path, caplog):
    year = make_tree(tmp_path, extra_ids=[*BROKEN, "000007", "000008"])
    for image_id, (xml, _) in BROKEN.items():
        (year / "Annotations" / f"{image_id}.xml").write_text(xml)
        _jpeg(year / "JPEGImages" / f"{image_id}.jpg", (64, 48))
    (year / "Annotations" / "000007.xml").write_text(XML_1)  # 000007: no JPEG; 000008: no XML
    with caplog.at_level(logging.WARNING, logger="transfer.voc"):
        anns, skipped = load_split(tmp_path / "VOCdevkit", "trainval")
    assert [a.image_id for a in anns] == ["000001", "000002"] and skipped == 6
    for image_id, (_, reason) in BROKEN.items():
        assert any(f"{image_id}.xml" in r.message and reason in r.message for r in caplog.records), reason
    assert any("000007.jpg missing" in r.message for r in caplog.records)
    assert any("000008.xml: cannot read" in r.message for r in caplog.records)


@pytest.mark.parametrize("image_id", list(BROKEN))
def test_parse_annotation_names_the_file_and_the_reason(tmp_path, image_id):
    year = make_tree(tmp_path)
    xml, reason = BROKEN[image_id]
    (year / "Annotations" / f"{image_id}.xml").write_text(xml)
    with pytest.raises(VocError, match=reason) as exc:
        parse_annotation(year / "Annotations" / f"{image_id}.xml", year)
    assert str(exc.value).startswith(f"{image_id}.xml: ") and "\n" not in str(exc.value)


def test_empty_or_unreadable_split_is_an_error(tmp_path):
    year = make_tree(tmp_path)
    (year / "ImageSets" / "Main" / "val.txt").write_text("\n")
    with pytest.raises(VocError, match="lists no images"):
        load_split(year, "val")
    (year / "ImageSets" / "Main" / "val.txt").write_text("missing1\nmissing2\n")
    with pytest.raises(VocError, match="none of the 2 images"):
        load_split(year, "val")


def test_boxes_are_clipped_to_the_image(tmp_path):
    year = make_tree(tmp_path)
    (year / "Annotations" / "000001.xml").write_text(XML_1.replace("<xmin>1</xmin>", "<xmin>0</xmin>"))
    ann = parse_annotation(year / "Annotations" / "000001.xml", year)
    assert ann.boxes[0, 0] == 0  # xmin 0 (invalid in 1-based VOC) would be -1
