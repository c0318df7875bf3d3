"""A generated detection set in the real PASCAL VOC devkit layout, for the demo and the tests.

    python -m transfer.synthetic --out runs/transfer/voc-generated [--trainval 200] [--test 100] [--seed 0]

Writes VOCdevkit/VOC2007/{Annotations/*.xml, JPEGImages/*.jpg, ImageSets/Main/{split}.txt, {cls}_{split}.txt}.
A scene is a crop of a natural photo (scikit-image / scikit-learn samples) with 1-4 objects pasted on it with
soft alpha edges; transfer/synthetic_objects.py says what the objects and backgrounds are made of. Images are
200-320 px on the longer side; objects 20 px to ~80% of the shorter side. Train and val: halves of trainval.

Annotation rules (as the VOC guidelines): a box is the tight extent of the VISIBLE part of the object (alpha
> 0.5, not covered by objects pasted later), 1-based inclusive pixels; truncated = the object reaches past
the image border; difficult = visible box area < 24 x 24 px, or its shorter side < 16 px, or more than 50%
of the object's in-image mask covered by later objects; an object more than 90% covered is not annotated.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from transfer.synthetic_objects import background, instance
from transfer.voc import VOC_CLASSES, VocError, load_split

FORMAT_VERSION = 1  # bump whenever what a seed generates changes: a stamped old set is otherwise reused
CLASSES_USED: tuple[str, ...] = ("cat", "horse", "person", "pottedplant", "tvmonitor")
MIN_AREA_PX, MIN_SIDE_PX = 24 * 24, 16  # smaller visible boxes are difficult
OCCLUDED_DIFFICULT, OCCLUDED_DROP = 0.5, 0.9  # covered fraction of the in-image mask
class SyntheticError(VocError):
    """The generated set cannot be written where asked; one line for the user."""


def _paste(canvas: np.ndarray, rgb: np.ndarray, alpha: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """Alpha-blend the object into canvas (in place) at top-left (x0, y0), which may lie outside ->
    the object's alpha on the whole canvas, (H, W) float32."""
    H, W = canvas.shape[:2]
    h, w = alpha.shape
    full = np.zeros((H, W), np.float32)
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
    if cx1 <= cx0 or cy1 <= cy0:
        return full
    a = alpha[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    full[cy0:cy1, cx0:cx1] = a
    region = canvas[cy0:cy1, cx0:cx1]
    region += a[..., None] * (rgb[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] - region)
    return full


def _annotate(alphas: list[np.ndarray], full_px: list[int], classes: list[str]) -> list[dict]:
    """Per pasted object (in paste order): its visible box, truncated and difficult flags; None for an
    object (almost) hidden by the ones pasted after it. Boxes are 1-based inclusive (x1, y1, x2, y2)."""
    cover = np.zeros_like(alphas[0])
    out = []
    for alpha, full, cls in zip(alphas[::-1], full_px[::-1], classes[::-1]):
        in_image = int((alpha > 0.5).sum())
        visible = alpha * (1 - cover) > 0.5
        cover += alpha * (1 - cover)
        occluded = 1 - visible.sum() / max(in_image, 1)
        if in_image == 0 or occluded > OCCLUDED_DROP:
            out.append(None)
            continue
        ys, xs = np.nonzero(visible)
        x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
        w, h = x2 - x1 + 1, y2 - y1 + 1
        difficult = w * h < MIN_AREA_PX or min(w, h) < MIN_SIDE_PX or occluded > OCCLUDED_DIFFICULT
        out.append({"name": cls, "truncated": int(in_image < full), "difficult": int(difficult),
                    "box": (x1 + 1, y1 + 1, x2 + 1, y2 + 1)})
    return out[::-1]


def _scene(rng: np.random.Generator, side_px: tuple[int, int], first_class: str) -> tuple[np.ndarray, list]:
    """A background with 1-4 objects -> image (H, W, 3) uint8 and its annotated objects (dicts)."""
    long = int(rng.integers(side_px[0], side_px[1] + 1))
    short = round(long * rng.uniform(0.65, 1.0))
    width, height = (long, short) if rng.random() < 0.7 else (short, long)
    canvas = background(rng, width, height)
    n = int(rng.choice(4, p=[0.3, 0.3, 0.25, 0.15])) + 1
    classes = [first_class, *(str(c) for c in rng.choice(CLASSES_USED, n - 1))]
    alphas, full_px = [], []
    for cls in classes:
        # object size: log-uniform over a fraction of the shorter side, with a tail of small ones
        frac = np.exp(rng.uniform(np.log(0.08), np.log(0.2))) if rng.random() < 0.1 else \
            np.exp(rng.uniform(np.log(0.2), np.log(0.8)))
        rgb, alpha = instance(cls, rng, max(20, round(frac * short)))
        h, w = alpha.shape
        # at least three quarters of the object's width and height inside the image
        x0 = int(rng.integers(-(w // 4), max(-(w // 4), width - 3 * w // 4) + 1))
        y0 = int(rng.integers(-(h // 4), max(-(h // 4), height - 3 * h // 4) + 1))
        alphas.append(_paste(canvas, rgb, alpha, x0, y0))
        full_px.append(int((alpha > 0.5).sum()))
    image = np.clip(canvas, 0, 255).round().astype(np.uint8)
    return image, [o for o in _annotate(alphas, full_px, classes) if o is not None]


def _node(parent: ET.Element, tag: str, children=()) -> ET.Element:
    node = ET.SubElement(parent, tag)
    for child, text in children:
        ET.SubElement(node, child).text = str(text)
    return node


def _xml(image_id: str, width: int, height: int, objects: list[dict]) -> bytes:
    """A VOC2007-style annotation, tab-indented like the originals, without an XML declaration."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    _node(root, "source", [("database", "discoattr generated VOC2007"), ("annotation", "transfer.synthetic"),
                           ("image", "generated")])
    _node(root, "size", [("width", width), ("height", height), ("depth", 3)])
    ET.SubElement(root, "segmented").text = "0"
    for o in objects:
        obj = _node(root, "object", [("name", o["name"]), ("pose", "Unspecified"),
                                     ("truncated", o["truncated"]), ("difficult", o["difficult"])])
        _node(obj, "bndbox", zip(("xmin", "ymin", "xmax", "ymax"), o["box"]))
    ET.indent(root, "\t")
    return (ET.tostring(root, encoding="unicode") + "\n").encode()


def _splits(trainval: int, test: int, seed: int) -> dict[str, list[str]]:
    """Image ids 000001.. with test images interleaved among trainval ones as in VOC2007; train and val are
    random halves of trainval. Each list is sorted, like the devkit's."""
    rng = np.random.default_rng([seed, 0])
    ids = np.array([f"{i:06d}" for i in range(1, trainval + test + 1)])
    order = rng.permutation(len(ids))
    half = test + trainval // 2
    halves = {"test": order[:test], "train": order[test:half], "val": order[half:]}
    out = {name: sorted(ids[idx].tolist()) for name, idx in halves.items()}
    out["trainval"] = sorted(out["train"] + out["val"])
    return out


def _write(year: Path, splits: dict[str, list[str]], seed: int, side_px, progress: bool) -> None:
    """Images, annotations and ImageSets of one generated VOC2007 folder."""
    main = year / "ImageSets" / "Main"
    for sub in ("Annotations", "JPEGImages"):
        (year / sub).mkdir(parents=True)
    main.mkdir(parents=True)
    # the first object of the k-th image of a split cycles through the classes: every class in every split
    first = {i: CLASSES_USED[k % len(CLASSES_USED)]
             for s in ("trainval", "test") for k, i in enumerate(splits[s])}
    present = {}  # image id -> {class: 1 if a non-difficult instance, else 0}
    for image_id in tqdm(sorted(first), desc="generating VOC", unit="img", disable=not progress):
        image, objects = _scene(np.random.default_rng([seed, 1, int(image_id)]), side_px, first[image_id])
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "JPEG", quality=90)
        (year / "JPEGImages" / f"{image_id}.jpg").write_bytes(buf.getvalue())
        (year / "Annotations" / f"{image_id}.xml").write_bytes(_xml(image_id, image.shape[1], image.shape[0],
                                                                    objects))
        flags = present.setdefault(image_id, {})
        for o in objects:
            flags[o["name"]] = max(flags.get(o["name"], 0), 1 - o["difficult"])
    for split, ids in splits.items():
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for cls in VOC_CLASSES:  # the devkit's per-class lists: 1 present, 0 only difficult, -1 absent
            lines = (f"{i} {present[i].get(cls, -1):2d}\n" for i in ids)
            (main / f"{cls}_{split}.txt").write_text("".join(lines))


def make_voc(out_dir, *, trainval: int = 200, test: int = 100, seed: int = 0,
             image_side_px: tuple[int, int] = (200, 320), progress: bool = False) -> Path:
    """Generate (or reuse) out_dir/VOCdevkit -> its path. Reused as is when its synthetic.json stamp holds
    the same parameters; otherwise rebuilt in a temporary folder beside it and swapped in, so a reader never
    sees a half-written devkit. SyntheticError for bad parameters or a VOCdevkit that was not generated."""
    lo, hi = (int(v) for v in image_side_px)
    if trainval < 2 or test < 1 or seed < 0 or not 64 <= lo <= hi:
        raise SyntheticError(f"need trainval >= 2, test >= 1, seed >= 0 and 64 <= image_side_px[0] <= [1], "
                             f"got trainval={trainval}, test={test}, seed={seed}, "
                             f"image_side_px={image_side_px}")
    params = {"format": FORMAT_VERSION, "trainval": int(trainval), "test": int(test), "seed": int(seed),
              "image_side_px": [lo, hi], "classes": list(CLASSES_USED)}
    out_dir = Path(out_dir).expanduser()
    devkit, stamp = out_dir / "VOCdevkit", out_dir / "VOCdevkit" / "synthetic.json"
    if devkit.exists():
        if not stamp.is_file():
            raise SyntheticError(f"{devkit} exists but was not generated (no synthetic.json); "
                                 "not overwriting it")
        try:
            if json.loads(stamp.read_text()) == params:
                return devkit
        except (OSError, ValueError):
            pass  # an unreadable stamp: regenerate
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _build(out_dir, devkit, params, progress)
    except OSError as exc:  # a full disk, a read-only folder: what was there before is left as it was
        raise SyntheticError(f"cannot write the generated VOC set under {out_dir}: {exc}") from None
    return devkit


def _build(out_dir: Path, devkit: Path, params: dict, progress: bool) -> None:
    """Write a new devkit into a temporary folder, then swap it in for the old one (if any)."""
    tmp = Path(tempfile.mkdtemp(prefix=".VOCdevkit-new-", dir=out_dir))
    try:
        splits = _splits(params["trainval"], params["test"], params["seed"])
        _write(tmp / "VOC2007", splits, params["seed"], params["image_side_px"], progress)
        (tmp / "synthetic.json").write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")
        old = tmp.with_name(tmp.name + "-old")
        if devkit.exists():
            devkit.rename(old)  # a directory cannot be replaced in one rename; two renames, never half
        tmp.rename(devkit)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def object_counts(devkit, split: str) -> dict[str, tuple[int, int]]:
    """{class: (objects, difficult objects)} over a split of a devkit, read back with transfer.voc."""
    anns, _ = load_split(devkit, split)
    labels = np.concatenate([a.labels for a in anns])
    difficult = np.concatenate([a.difficult for a in anns])
    return {VOC_CLASSES[c - 1]: (int((labels == c).sum()), int(difficult[labels == c].sum()))
            for c in np.unique(labels)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m transfer.synthetic", description=__doc__.split("\n\n")[0],
                                epilog="Reruns with the same parameters reuse the existing set.")
    p.add_argument("--out", required=True, help="folder to hold VOCdevkit/ (created if missing)")
    p.add_argument("--trainval", type=int, default=200,
                   help="trainval images (train and val are its halves; default 200)")
    p.add_argument("--test", type=int, default=100, help="test images (default 100)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same files (default 0)")
    args = p.parse_args(argv)
    try:
        devkit = make_voc(args.out, trainval=args.trainval, test=args.test, seed=args.seed, progress=True)
        counts = {split: object_counts(devkit, split) for split in ("trainval", "test")}
    except VocError as exc:  # SyntheticError included
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(devkit)
    print(f"{'class':<12} {'trainval (difficult)':>21} {'test (difficult)':>17}")
    for cls in CLASSES_USED:
        (a, ad), (b, bd) = counts["trainval"].get(cls, (0, 0)), counts["test"].get(cls, (0, 0))
        print(f"{cls:<12} {a:>14} ({ad:>4}) {b:>10} ({bd:>4})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
