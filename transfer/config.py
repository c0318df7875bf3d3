"""Detection-transfer configuration: frozen dataclasses by concern, set by YAML, overridden by --set.

    cfg = load_transfer_config("transfer/configs/voc07.yaml", ["train.iterations=1000"])

The defaults are Fast R-CNN's (Girshick 2015; the `rbgirshick/fast-rcnn` solver and config, DESIGN.md):
single scale 600/1000, 2 images x 64 RoIs = 128 RoIs a batch, 25% foreground at IoU >= 0.5,
background IoU in [0.1, 0.5), flips, SGD at 0.001 (x0.1 after 30k of 40k iterations), momentum 0.9,
weight decay 5e-4, no box regression (the paper's Table 1), NMS 0.3 per class at test time. Loading,
checking and overrides are pretrain/config.py's, with this file's root.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from infra.configlib import ConfigError, RayConfig, TrackingConfig, _check, load_config

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"
GENERATED = "generated"  # data.voc: the generated detection set (transfer/synthetic.py)


@dataclass(frozen=True)
class RunSection:
    name: str = "voc07"  # run directory is <root>/<name>-<init> unless --run-dir is given
    root: str = "runs/transfer"
    seed: int = 0

    def __post_init__(self):
        _check(bool(self.name.strip()) and "/" not in self.name, "run.name", "a non-empty name without '/'",
               self.name)
        _check(self.seed >= 0, "run.seed", ">= 0", self.seed)


@dataclass(frozen=True)
class DataSection:
    voc: str = GENERATED  # a VOCdevkit folder, or "generated" (built under <run.root>/voc-generated)
    train_split: str = "trainval"
    test_split: str = "test"
    max_images: int = 0  # first N images of each split (0 = all): quick runs
    generated_trainval: int = 200
    generated_test: int = 100
    generated_seed: int = 0  # the set's own seed: runs with other run.seed values score on the same images

    def __post_init__(self):
        _check(self.max_images >= 0, "data.max_images", ">= 0", self.max_images)
        _check(self.generated_trainval >= 1 and self.generated_test >= 1, "data.generated_*", ">= 1",
               (self.generated_trainval, self.generated_test))


@dataclass(frozen=True)
class ProposalsSection:
    method: str = "selective_search"  # selective_search | file
    file: str = ""  # method=file: an .npz of boxes keyed by image id (transfer/proposals.py)
    mode: str = "fast"  # selective search: fast | quality
    max_side_px: int = 500  # selective search runs on the image shrunk to this longer side
    min_size_px: int = 4
    max_boxes: int = 2000
    cache_dir: str = ""  # default: <run.root>/proposals (shared by every run under that root)

    def __post_init__(self):
        _check(self.method in ("selective_search", "file"), "proposals.method", "selective_search | file",
               self.method)
        _check(self.method != "file" or bool(self.file), "proposals.file", "a path when method=file", self.file)
        _check(self.mode in ("fast", "quality"), "proposals.mode", "fast | quality", self.mode)
        _check(self.max_boxes >= 1 and self.max_side_px >= 32, "proposals.max_boxes/max_side_px", ">= 1 / >= 32",
               (self.max_boxes, self.max_side_px))


@dataclass(frozen=True)
class ModelSection:
    fc_dim: int = 4096  # fc6 and fc7 of the detector (Gaussian-initialised, paper sec. 4.1)
    dropout: float = 0.5
    box_regression: bool = False  # the paper's Table 1 has none
    freeze_conv1: bool = True  # Fast R-CNN fine-tunes conv2 and up for AlexNet-sized nets
    fc_init_std: float = 0.01  # fc6, fc7 and the classifier; box deltas use 0.001
    arch: str = "alexnet96"  # --init random without --ckpt: the trunk to build (else the checkpoint's)
    width: float = 1.0

    def __post_init__(self):
        _check(self.fc_dim >= 1, "model.fc_dim", ">= 1", self.fc_dim)
        _check(0 <= self.dropout < 1, "model.dropout", "in [0, 1)", self.dropout)
        _check(self.fc_init_std > 0 and self.width > 0, "model.fc_init_std/width", "> 0",
               (self.fc_init_std, self.width))


@dataclass(frozen=True)
class TrainSection:
    iterations: int = 40000
    lr: float = 0.001
    lr_steps: tuple[int, ...] = (30000,)  # x lr_gamma at each
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    images_per_batch: int = 2
    rois_per_batch: int = 128  # over the batch's images (Fast R-CNN's BATCH_SIZE)
    fg_fraction: float = 0.25
    fg_iou: float = 0.5
    bg_iou: tuple[float, float] = (0.1, 0.5)
    flip: bool = True
    scale_px: int = 600  # shorter image side
    max_size_px: int = 1000  # cap on the longer side
    num_workers: int = 1  # > 1: DDP on Ray Train (one GPU each when use_gpu)
    use_gpu: bool = False  # Ray Train workers on GPUs; a single local process uses CUDA when it sees it
    loader_workers: int = 2
    checkpoint_every: int = 1000
    log_every: int = 20

    def __post_init__(self):
        _check(self.iterations >= 1, "train.iterations", ">= 1", self.iterations)
        _check(self.lr > 0 and 0 < self.lr_gamma <= 1, "train.lr/lr_gamma", "> 0 / in (0, 1]",
               (self.lr, self.lr_gamma))
        _check(self.images_per_batch >= 1, "train.images_per_batch", ">= 1", self.images_per_batch)
        _check(self.rois_per_batch >= self.images_per_batch, "train.rois_per_batch", ">= images_per_batch",
               self.rois_per_batch)
        _check(0 < self.fg_fraction <= 1, "train.fg_fraction", "in (0, 1]", self.fg_fraction)
        _check(0 <= self.bg_iou[0] < self.bg_iou[1] <= self.fg_iou <= 1, "train.bg_iou/fg_iou",
               "0 <= bg_lo < bg_hi <= fg_iou <= 1", (self.bg_iou, self.fg_iou))
        _check(32 <= self.scale_px <= self.max_size_px, "train.scale_px/max_size_px", "32 <= scale <= max size",
               (self.scale_px, self.max_size_px))
        _check(self.num_workers >= 1 and self.loader_workers >= 0, "train.num_workers/loader_workers",
               ">= 1 / >= 0", (self.num_workers, self.loader_workers))
        _check(self.checkpoint_every >= 1 and self.log_every >= 1, "train.checkpoint_every/log_every", ">= 1",
               (self.checkpoint_every, self.log_every))


@dataclass(frozen=True)
class TestSection:
    nms_iou: float = 0.3
    score_thresh: float = 0.001  # low scores only add to the tail of the ranking: AP can only gain
    max_per_image: int = 100
    figure_images: int = 6  # test images drawn with their detections

    def __post_init__(self):
        _check(0 < self.nms_iou <= 1, "test.nms_iou", "in (0, 1]", self.nms_iou)
        _check(self.max_per_image >= 1, "test.max_per_image", ">= 1", self.max_per_image)


@dataclass(frozen=True)
class TransferConfig:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    proposals: ProposalsSection = field(default_factory=ProposalsSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    test: TestSection = field(default_factory=TestSection)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def load_transfer_config(path: str | Path | None = None, overrides: list[str] = ()) -> TransferConfig:
    """YAML (default: transfer/configs/demo.yaml) + `a.b=c` overrides -> TransferConfig. Raises ConfigError."""
    return load_config(path, overrides, root=TransferConfig, default=DEFAULT_CONFIG)


__all__ = ["ConfigError", "GENERATED", "TransferConfig", "load_transfer_config"]
