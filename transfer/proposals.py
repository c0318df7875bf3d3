"""Object proposals for Fast R-CNN: selective search (OpenCV contrib `ximgproc`), cached on disk.

Boxes follow the transfer/ convention: (K, 4) float32 x1, y1, x2, y2, 0-based, inclusive pixels.
Selective search runs on the image shrunk so its longer side is at most `max_side_px` (as R-CNN
did, it is slow on big images) and its boxes are mapped back to the original pixels here; a
detector's loader then rescales them WITH its own resized image (`scale_boxes`): forgetting either
step is a known cause of near-zero mAP.

The cache is `cache_dir/<hash of settings>/chunk-XXXXX.npz` (keys = image ids) plus `settings.json`.
Each chunk is one task of the `map_fn` it is given (`infra.ray_edge.serial_map` / `ray_map`) and is
written atomically as soon as it finishes, so a killed run keeps its finished chunks. A chunk also
holds `__sources__`, (n, 2) str rows [image id, "file name:size in bytes"]: an id whose image file
changed (another data set under the same cache) is recomputed rather than served stale boxes.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import re
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from PIL import Image

from infra.storage import atomic_write_json, atomic_write_npz

log = logging.getLogger(__name__)

SETTINGS_KEYS = ("mode", "max_side_px", "min_size_px", "max_boxes")
_FORMAT = 1  # part of the cache hash: bump when the boxes a setting produces change
_SOURCES = "__sources__"


class ProposalError(ValueError):
    """A one-line message for the user (bad proposal file, bad settings)."""


def _seed_ranking() -> None:
    # OpenCV ranks regions by level x C `rand()`: seeding libc's generator makes the boxes a function
    # of the image alone (same in a Ray task, a serial run, or a recomputed chunk)
    try:
        ctypes.CDLL(None).srand(0)
    except (OSError, AttributeError, TypeError):  # no libc symbols to reach (not Linux/macOS): order stays random
        pass


def selective_search(image: np.ndarray, *, mode: str = "fast", max_side_px: int = 500, min_size_px: int = 4,
                     max_boxes: int = 2000) -> np.ndarray:
    """image (H, W, 3) uint8 RGB -> boxes (K, 4) float32 in the ORIGINAL image's pixels, K <= max_boxes,
    in selective search's ranking order; boxes with a side under `min_size_px` (original pixels) dropped."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ProposalError(f"selective_search needs an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    if mode not in ("fast", "quality"):
        raise ProposalError(f"selective search mode must be fast or quality, got {mode!r}")
    if not hasattr(cv2, "ximgproc"):
        raise ProposalError("cv2.ximgproc is missing: install only opencv-contrib-python-headless "
                            "(a second OpenCV package shadows it)")
    h, w = image.shape[:2]
    f = min(1.0, max_side_px / max(h, w))
    small_w, small_h = max(1, round(w * f)), max(1, round(h * f))
    bgr = np.ascontiguousarray(image[:, :, ::-1])  # OpenCV wants BGR (its HSV/Lab conversions assume it)
    if f < 1.0:
        bgr = cv2.resize(bgr, (small_w, small_h), interpolation=cv2.INTER_AREA)
    # one thread: parallelism comes from one task per core; OpenCV's pool would oversubscribe them
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        ss.setBaseImage(bgr)
        if mode == "fast":
            ss.switchToSelectiveSearchFast()
        else:
            ss.switchToSelectiveSearchQuality()
        _seed_ranking()
        rects = np.asarray(ss.process(), np.float64).reshape(-1, 4)  # (x, y, w, h) in the small image
    finally:
        cv2.setNumThreads(threads)
    # map pixel EDGES back: small pixels x..x+w-1 cover [x, x+w) -> [x*sx, (x+w)*sx) in the original
    sx, sy = w / small_w, h / small_h
    x, y, bw, bh = rects.T
    boxes = np.stack([np.round(x * sx), np.round(y * sy),
                      np.round((x + bw) * sx) - 1, np.round((y + bh) * sy) - 1], axis=1)
    boxes = clip_boxes(boxes, h, w)
    keep = ((boxes[:, 2] - boxes[:, 0] + 1) >= min_size_px) & ((boxes[:, 3] - boxes[:, 1] + 1) >= min_size_px)
    boxes = boxes[keep]
    _, first = np.unique(boxes, axis=0, return_index=True)  # duplicates after rounding: keep the first
    return boxes[np.sort(first)][:max_boxes].astype(np.float32)


def scale_boxes(boxes: np.ndarray, scale: float) -> np.ndarray:
    """boxes (K, 4) -> boxes * scale (float32): the image was resized by `scale` (Fast R-CNN style)."""
    return (np.asarray(boxes, np.float32) * np.float32(scale)).astype(np.float32)


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """boxes (K, 4) in an image `width` pixels wide -> the same boxes in its horizontal mirror image."""
    b = np.asarray(boxes, np.float32)
    return np.stack([width - 1 - b[:, 2], b[:, 1], width - 1 - b[:, 0], b[:, 3]], axis=1).astype(np.float32)


def clip_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """boxes (K, 4) -> float32 boxes clipped to x in [0, width - 1], y in [0, height - 1]."""
    b = np.asarray(boxes, np.float32).copy()
    b[:, 0::2] = b[:, 0::2].clip(0, width - 1)
    b[:, 1::2] = b[:, 1::2].clip(0, height - 1)
    return b


def _source(path: str) -> str:
    p = Path(path)
    return f"{p.name}:{p.stat().st_size if p.is_file() else -1}"


def _chunk_task(ids: Sequence[str], paths: Sequence[str], settings: dict) -> dict[str, np.ndarray]:
    """One map_fn task: selective search on each image -> {image id: boxes (K, 4) float32}."""
    out = {}
    for image_id, path in zip(ids, paths):
        with Image.open(path) as im:
            out[image_id] = selective_search(np.asarray(im.convert("RGB")), **settings)
    return out


def settings_folder(cache_dir: str | Path, settings: dict) -> Path:
    """The cache folder of one set of selective-search settings."""
    text = json.dumps({"settings": settings, "format": _FORMAT}, sort_keys=True)
    return Path(cache_dir) / hashlib.sha256(text.encode()).hexdigest()[:12]


def _read_cache(folder: Path, wanted: dict[str, str]) -> tuple[dict[str, np.ndarray], int]:
    """{id: boxes} for the ids of `wanted` (id -> source) cached with the same source; the next chunk number."""
    found, last = {}, -1
    for f in sorted(folder.glob("chunk-*.npz")):
        m = re.fullmatch(r"chunk-(\d+)\.npz", f.name)
        last = max(last, int(m.group(1))) if m else last
        try:
            with np.load(f, allow_pickle=False) as z:
                sources = dict(z[_SOURCES].tolist()) if _SOURCES in z.files else {}
                for image_id in set(z.files) & wanted.keys() - found.keys():
                    if sources.get(image_id) == wanted[image_id]:
                        found[image_id] = z[image_id]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            log.warning("ignoring unreadable proposal cache file %s: %s", f, e)
    return found, last + 1


def compute_proposals(ids: Sequence[str], image_paths: Sequence[str], cache_dir: str | Path, *, settings: dict,
                      map_fn: Callable, chunk_size: int = 16) -> dict[str, np.ndarray]:
    """Selective search for every image, through the cache -> {image id: boxes (K, 4) float32}.

    `settings`: keyword arguments of `selective_search` (SETTINGS_KEYS); `map_fn`: serial_map or
    ray_map. Only ids missing from the cache are computed, `chunk_size` images per task."""
    if unknown := set(settings) - set(SETTINGS_KEYS):
        raise ProposalError(f"unknown proposal settings {sorted(unknown)}; valid: {list(SETTINGS_KEYS)}")
    if len(ids) != len(image_paths):
        raise ProposalError(f"{len(ids)} image ids but {len(image_paths)} image paths")
    path_of = dict(zip(ids, map(str, image_paths)))
    folder = settings_folder(cache_dir, settings)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "settings.json", {"settings": settings, "format": _FORMAT, "opencv": cv2.__version__})
    wanted = {i: _source(p) for i, p in path_of.items()}
    found, next_chunk = _read_cache(folder, wanted)
    missing = [i for i in path_of if i not in found]
    log.info("proposals: %d of %d images cached in %s", len(found), len(path_of), folder)
    chunks = [missing[s:s + chunk_size] for s in range(0, len(missing), chunk_size)]

    def save(k: int, result: dict[str, np.ndarray]) -> None:
        sources = np.array([[i, wanted[i]] for i in chunks[k]], dtype=str).reshape(-1, 2)
        atomic_write_npz(folder / f"chunk-{next_chunk + k:05d}.npz", **result, **{_SOURCES: sources})

    if chunks:
        results = map_fn(_chunk_task, [(c, [path_of[i] for i in c], dict(settings)) for c in chunks],
                         desc="selective search", num_cpus=1, on_result=save)
        for result in results:
            found.update(result)
    return {i: found[i] for i in ids}


def load_precomputed(path: str | Path, ids: Sequence[str]) -> dict[str, np.ndarray]:
    """User-supplied proposals: an .npz with one array per image id, (K, 4) x1, y1, x2, y2 float, 0-based
    inclusive pixels of the original image (Fast R-CNN's MATLAB files are 1-based y1, x1, y2, x2:
    convert with `b[:, [1, 0, 3, 2]] - 1`). -> {image id: boxes (K, 4) float32}."""
    path = Path(path)
    if not path.is_file():
        raise ProposalError(f"proposal file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            names = set(z.files)
            out = {i: z[i] for i in ids if i in names}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ProposalError(f"cannot read {path} as an .npz of boxes: {str(e).splitlines()[0]}") from None
    if missing := [i for i in ids if i not in out]:
        raise ProposalError(f"{len(missing)} of {len(ids)} image ids missing from {path}, first: {missing[0]!r}")
    for image_id, b in out.items():
        if b.ndim != 2 or b.shape[1] != 4 or not np.issubdtype(b.dtype, np.number):
            raise ProposalError(f"proposals for {image_id!r} in {path} have shape {b.shape} {b.dtype}, "
                                "want (K, 4) numbers x1, y1, x2, y2")
        out[image_id] = b.astype(np.float32)
    return out


def proposal_recall(proposals: list[np.ndarray], gt_boxes: list[np.ndarray], iou: float = 0.5) -> float:
    """Fraction of ground-truth boxes (all images) with some proposal of IoU >= iou (+1 pixel area
    convention); proposals[i] (K, 4), gt_boxes[i] (G, 4). NaN without ground truth."""
    from torchvision.ops import box_iou

    if len(proposals) != len(gt_boxes):
        raise ValueError(f"{len(proposals)} proposal arrays for {len(gt_boxes)} images")
    plus_one = np.array([0, 0, 1, 1], np.float64)  # inclusive pixels -> box_iou's continuous corners
    covered = total = 0
    for props, gt in zip(proposals, gt_boxes):
        total += len(gt)
        if len(gt) and len(props):
            overlaps = box_iou(_tensor(gt, plus_one), _tensor(props, plus_one))
            covered += int((overlaps.max(dim=1).values >= iou).sum())
    return covered / total if total else float("nan")


def _tensor(boxes: np.ndarray, plus_one: np.ndarray):
    import torch

    return torch.from_numpy(np.asarray(boxes, np.float64).reshape(-1, 4) + plus_one)
