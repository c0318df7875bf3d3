"""Labelled image sets for the classification transfer (paper sec. 4.2, Table 3), with their protocols.

    stl10       the STL-10 binary release (`stl10_binary/`): the 10 predefined folds of 1,000 training
                images, each scored on all 8,000 test images (Coates et al. 2011)
    caltech101  an image-folder tree (`101_ObjectCategories/<class>/*.jpg`, BACKGROUND_Google left out):
                N random training images per class and up to M of the rest for testing, over seeded
                splits (Exemplar-CNN's protocol, which the paper follows: 30 / 50, 10 splits)
    folder      any ImageNet-layout tree: `<class>/*.jpg` split per class by a seeded fraction, or
                `train/<class>/` + `val/<class>/` (or `test/`) used as given

A `LabelledSet` holds where the pixels are (`ImageSource`, picklable, so a Ray task can read its own
slice), one label per image, the class names and the splits as (train indices, test indices). Reading
checks the layout: a wrong tree or a truncated binary raises `DataError` with a one-line message.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PROTOCOLS = ("folder", "stl10", "caltech101")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
STL10_PX = 96
STL10_BYTES = 3 * STL10_PX * STL10_PX
STL10_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "fold_indices.txt")
CALTECH_BACKGROUND = "BACKGROUND_Google"  # clutter, not a category: left out as in [13]
FIXED_SPLITS = (("train", "val"), ("train", "test"))  # a folder with these subfolders keeps its split


class DataError(ValueError):
    """A data folder or file that does not have the protocol's layout; the message is one line."""


@dataclass(frozen=True)
class ImageSource:
    """Where a set's pixels are. kind "files": one image file per index; kind "stl10": the two binaries
    (train_X then test_X) read by byte range."""

    kind: str
    files: tuple[str, ...] = ()
    binaries: tuple[str, ...] = ()
    counts: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.files) if self.kind == "files" else int(sum(self.counts))

    def load(self, index: int) -> np.ndarray:
        """Image `index` -> (H, W, 3) uint8."""
        if self.kind == "files":
            try:
                with Image.open(self.files[index]) as im:
                    return np.asarray(im.convert("RGB"))
            except (OSError, ValueError, SyntaxError) as exc:  # PIL's ways to fail on a bad file
                raise DataError(f"{self.files[index]}: not a readable image ({exc})") from None
        for path, count in zip(self.binaries, self.counts):
            if index < count:
                return read_stl10_images(path, index, 1)[0]
            index -= count
        raise IndexError(index)


@dataclass(frozen=True)
class LabelledSet:
    protocol: str
    root: str
    source: ImageSource
    labels: np.ndarray  # (N,) int64 in [0, len(classes))
    classes: tuple[str, ...]
    splits: tuple[tuple[np.ndarray, np.ndarray], ...]  # (train indices, test indices) per fold or split

    def summary(self) -> dict:
        return {"protocol": self.protocol, "root": self.root, "images": len(self.labels),
                "classes": len(self.classes), "splits": len(self.splits),
                "train_per_split": [len(tr) for tr, _ in self.splits],
                "test_per_split": [len(te) for _, te in self.splits]}


# --- STL-10 ---------------------------------------------------------------------------------------------

def read_stl10_images(path: str | Path, start: int, count: int) -> np.ndarray:
    """Images start .. start + count of an STL-10 `*_X.bin` -> (count, 96, 96, 3) uint8 (one ranged read).

    The release stores each image as 3 planes of 96 x 96 in column-major order."""
    with open(path, "rb") as f:
        f.seek(start * STL10_BYTES)
        data = f.read(count * STL10_BYTES)
    if len(data) != count * STL10_BYTES:
        raise DataError(f"{path}: truncated (images {start}..{start + count - 1} not all there)")
    return np.frombuffer(data, np.uint8).reshape(count, 3, STL10_PX, STL10_PX).transpose(0, 3, 2, 1).copy()


def write_stl10(out: str | Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                folds: list[np.ndarray], classes: list[str] | None = None) -> Path:
    """Writes (images (N, 96, 96, 3) uint8, labels 0-based) pairs in the STL-10 binary layout (labels
    1-based on disk, as released) -> the `stl10_binary` folder. For tests and for converting a set."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, (x, y) in (("train", train), ("test", test)):
        (out / f"{name}_X.bin").write_bytes(np.ascontiguousarray(x.transpose(0, 3, 2, 1)).tobytes())
        (out / f"{name}_y.bin").write_bytes((np.asarray(y) + 1).astype(np.uint8).tobytes())
    (out / "fold_indices.txt").write_text("".join(" ".join(map(str, f)) + "\n" for f in folds))
    if classes:
        (out / "class_names.txt").write_text("\n".join(classes) + "\n")
    return out


def _stl10_dir(root: Path) -> Path:
    for cand in (root, root / "stl10_binary"):
        if all((cand / f).is_file() for f in STL10_FILES):
            return cand
    missing = [f for f in STL10_FILES if not (root / f).is_file() and not (root / "stl10_binary" / f).is_file()]
    raise DataError(f"{root}: not an STL-10 binary folder (missing {', '.join(missing)})")


def _stl10_labels(path: Path, n_images: int) -> np.ndarray:
    y = np.frombuffer(path.read_bytes(), np.uint8).astype(np.int64) - 1
    if len(y) != n_images:
        raise DataError(f"{path}: {len(y)} labels for {n_images} images (truncated?)")
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{path}: labels must be 1..10, found {y.min() + 1}..{y.max() + 1}")
    return y


def read_stl10(root: str | Path) -> LabelledSet:
    """The STL-10 binary release: train images then test images; split k = (fold k, all test images)."""
    d = _stl10_dir(Path(root))
    counts = []
    for name in ("train", "test"):
        size = (d / f"{name}_X.bin").stat().st_size
        if size == 0 or size % STL10_BYTES:
            raise DataError(f"{d / f'{name}_X.bin'}: {size} bytes is not a whole number of 96x96x3 images "
                            "(truncated?)")
        counts.append(size // STL10_BYTES)
    y_train = _stl10_labels(d / "train_y.bin", counts[0])
    y_test = _stl10_labels(d / "test_y.bin", counts[1])
    folds = []
    for k, line in enumerate((d / "fold_indices.txt").read_text().splitlines()):
        if not line.strip():
            continue
        try:
            idx = np.array([int(t) for t in line.split()], np.int64)
        except ValueError:
            raise DataError(f"{d / 'fold_indices.txt'}: line {k + 1} is not a list of integers") from None
        if len(idx) == 0 or idx.min() < 0 or idx.max() >= counts[0]:
            raise DataError(f"{d / 'fold_indices.txt'}: fold {k + 1} indexes outside the {counts[0]} "
                            "training images")
        folds.append(idx)
    if not folds:
        raise DataError(f"{d / 'fold_indices.txt'}: no folds")
    names = d / "class_names.txt"
    classes = tuple(names.read_text().split()) if names.is_file() else tuple(str(c) for c in range(1, 11))
    test_idx = np.arange(counts[0], counts[0] + counts[1])
    source = ImageSource("stl10", binaries=(str(d / "train_X.bin"), str(d / "test_X.bin")), counts=tuple(counts))
    return LabelledSet("stl10", str(d), source, np.concatenate([y_train, y_test]), classes,
                       tuple((f, test_idx) for f in folds))


# --- image-folder trees ---------------------------------------------------------------------------------

def _class_tree(root: Path, exclude: tuple[str, ...] = ()) -> tuple[tuple[str, ...], list[list[str]]]:
    """<root>/<class>/**/*.jpg -> (class names sorted, image paths per class sorted)."""
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in exclude
                     and not p.name.startswith("."))
    files = []
    for cls in classes:
        found = []
        for dirpath, _, names in os.walk(root / cls):
            found += [os.path.join(dirpath, n) for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
        files.append(sorted(found))
    empty = [c for c, f in zip(classes, files) if not f]
    if len(classes) < 2 or empty:
        why = f"class folders without images: {', '.join(empty[:5])}" if empty else \
            f"{len(classes)} class folder(s), at least 2 needed"
        raise DataError(f"{root}: not an image-folder tree <class>/<image> ({why})")
    return tuple(classes), files


def _flatten(files: list[list[str]]) -> tuple[tuple[str, ...], np.ndarray]:
    paths = tuple(p for f in files for p in f)
    labels = np.concatenate([np.full(len(f), c, np.int64) for c, f in enumerate(files)])
    return paths, labels


def per_class_splits(labels: np.ndarray, *, train_per_class: int = 0, train_fraction: float = 0.5,
                     test_per_class: int = 0, splits: int = 1, seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Seeded splits drawn per class: `train_per_class` images (or a `train_fraction` of the class) for
    training, the rest (at most `test_per_class` of it, 0 = all) for testing. Each split its own draw."""
    out = []
    for s in range(splits):
        rng = np.random.default_rng([seed, s])
        train, test = [], []
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            n = train_per_class or max(1, int(round(train_fraction * len(idx))))
            rest = idx[n:]
            train.append(idx[:n])
            test.append(rest[:test_per_class] if test_per_class else rest)
        out.append((np.sort(np.concatenate(train)), np.sort(np.concatenate(test))))
    return tuple(out)


def read_caltech101(root: str | Path, *, train_per_class: int = 30, test_per_class: int = 50, splits: int = 10,
                    seed: int = 0) -> LabelledSet:
    """Caltech-101: `root` is `101_ObjectCategories` or a folder holding it."""
    root = Path(root)
    if (root / "101_ObjectCategories").is_dir():
        root = root / "101_ObjectCategories"
    classes, files = _class_tree(root, exclude=(CALTECH_BACKGROUND,))
    short = [f"{c} ({len(f)})" for c, f in zip(classes, files) if len(f) <= train_per_class]
    if short:
        raise DataError(f"{root}: {len(short)} class(es) have no image left for testing after "
                        f"{train_per_class} training images: {', '.join(short[:4])}")
    paths, labels = _flatten(files)
    parts = per_class_splits(labels, train_per_class=train_per_class, test_per_class=test_per_class,
                             splits=splits, seed=seed)
    return LabelledSet("caltech101", str(root), ImageSource("files", files=paths), labels, classes, parts)


def read_folder(root: str | Path, *, train_fraction: float = 0.5, train_per_class: int = 0, splits: int = 1,
                seed: int = 0) -> LabelledSet:
    """An ImageNet-layout tree; `train/` + `val/` (or `test/`) subfolders are used as the one split."""
    root = Path(root)
    for tr, te in FIXED_SPLITS:
        if (root / tr).is_dir() and (root / te).is_dir():
            classes, train_files = _class_tree(root / tr)
            test_classes, test_files = _class_tree(root / te)
            if test_classes != classes:
                raise DataError(f"{root}: {tr}/ and {te}/ hold different classes "
                                f"({len(classes)} vs {len(test_classes)})")
            (p_train, y_train), (p_test, y_test) = _flatten(train_files), _flatten(test_files)
            split = (np.arange(len(p_train)), np.arange(len(p_train), len(p_train) + len(p_test)))
            return LabelledSet("folder", str(root), ImageSource("files", files=p_train + p_test),
                               np.concatenate([y_train, y_test]), classes, (split,))
    classes, files = _class_tree(root)
    single = [c for c, f in zip(classes, files) if len(f) < 2]
    if single:
        raise DataError(f"{root}: class(es) with one image cannot be split: {', '.join(single[:5])}")
    paths, labels = _flatten(files)
    parts = per_class_splits(labels, train_per_class=train_per_class, train_fraction=train_fraction,
                             splits=splits, seed=seed)
    return LabelledSet("folder", str(root), ImageSource("files", files=paths), labels, classes, parts)
