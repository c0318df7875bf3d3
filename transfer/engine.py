"""Fast R-CNN fine-tuning and testing: `train_detector(config, session)` and `detect_all(...)`.

`train_detector` is one process's training run, like pretrain's `train_worker`: the same function runs
in this process (`infra.session.LocalSession`) and on Ray Train workers (DDP, one GPU each).
Loss (Girshick 2015, Eq. 1): cross-entropy over 21 classes on the sampled RoIs, plus, with box
regression, smooth-L1 on the true class's deltas of the foreground RoIs (deltas normalised by
(0.1, 0.1, 0.2, 0.2), i.e. torchvision's BoxCoder weights (10, 10, 5, 5)). SGD with Caffe's
conventions: biases at twice the rate and without weight decay; conv1 frozen when asked.

Testing runs each image at the training scale over all its proposals, scores every class, keeps
boxes above `score_thresh`, does NMS per class and keeps the `max_per_image` best, in the original
image's pixels.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import batched_nms
from tqdm.auto import tqdm

from pretrain.models.weights import load_weights
from infra import storage
from infra.session import Session
from pretrain.models.checkpoint import log_metrics, read_checkpoint, report_checkpoint, step_seed, write_checkpoint
from transfer.data import BatchOrder, RoiDB, TrainImages, collate, prepare_image, read_roidb, usable_images
from transfer.model import FastRCNN, build_detector

BOX_CODER = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))


@dataclass(frozen=True)
class DetectorSpec:
    """One fine-tuning run, as plain values (it travels to Ray workers as a dict)."""

    roidb: str  # the training split (transfer.data.write_roidb)
    out_dir: str  # metrics.jsonl of rank 0
    ckpt: str = ""
    init: str = "pretrained"  # pretrained | random
    arch: str = "alexnet96"
    width: float = 1.0
    num_classes: int = 21
    fc_dim: int = 4096
    dropout: float = 0.5
    box_regression: bool = False
    freeze_conv1: bool = True
    fc_init_std: float = 0.01
    iterations: int = 40000
    lr: float = 0.001
    lr_steps: tuple = (30000,)
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    images_per_batch: int = 2
    rois_per_batch: int = 128
    fg_fraction: float = 0.25
    fg_iou: float = 0.5
    bg_iou: tuple = (0.1, 0.5)
    flip: bool = True
    scale_px: int = 600
    max_size_px: int = 1000
    loader_workers: int = 2
    checkpoint_every: int = 1000
    log_every: int = 20
    seed: int = 0
    progress: bool = True


def detector_meta(model: FastRCNN) -> dict:
    """Enough to rebuild the detector: FastRCNN(**meta)."""
    return {"arch": model.arch, "width": model.width, "num_classes": model.num_classes,
            "fc_dim": model.fc7.out_features, "box_regression": model.bbox_pred is not None}


def load_detector(path: str | Path, device: str | torch.device = "cpu") -> FastRCNN:
    """A detector saved by `train_detector` (its checkpoint's model.safetensors) -> eval mode."""
    tensors, meta = load_weights(path)
    model = FastRCNN(**meta["detector"])
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval()


def lr_at(spec: DetectorSpec, it: int) -> float:
    return spec.lr * spec.lr_gamma ** sum(it >= s for s in spec.lr_steps)


def _optimizer(model: FastRCNN, spec: DetectorSpec) -> torch.optim.SGD:
    if spec.freeze_conv1:
        model.conv1.requires_grad_(False)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if p.ndim > 1], "weight_decay": spec.weight_decay, "lr_mult": 1.0},
              {"params": [p for n, p in params if p.ndim <= 1], "weight_decay": 0.0, "lr_mult": 2.0}]
    return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum)


def detection_loss(model, batch: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
    """One batch's Fast R-CNN loss -> (scalar, logs). `model`: FastRCNN or DDP(FastRCNN)."""
    rois, labels = batch["rois"].to(device), batch["labels"].to(device)
    logits, deltas = model(batch["images"].to(device, non_blocking=True), rois)
    loss_cls = F.cross_entropy(logits, labels)
    logs = {"loss_cls": loss_cls.detach(), "accuracy": (logits.argmax(1) == labels).float().mean(),
            "fg_fraction": (labels > 0).float().mean()}
    loss = loss_cls
    if deltas is not None:
        fg = torch.nonzero(labels > 0).squeeze(1)
        pred = deltas.view(len(labels), -1, 4)[fg, labels[fg]]  # (F, 4): the true class's deltas
        target = BOX_CODER.encode_single(batch["targets"].to(device)[fg], rois[fg, 1:])
        loss_box = F.smooth_l1_loss(pred, target, beta=1.0, reduction="sum") / max(len(labels), 1)
        loss = loss + loss_box
        logs["loss_box"] = loss_box.detach()
    return loss, {"loss": loss.detach(), **logs}


def _save(model: FastRCNN, opt, spec: DetectorSpec, it: int) -> Path:
    where = ("roidb", "out_dir")  # locations of this run, not how the detector was made
    spec_meta = {k: v for k, v in dataclasses.asdict(spec).items() if k not in where}
    return write_checkpoint(model.state_dict(), {"detector": detector_meta(model), "spec": spec_meta}, opt, it)


def _resume(model: FastRCNN, opt, ckpt: Path | None) -> int:
    if ckpt is None:
        return 0
    tensors, step = read_checkpoint(ckpt, opt)
    model.load_state_dict(tensors, strict=True)
    return step


def _loader(db: RoiDB, spec: DetectorSpec, session: Session, start: int):
    data = TrainImages(db, scale_px=spec.scale_px, max_size_px=spec.max_size_px,
                       rois_per_image=spec.rois_per_batch // spec.images_per_batch, fg_fraction=spec.fg_fraction,
                       fg_iou=spec.fg_iou, bg_iou=tuple(spec.bg_iou))
    order = BatchOrder(usable_images(db), images_per_batch=spec.images_per_batch, iterations=spec.iterations,
                       seed=spec.seed, flip=spec.flip, rank=session.rank, world_size=session.world_size, start=start)
    return torch.utils.data.DataLoader(data, batch_sampler=order, collate_fn=collate,
                                       num_workers=spec.loader_workers, pin_memory=session.device.type == "cuda",
                                       persistent_workers=False)


def train_detector(config: dict, session: Session) -> dict:
    """Fine-tunes (or resumes) one detector in this process -> the last metrics. Rank 0 logs to
    out_dir/metrics.jsonl; every rank reports each `checkpoint_every` iterations and at the end."""
    spec = DetectorSpec(**config)
    device = session.device
    model = build_detector(ckpt=spec.ckpt, init=spec.init, arch=spec.arch, width=spec.width,
                           num_classes=spec.num_classes, fc_dim=spec.fc_dim, dropout=spec.dropout,
                           box_regression=spec.box_regression, fc_init_std=spec.fc_init_std, seed=spec.seed).to(device)
    opt = _optimizer(model, spec)
    start = _resume(model, opt, session.latest_checkpoint())
    net = DistributedDataParallel(model) if session.world_size > 1 else model
    log = storage.to_path(spec.out_dir) / "metrics.jsonl"
    bar = tqdm(total=spec.iterations, initial=start, desc="fast r-cnn", unit="it",
               disable=session.rank != 0 or not spec.progress, mininterval=5)
    metrics, t0, images = {"step": start}, time.perf_counter(), 0
    net.train()
    for it, batch in enumerate(_loader(read_roidb(spec.roidb), spec, session, start), start):
        torch.manual_seed(step_seed(spec.seed, session.rank, it, 7))  # dropout masks, as the killed run drew them
        for g in opt.param_groups:
            g["lr"] = lr_at(spec, it) * g["lr_mult"]
        loss, info = detection_loss(net, batch, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        images += len(batch["images"])
        bar.update(1)
        last = it + 1 == spec.iterations
        if (it + 1) % spec.log_every == 0 or last:
            rate = images * session.world_size / (time.perf_counter() - t0)
            metrics = {"step": it + 1, "lr": lr_at(spec, it), "images_per_s": rate,
                       **{k: float(v) for k, v in info.items()}}
            log_metrics(log, metrics, session.rank)
        if (it + 1) % spec.checkpoint_every == 0 or last:
            report_checkpoint(session, metrics, it + 1, lambda: _save(model, opt, spec, it + 1))
    bar.close()
    return metrics


@torch.no_grad()
def detect(model: FastRCNN, image: np.ndarray, proposals: np.ndarray, *, scale_px: int, max_size_px: int,
           device: torch.device | str = "cpu", **kw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image (H, W, 3) uint8 and its proposals (K, 4) -> boxes (D, 4) float32 in the image's
    pixels, scores (D,) float32, labels (D,) int64 in 1..C; best first. `kw`: detect_prepared's."""
    x, scale = prepare_image(image, scale_px, max_size_px)
    return detect_prepared(model, x, scale, image.shape[:2], proposals, device=device, **kw)


@torch.no_grad()
def detect_prepared(model: FastRCNN, x: torch.Tensor, scale: float, hw: tuple[int, int], proposals: np.ndarray, *,
                    nms_iou: float = 0.3, score_thresh: float = 0.001, max_per_image: int = 100,
                    device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`detect` on an image already resized by `scale` (prepare_image), (3, h, w); hw: the original size."""
    props = torch.as_tensor(np.asarray(proposals, np.float32)).to(device)
    rois = torch.cat([props.new_zeros(len(props), 1), props * scale], 1)
    logits, deltas = model(x[None].to(device), rois)
    probs = logits.float().softmax(1)[:, 1:]  # (K, C): background dropped
    k, c = probs.shape
    if deltas is None:
        boxes = props[:, None, :].expand(k, c, 4)
    else:
        d = deltas.float().view(k, c + 1, 4)[:, 1:].reshape(-1, 4)
        boxes = BOX_CODER.decode_single(d, rois[:, 1:].repeat_interleave(c, 0)).view(k, c, 4) / scale
        h, w = hw
        boxes = torch.stack([boxes[..., 0].clamp(0, w - 1), boxes[..., 1].clamp(0, h - 1),
                             boxes[..., 2].clamp(0, w - 1), boxes[..., 3].clamp(0, h - 1)], -1)
    labels = torch.arange(1, c + 1, device=probs.device).expand(k, c)
    keep = probs > score_thresh
    boxes, scores, labels = boxes[keep], probs[keep], labels[keep]
    keep = batched_nms(boxes, scores, labels, nms_iou)[:max_per_image]  # sorted by score
    return boxes[keep].cpu().numpy(), scores[keep].cpu().numpy(), labels[keep].cpu().numpy().astype(np.int64)


class _TestImages(torch.utils.data.Dataset):
    """Image i -> (resized normalised image, scale, original (h, w)): decoded in loader workers."""

    def __init__(self, db: RoiDB, scale_px: int, max_size_px: int):
        self.db, self.scale_px, self.max_size_px = db, scale_px, max_size_px

    def __len__(self) -> int:
        return len(self.db)

    def __getitem__(self, i: int):
        image = self.db.image(i)
        x, scale = prepare_image(image, self.scale_px, self.max_size_px)
        return x, scale, image.shape[:2]


def detect_all(model: FastRCNN, db: RoiDB, *, scale_px: int, max_size_px: int, device: torch.device | str = "cpu",
               loader_workers: int = 2, progress: bool = True, **kw) -> tuple[dict[int, list[np.ndarray]], float]:
    """Every image of `db` -> (detections[c] for c in 1..C: per image (K, 5) x1, y1, x2, y2, score;
    seconds spent, image decoding included). On a GPU, images are decoded and resized by
    `loader_workers` processes while the model runs. `kw`: detect_prepared's settings."""
    model.eval()
    dets = {c: [] for c in range(1, model.num_classes)}
    on_gpu = torch.device(device).type == "cuda"
    # On CPUs the workers take cores from the model itself: 2 workers made a 2-core test loop 1.8x slower.
    images = torch.utils.data.DataLoader(_TestImages(db, scale_px, max_size_px), batch_size=None,
                                         num_workers=loader_workers if on_gpu else 0, pin_memory=on_gpu)
    t0 = time.perf_counter()
    for i, (x, scale, hw) in enumerate(tqdm(images, desc="test", unit="img", disable=not progress, mininterval=5)):
        boxes, scores, labels = detect_prepared(model, x, float(scale), tuple(hw), db.boxes(i), device=device, **kw)
        for c in dets:
            m = labels == c
            dets[c].append(np.concatenate([boxes[m], scores[m, None]], 1).astype(np.float32))
    return dets, time.perf_counter() - t0
