"""The two labelled sets of this project as image-folder trees, for `transfer/classify.py --data`.

    python -m transfer.export_sets digits --out runs/classify-data/digits
    python -m transfer.export_sets vocboxes --voc runs/voc-generated/VOCdevkit --out runs/classify-data/vocboxes

digits: scikit-learn's 1,797 handwritten digits, one PNG each in <out>/<digit>/ (8 x 8 as released; the
protocol resizes them as the shard builder does). vocboxes: every object square of a VOC devkit that the
`vocboxes` patch source takes (shards/voc_boxes.py: not difficult, at least 16 px a side, the square
around the box), cropped at full resolution into <out>/<class>/; its background squares are unlabelled
and left out. The same images the pretraining saw without labels, now with them, for the classifier.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from shards.sources import SourceError, list_items, load_image


def export(kind: str, source: str, out: str | Path) -> dict[str, int]:
    """Writes the set's labelled images as <out>/<class>/<name>.png -> images per class."""
    listing = list_items(source, kind=kind)
    out = Path(out)
    counts: dict[str, int] = {c: 0 for c in listing.classes}
    for item in tqdm(listing.items, desc=f"export {kind}", unit="image"):
        image = load_image(item)
        stem = item.key.replace("/", "_")
        crops = [(item.label, image, stem)] if not item.boxes else \
            [(lab, image[y0:y1, x0:x1], f"{stem}_{j}") for j, (x0, y0, x1, y1, lab) in enumerate(item.boxes)]
        for label, pixels, name in crops:
            if label < 0:  # unlabelled (background squares)
                continue
            cls = listing.classes[label]
            (out / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(out / cls / f"{name}.png")
            counts[cls] += 1
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m transfer.export_sets", description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=("digits", "vocboxes"))
    p.add_argument("--voc", default="", help="vocboxes: the VOCdevkit (or its VOC2007) folder")
    p.add_argument("--out", required=True, help="output folder (class subfolders are created)")
    args = p.parse_args(argv)
    if args.kind == "vocboxes" and not args.voc:
        print("error: vocboxes needs --voc DEVKIT", file=sys.stderr)
        return 2
    try:
        counts = export(args.kind, "digits" if args.kind == "digits" else args.voc, args.out)
    except SourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {sum(counts.values())} images of {len(counts)} classes to {args.out}: "
          + ", ".join(f"{c} {n}" for c, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
