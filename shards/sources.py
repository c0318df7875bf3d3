"""Image sources the shard builder reads.

A source lists lightweight, picklable `Item`s in a deterministic order (cheap: names only) and
`load_image(item)` decodes one of them to RGB uint8, which happens inside the Ray tasks.

Kinds:
  demo      the photos shipped inside scikit-image and scikit-learn (unlabelled)
  digits    scikit-learn's 1797 labelled 8x8 handwritten digits
  imagenet  a folder of class subfolders (ImageNet train layout); the class is metadata only
  folder    a flat folder of images
  tar       a tar archive of images
  voc       a VOC devkit (`VOCdevkit`, `VOCdevkit/VOC2007` or `.../JPEGImages`)
  vocboxes  a VOC devkit's object boxes as labelled patches, plus background (shards/voc_boxes.py)
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
KINDS = ("auto", "demo", "digits", "imagenet", "folder", "tar", "voc", "vocboxes")

# Natural photos that load from the installed packages without any download.
DEMO_SKIMAGE = (
    "astronaut", "camera", "chelsea", "coffee", "coins", "rocket", "hubble_deep_field",
    "immunohistochemistry", "retina", "brick", "grass", "gravel", "moon", "clock", "page", "text", "cell",
)
DEMO_SKLEARN = ("china.jpg", "flower.jpg")


class SourceError(ValueError):
    """A source that cannot be read; the message is one line for the user."""


@dataclass(frozen=True)
class Item:
    """One source image. `uri` is `file:PATH`, `tar:PATH`, `skimage:NAME`, `sklearn:NAME` or `digits:I`."""

    key: str
    uri: str
    label: int = -1
    offset: int = -1  # byte offset of the member's data inside a tar
    size: int = -1
    # fixed patches instead of random ones: (x0, y0, x1, y1, label) squares in image pixels
    boxes: tuple[tuple[int, int, int, int, int], ...] = ()


@dataclass(frozen=True)
class Listing:
    source: str
    kind: str
    items: list[Item]
    classes: list[str]


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _voc_images_dir(path: Path) -> Path | None:
    for cand in (path / "VOC2007" / "JPEGImages", path / "JPEGImages", path):
        if cand.name == "JPEGImages" and cand.is_dir():
            return cand
    return None


def detect_kind(source: str) -> str:
    if source in ("demo", "digits"):
        return source
    path = Path(source)
    if not path.exists():
        raise SourceError(f"source not found: {source}")
    if path.is_file():
        if tarfile.is_tarfile(path):
            return "tar"
        raise SourceError(f"source {source} is a file but not a tar archive")
    if _voc_images_dir(path) is not None:
        return "voc"
    if any(_is_image(p) for p in path.iterdir() if p.is_file()):
        return "folder"
    if any(p.is_dir() for p in path.iterdir()):
        return "imagenet"
    raise SourceError(f"source {source} holds no images")


def list_items(source: str, kind: str = "auto") -> Listing:
    """Lists the images of `source` in a deterministic order."""
    if kind not in KINDS:
        raise SourceError(f"unknown source kind {kind!r}; choose one of {', '.join(KINDS)}")
    kind = detect_kind(source) if kind == "auto" else kind
    if kind not in ("demo", "digits") and not Path(source).exists():
        raise SourceError(f"source not found: {source}")
    items, classes = _LISTERS[kind](source)
    if not items:
        raise SourceError(f"source {source} ({kind}) holds no images")
    return Listing(source=str(source), kind=kind, items=items, classes=classes)


def _list_demo(_: str):
    items = [Item(key=f"skimage/{n}", uri=f"skimage:{n}") for n in DEMO_SKIMAGE]
    items += [Item(key=f"sklearn/{n}", uri=f"sklearn:{n}") for n in DEMO_SKLEARN]
    return items, []


def _list_digits(_: str):
    labels = _digits()[1]
    items = [Item(key=f"digits/{i:04d}", uri=f"digits:{i}", label=int(y)) for i, y in enumerate(labels)]
    return items, [str(c) for c in range(10)]


def _list_imagenet(source: str):
    root = Path(source)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    items = []
    for label, cls in enumerate(classes):
        for p in sorted((root / cls).rglob("*")):
            if p.is_file() and _is_image(p):
                items.append(Item(key=str(p.relative_to(root)), uri=f"file:{p}", label=label))
    return items, classes


def _list_folder(source: str):
    root = Path(source)
    files = sorted(p for p in root.iterdir() if p.is_file() and _is_image(p))
    return [Item(key=p.name, uri=f"file:{p}") for p in files], []


def _list_voc(source: str):
    images = _voc_images_dir(Path(source))
    if images is None:
        raise SourceError(f"no JPEGImages folder under {source}")
    files = sorted(p for p in images.iterdir() if p.is_file() and _is_image(p))
    return [Item(key=f"voc/{p.stem}", uri=f"file:{p}") for p in files], []


def _list_vocboxes(source: str):
    from shards.voc_boxes import list_boxes

    images = _voc_images_dir(Path(source))
    if images is None or not (images.parent / "Annotations").is_dir():
        raise SourceError(f"no JPEGImages and Annotations folders under {source}")
    listed, classes = list_boxes(images.parent)
    items = [Item(key=f"voc/{image_id}", uri=f"file:{path}", boxes=boxes) for image_id, path, boxes in listed
             if boxes]
    return items, classes


def _list_tar(source: str):
    items = []
    try:
        # plain tars only: members are read in place by offset, which a compressed stream cannot do
        with tarfile.open(source, "r:") as tar:
            for m in tar:
                if m.isreg() and _is_image(Path(m.name)):
                    items.append(Item(key=m.name, uri=f"tar:{source}", offset=m.offset_data, size=m.size))
    except (tarfile.TarError, EOFError) as exc:
        if not items:
            raise SourceError(f"cannot read {source} as an uncompressed tar ({str(exc).splitlines()[0]}); "
                              "decompress it first") from None
    items.sort(key=lambda it: it.key)
    return items, []


_LISTERS = {
    "demo": _list_demo, "digits": _list_digits, "imagenet": _list_imagenet,
    "folder": _list_folder, "voc": _list_voc, "tar": _list_tar, "vocboxes": _list_vocboxes,
}


def source_fingerprint(listing: Listing) -> str:
    """A hash of what the source holds (names, sizes, mtimes; package versions for the built-in
    sets): a changed source makes the shard stage run again."""
    h = hashlib.sha256(f"{listing.kind}:{listing.source}".encode())
    if listing.kind in ("demo", "digits"):
        import skimage
        import sklearn

        h.update(f"{skimage.__version__}/{sklearn.__version__}".encode())
    paths = {it.uri.partition(":")[2] for it in listing.items if it.uri.startswith(("file:", "tar:"))}
    for it in listing.items:
        h.update(f"{it.key}|{it.label}|{it.offset}|{it.size}{f'|{it.boxes}' if it.boxes else ''}\n".encode())
    for p in sorted(paths):
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """Any 2-D/3-D image array (bool, float in [0, 1], uint8; gray, RGB, RGBA) -> (H, W, 3) uint8."""
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    elif img.dtype != np.uint8:
        img = np.clip(np.asarray(img, np.float64) * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def _decode_bytes(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def load_image(item: Item) -> np.ndarray:
    """Decodes one item -> (H, W, 3) uint8. Raises OSError/ValueError on an unreadable image."""
    scheme, _, rest = item.uri.partition(":")
    if scheme == "file":
        with Image.open(rest) as im:
            return np.asarray(im.convert("RGB"))
    if scheme == "tar":
        with open(rest, "rb") as f:
            f.seek(item.offset)
            return _decode_bytes(f.read(item.size))
    if scheme == "skimage":
        import skimage.data

        return to_rgb_uint8(getattr(skimage.data, rest)())
    if scheme == "sklearn":
        from sklearn.datasets import load_sample_image

        return to_rgb_uint8(load_sample_image(rest))
    if scheme == "digits":
        return to_rgb_uint8(_digits()[0][int(rest)] * (255.0 / 16.0))
    raise ValueError(f"unknown item uri {item.uri}")
