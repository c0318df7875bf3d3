"""Fast R-CNN minibatches: a split's images, boxes and proposals in one file, resized images, RoI sampling.

The driver writes each split as a `roidb` file (`data/<split>.npz`: image paths and sizes, ground
truth, proposals), so a training process (local or a Ray Train worker) needs nothing but that file.

Every image is resized by one factor so its shorter side is `scale_px` with the longer side at most
`max_size_px` (Fast R-CNN's single scale, 600/1000); ground truth and proposals are multiplied by the
same factor, and mirrored with the image. A batch is `images_per_batch` images with `rois_per_batch`
RoIs in all: up to `fg_fraction` foreground (IoU >= fg_iou with a ground-truth box, labelled with its
class), the rest background (IoU in [bg_lo, bg_hi), label 0). Difficult objects are left out of
training, as in Fast R-CNN. Images are drawn epoch by epoch from a permutation seeded by (seed,
epoch) and every sample's randomness from (seed, rank, iteration, slot), so a resumed run sees the
batches the killed one would have.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou

from pretrain.models.inputs import MEAN, STD
from infra.storage import atomic_write_npz, local_copy
from transfer.proposals import flip_boxes, scale_boxes


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """One image's objects, as transfer.voc_eval reads them."""

    boxes: np.ndarray  # (G, 4) float32
    labels: np.ndarray  # (G,) int64
    difficult: np.ndarray  # (G,) bool


@dataclass(frozen=True, eq=False)
class RoiDB:
    """One split, flat: image i's ground truth is rows gt_offsets[i]:gt_offsets[i+1] of the gt_*
    arrays, its proposals rows prop_offsets[i]:prop_offsets[i+1] of `proposals`."""

    ids: np.ndarray  # (N,) str
    paths: np.ndarray  # (N,) str
    sizes: np.ndarray  # (N, 2) int64: height, width
    gt_boxes: np.ndarray  # (G, 4) float32
    gt_labels: np.ndarray  # (G,) int64 in 1..C
    gt_difficult: np.ndarray  # (G,) bool
    gt_offsets: np.ndarray  # (N + 1,) int64
    proposals: np.ndarray  # (P, 4) float32
    prop_offsets: np.ndarray  # (N + 1,) int64

    def __len__(self) -> int:
        return len(self.ids)

    def gt(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = slice(self.gt_offsets[i], self.gt_offsets[i + 1])
        return self.gt_boxes[s], self.gt_labels[s], self.gt_difficult[s]

    def ground_truth(self) -> list[GroundTruth]:
        return [GroundTruth(*self.gt(i)) for i in range(len(self))]

    def boxes(self, i: int) -> np.ndarray:
        return self.proposals[self.prop_offsets[i]:self.prop_offsets[i + 1]]

    def image(self, i: int) -> np.ndarray:
        with Image.open(self.paths[i]) as im:
            return np.asarray(im.convert("RGB"))


def _offsets(counts) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def write_roidb(path: str | Path, annotations: list, proposals: dict[str, np.ndarray]) -> Path:
    """annotations: transfer.voc.Annotation list; proposals: image id -> (K, 4) float32 -> `path` (.npz)."""
    props = [np.asarray(proposals[a.image_id], np.float32).reshape(-1, 4) for a in annotations]
    arrays = dict(
        ids=np.array([a.image_id for a in annotations]), paths=np.array([str(a.image_path) for a in annotations]),
        sizes=np.array([[a.height, a.width] for a in annotations], np.int64).reshape(-1, 2),
        gt_boxes=np.concatenate([a.boxes for a in annotations] + [np.zeros((0, 4), np.float32)]).astype(np.float32),
        gt_labels=np.concatenate([a.labels for a in annotations] + [np.zeros(0, np.int64)]).astype(np.int64),
        gt_difficult=np.concatenate([a.difficult for a in annotations] + [np.zeros(0, bool)]).astype(bool),
        gt_offsets=_offsets([len(a.boxes) for a in annotations]),
        proposals=np.concatenate(props + [np.zeros((0, 4), np.float32)]), prop_offsets=_offsets([len(p) for p in props]),
    )
    return atomic_write_npz(path, **arrays)


def read_roidb(path) -> RoiDB:
    """A roidb file (a path or URI, fetched once per node)."""
    with np.load(local_copy(path), allow_pickle=False) as z:
        return RoiDB(**{k: z[k] for k in z.files})


def prepare_image(image: np.ndarray, scale_px: int, max_size_px: int) -> tuple[torch.Tensor, float]:
    """(H, W, 3) uint8 -> ((3, h, w) float32 normalised like pretraining, the resize factor)."""
    h, w = image.shape[:2]
    scale = min(scale_px / min(h, w), max_size_px / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resized = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR) if scale != 1 else image
    x = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).float().div_(255)
    return (x - MEAN) / STD, scale


def box_overlaps(boxes: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU (N, G) with inclusive pixel boxes (+1 widths, as VOC and Fast R-CNN)."""
    if len(boxes) == 0 or len(gt) == 0:
        return np.zeros((len(boxes), len(gt)), np.float32)
    a, b = torch.from_numpy(boxes).float().clone(), torch.from_numpy(gt).float().clone()
    a[:, 2:] += 1
    b[:, 2:] += 1
    return box_iou(a, b).numpy()


def sample_rois(boxes: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray, *, num_rois: int,
                fg_fraction: float, fg_iou: float, bg_iou: tuple[float, float], rng: np.random.Generator):
    """Fast R-CNN's RoI sampling over candidates `boxes` (proposals and ground truth), (P, 4).

    -> rois (R, 4) float32, labels (R,) int64 (0 = background), targets (R, 4) float32 (the matched
    ground-truth box; meaningful for foreground only). R <= num_rois when candidates run short."""
    overlaps = box_overlaps(boxes, gt_boxes)
    best = overlaps.max(1) if overlaps.shape[1] else np.zeros(len(boxes), np.float32)
    match = overlaps.argmax(1) if overlaps.shape[1] else np.zeros(len(boxes), np.int64)
    fg = np.flatnonzero(best >= fg_iou)
    bg = np.flatnonzero((best >= bg_iou[0]) & (best < bg_iou[1]))
    n_fg = min(int(round(fg_fraction * num_rois)), len(fg))
    fg = rng.choice(fg, n_fg, replace=False) if n_fg < len(fg) else fg
    n_bg = min(num_rois - n_fg, len(bg))
    bg = rng.choice(bg, n_bg, replace=False) if n_bg < len(bg) else bg
    keep = np.concatenate([fg, bg]).astype(np.int64)
    labels = np.zeros(len(keep), np.int64)
    labels[:len(fg)] = gt_labels[match[fg]]
    targets = gt_boxes[match[keep]] if len(gt_boxes) else np.zeros((len(keep), 4), np.float32)
    return boxes[keep].astype(np.float32), labels, targets.astype(np.float32)


def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


class TrainImages(torch.utils.data.Dataset):
    """Item (image index, flip, seed) -> one image's training sample: dict(image (3, h, w), rois (R, 4),
    labels (R,), targets (R, 4)), boxes in the resized (and mirrored) image's pixels."""

    def __init__(self, db: RoiDB, *, scale_px: int, max_size_px: int, rois_per_image: int, fg_fraction: float,
                 fg_iou: float, bg_iou: tuple[float, float]):
        self.db, self.scale_px, self.max_size_px = db, scale_px, max_size_px
        self.sampling = dict(num_rois=rois_per_image, fg_fraction=fg_fraction, fg_iou=fg_iou, bg_iou=bg_iou)

    def __len__(self) -> int:
        return len(self.db)

    def __getitem__(self, item: tuple[int, bool, int]) -> dict:
        i, flip, seed = item
        image, scale = prepare_image(self.db.image(i), self.scale_px, self.max_size_px)
        boxes, labels, difficult = self.db.gt(i)
        gt, gt_labels = boxes[~difficult], labels[~difficult]
        candidates = np.concatenate([self.db.boxes(i), gt])  # ground truth is a candidate too (Fast R-CNN)
        candidates, gt = scale_boxes(candidates, scale), scale_boxes(gt, scale)
        if flip:
            image = image.flip(-1)
            candidates, gt = flip_boxes(candidates, image.shape[-1]), flip_boxes(gt, image.shape[-1])
        rois, roi_labels, targets = sample_rois(candidates, gt, gt_labels, rng=np.random.default_rng(seed),
                                                **self.sampling)
        return {"image": image, "rois": torch.from_numpy(rois), "labels": torch.from_numpy(roi_labels),
                "targets": torch.from_numpy(targets)}


class BatchOrder(torch.utils.data.Sampler):
    """Per iteration from `start`, one list of (image index, flip, seed) items for this rank.

    Images come epoch by epoch from a permutation seeded by (seed, epoch); rank r of W takes the
    global slots (it * W + r) * images_per_batch + j, so ranks see different images."""

    def __init__(self, usable: np.ndarray, *, images_per_batch: int, iterations: int, seed: int, flip: bool,
                 rank: int = 0, world_size: int = 1, start: int = 0):
        self.usable, self.ipb, self.iterations = np.asarray(usable, np.int64), images_per_batch, iterations
        self.seed, self.flip, self.rank, self.world, self.start = seed, flip, rank, world_size, start
        if len(self.usable) == 0:
            raise ValueError("no training image has a non-difficult object")

    def __len__(self) -> int:
        return self.iterations - self.start

    def _image(self, slot: int) -> int:
        epoch, pos = divmod(slot, len(self.usable))
        return int(self.usable[np.random.default_rng(_seed(self.seed, epoch)).permutation(len(self.usable))[pos]])

    def __iter__(self):
        for it in range(self.start, self.iterations):
            items = []
            for j in range(self.ipb):
                s = _seed(self.seed, self.rank, it, j)
                flip = self.flip and bool(np.random.default_rng(s).integers(2))
                items.append((self._image((it * self.world + self.rank) * self.ipb + j), flip, s))
            yield items


def collate(samples: list[dict]) -> dict:
    """Zero-pads images to the batch's largest (bottom/right) and prefixes each RoI with its image's index:
    -> images (B, 3, H, W), rois (R, 5), labels (R,), targets (R, 4)."""
    h = max(s["image"].shape[1] for s in samples)
    w = max(s["image"].shape[2] for s in samples)
    images = torch.zeros(len(samples), 3, h, w)
    for b, s in enumerate(samples):
        images[b, :, :s["image"].shape[1], :s["image"].shape[2]] = s["image"]
    rois = torch.cat([torch.cat([torch.full((len(s["rois"]), 1), float(b)), s["rois"]], 1)
                      for b, s in enumerate(samples)])
    return {"images": images, "rois": rois, "labels": torch.cat([s["labels"] for s in samples]),
            "targets": torch.cat([s["targets"] for s in samples])}


def usable_images(db: RoiDB) -> np.ndarray:
    """Indices of images with at least one non-difficult object (the others give no foreground)."""
    return np.array([i for i in range(len(db)) if (~db.gt(i)[2]).any()], np.int64)
