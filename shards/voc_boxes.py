"""A labelled patch source from a VOC devkit's object boxes (source kind `vocboxes`).

Every annotated object that is not `difficult` and at least MIN_BOX_PX a side gives one patch: the
square around its box (side = the box's longer side, shifted inside the image), resized to the patch
size, labelled with its class (metadata only: it scores retrieval and purity, never trains). Each image
also gives BACKGROUND_PER_IMAGE background patches: random squares (a seeded draw per image) that cover
at most MAX_OBJECT_SHARE of any object box, unlabelled (-1), so the clustering and the CNN see
background as real data would hold it while the scores count the objects only.

This is the design's second labelled set (beside scikit-learn's digits): the generated VOC-layout set
of `python -m transfer.synthetic` (five classes pasted on natural photos) gives it on a laptop, and a
real VOCdevkit gives the same kind of set with twenty classes.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np

MIN_BOX_PX = 16
BACKGROUND_PER_IMAGE = 1
BACKGROUND_SCALE = (0.2, 0.45)  # background square side / shorter image side
MAX_OBJECT_SHARE = 0.1  # of an object box's area a background square may cover
TRIES = 50


def _objects(xml_path: Path) -> tuple[int, int, list[tuple[str, tuple[int, int, int, int], bool]]]:
    """(width, height, [(class, (x0, y0, x1, y1) 0-based, x1/y1 exclusive, difficult)]) of one file."""
    root = ET.parse(xml_path).getroot()
    size = root.find("size")
    width, height = int(size.findtext("width")), int(size.findtext("height"))
    out = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        x0, y0, x1, y1 = (int(float(bb.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax"))
        out.append((obj.findtext("name").strip(), (x0 - 1, y0 - 1, x1, y1), obj.findtext("difficult") == "1"))
    return width, height, out


def square_around(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """The square of side max(box w, box h) centred on the box, shifted (then clipped) into the image."""
    x0, y0, x1, y1 = box
    side = min(max(x1 - x0, y1 - y0), width, height)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    sx = int(np.clip(cx - side // 2, 0, width - side))
    sy = int(np.clip(cy - side // 2, 0, height - side))
    return sx, sy, sx + side, sy + side


def background_boxes(key: str, width: int, height: int, objects: list[tuple[int, int, int, int]], n: int,
                     seed: int = 0) -> list[tuple[int, int, int, int]]:
    """Up to n squares that cover at most MAX_OBJECT_SHARE of any object box (seeded by the key)."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])
    short, found = min(width, height), []
    for _ in range(TRIES):
        if len(found) == n:
            break
        side = max(MIN_BOX_PX, int(rng.uniform(*BACKGROUND_SCALE) * short))
        x0, y0 = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        box = (x0, y0, x0 + side, y0 + side)
        if all(_covered(box, o) <= MAX_OBJECT_SHARE for o in objects + found):
            found.append(box)
    return found


def _covered(box, obj) -> float:
    """Share of `obj`'s area that `box` covers."""
    w = min(box[2], obj[2]) - max(box[0], obj[0])
    h = min(box[3], obj[3]) - max(box[1], obj[1])
    area = max((obj[2] - obj[0]) * (obj[3] - obj[1]), 1)
    return max(w, 0) * max(h, 0) / area


def list_boxes(year_dir: Path) -> tuple[list[tuple[str, Path, tuple]], list[str]]:
    """VOC2007 folder -> ([(image id, image path, ((x0, y0, x1, y1, label), ...))], classes). Labels
    index the sorted classes of the usable objects; background boxes carry -1."""
    images = year_dir / "JPEGImages"
    parsed = []
    for xml in sorted((year_dir / "Annotations").glob("*.xml")):
        jpg = images / f"{xml.stem}.jpg"
        if jpg.is_file():
            parsed.append((xml.stem, jpg, *_objects(xml)))
    usable = lambda b: b[2] - b[0] >= MIN_BOX_PX and b[3] - b[1] >= MIN_BOX_PX  # noqa: E731
    classes = sorted({name for *_, objs in parsed for name, box, hard in objs if not hard and usable(box)})
    label = {c: i for i, c in enumerate(classes)}
    out = []
    for image_id, path, width, height, objs in parsed:
        boxes = [(*square_around(box, width, height), label[name]) for name, box, hard in objs
                 if not hard and usable(box)]
        every = [box for _, box, _ in objs]
        boxes += [(*b, -1) for b in background_boxes(image_id, width, height, every, BACKGROUND_PER_IMAGE)]
        out.append((image_id, path, tuple(boxes)))
    return out, classes
