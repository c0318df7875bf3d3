"""Reader for the PASCAL VOC devkit layout: VOCdevkit/VOC2007/{Annotations,JPEGImages,ImageSets/Main}.

Boxes follow the convention of all of `transfer/`: (N, 4) float32 x1, y1, x2, y2 in 0-based INCLUSIVE pixel
coordinates, i.e. the XML's 1-based values minus 1 (as Fast R-CNN's `pascal_voc.py` does), so that
width = x2 - x1 + 1. Labels are 1..20 indexes into VOC_CLASSES; 0 is left for background.
"""
from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
_LABEL = {name: i + 1 for i, name in enumerate(VOC_CLASSES)}
_SUBDIRS = ("Annotations", "JPEGImages", "ImageSets/Main")


class VocError(ValueError):
    """A VOC devkit problem the user can fix; the message is one line."""


@dataclass(frozen=True, eq=False)
class Annotation:
    """One image of a split. boxes: (N, 4) float32 0-based inclusive; labels: (N,) int64 in 1..20;
    difficult: (N,) bool."""
    image_id: str
    image_path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


def find_year_dir(path) -> Path:
    """VOCdevkit/ or VOCdevkit/VOC2007/ -> the VOC2007 folder; VocError if it is neither."""
    path = Path(path).expanduser()
    for cand in (path, path / "VOC2007"):
        if all((cand / sub).is_dir() for sub in _SUBDIRS):
            return cand
    raise VocError(f"no VOC devkit at {path} (expected VOC2007/Annotations, JPEGImages, ImageSets/Main)")


def read_image_set(year_dir, split: str) -> list[str]:
    """ImageSets/Main/{split}.txt -> image ids in file order (first token of each non-empty line)."""
    listing = Path(year_dir) / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        # per-class files (aeroplane_train.txt, ...) share the folder; list only the split files
        found = sorted(p.stem for p in listing.parent.glob("*.txt")
                       if not any(p.stem.startswith(c + "_") for c in VOC_CLASSES))
        raise VocError(f"no split {split!r} in {year_dir} ({listing.name} missing; "
                       f"found: {', '.join(found) or 'none'})")
    try:
        lines = listing.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise VocError(f"cannot read {listing}: {exc}") from None
    return [line.split()[0] for line in lines if line.strip()]


def _number(node, tag: str, where: str) -> float:
    text = node.findtext(tag)
    try:
        return float(text)
    except (TypeError, ValueError):
        raise VocError(f"{where}: <{tag}> is {text!r}, not a number") from None


def _image_size(root, image_path: Path, where: str) -> tuple[int, int]:
    """(width, height) from <size>, or from the image header when <size> is absent or zero."""
    size = root.find("size")
    if size is not None:
        try:
            width, height = int(float(size.findtext("width"))), int(float(size.findtext("height")))
            if width > 0 and height > 0:
                return width, height
        except (TypeError, ValueError, OverflowError):
            pass
    try:
        with Image.open(image_path) as im:  # reads the header only
            return im.size
    except OSError:
        raise VocError(f"{where}: no <size> and image {image_path.name} unreadable") from None


def _objects(root, where: str) -> tuple[list, list, list]:
    boxes, labels, difficult = [], [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in _LABEL:
            raise VocError(f"{where}: unknown class {name!r}")
        bb = obj.find("bndbox")
        if bb is None:
            raise VocError(f"{where}: object {name!r} has no <bndbox>")
        x1, y1, x2, y2 = (_number(bb, t, where) - 1 for t in ("xmin", "ymin", "xmax", "ymax"))
        if not (x1 <= x2 and y1 <= y2):
            raise VocError(f"{where}: box of {name!r} out of order "
                           f"(xmin {x1 + 1:g}, ymin {y1 + 1:g}, xmax {x2 + 1:g}, ymax {y2 + 1:g})")
        boxes.append((x1, y1, x2, y2))
        labels.append(_LABEL[name])
        difficult.append(obj.find("difficult") is not None and _number(obj, "difficult", where) != 0)
    return boxes, labels, difficult


def parse_annotation(xml_path, year_dir) -> Annotation:
    """Annotations/{id}.xml -> Annotation. VocError (file name + reason) on broken XML, an unknown class, or a
    non-numeric / out-of-order box. Boxes are clipped to the image (some VOC-format sets have xmin 0)."""
    xml_path, year_dir = Path(xml_path), Path(year_dir)
    where = xml_path.name
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise VocError(f"{where}: not valid XML ({exc})") from None
    except OSError as exc:
        raise VocError(f"{where}: cannot read ({exc.strerror})") from None
    image_id = xml_path.stem
    image_path = year_dir / "JPEGImages" / f"{image_id}.jpg"  # the devkit's own rule (VOCinit.m imgpath)
    width, height = _image_size(root, image_path, where)
    boxes, labels, difficult = _objects(root, where)
    boxes = np.array(boxes, np.float32).reshape(-1, 4)
    np.clip(boxes, 0, [width - 1, height - 1, width - 1, height - 1], out=boxes)
    return Annotation(image_id=image_id, image_path=image_path, width=width, height=height, boxes=boxes,
                      labels=np.array(labels, np.int64), difficult=np.array(difficult, bool))


def load_split(path, split: str) -> tuple[list[Annotation], int]:
    """VOCdevkit/ (or its VOC2007/) and a split name -> (annotations in split order, number skipped).

    An image whose annotation is missing or malformed, or whose JPEG is missing, is skipped with a logging
    warning and counted. VocError (one line) for a wrong path, a missing or empty split file, or a split of
    which no image could be read.
    """
    year_dir = find_year_dir(path)
    ids = read_image_set(year_dir, split)
    if not ids:
        raise VocError(f"split {split!r} in {year_dir} lists no images")
    annotations, skipped = [], 0
    for image_id in ids:
        try:
            ann = parse_annotation(year_dir / "Annotations" / f"{image_id}.xml", year_dir)
            if not ann.image_path.is_file():
                raise VocError(f"{image_id}: image {ann.image_path.name} missing from JPEGImages")
        except VocError as exc:
            log.warning("skipping %s image: %s", split, exc)
            skipped += 1
            continue
        annotations.append(ann)
    if not annotations:
        raise VocError(f"none of the {len(ids)} images of split {split!r} in {year_dir} could be read")
    if skipped:
        log.warning("split %s: %d of %d images skipped (see warnings above)", split, skipped, len(ids))
    return annotations, skipped


def load_image(ann: Annotation) -> np.ndarray:
    """The annotation's image -> (H, W, 3) uint8 RGB; VocError if it cannot be decoded."""
    try:
        with Image.open(ann.image_path) as im:
            return np.array(im.convert("RGB"))
    except OSError as exc:
        raise VocError(f"cannot read image {ann.image_path}: {exc}") from None
