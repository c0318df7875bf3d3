"""Classification-transfer configuration: frozen dataclasses by concern, set by YAML, overridden by --set.

    cfg = load_classify_config(None, ["features.layers=[conv5]"], protocol="stl10")

Each protocol has its YAML (`transfer/configs/classify_<protocol>.yaml`) with the paper's settings
(sec. 4.2 and 5.3, after Exemplar-CNN [13]): STL-10 at its 96 px with 4-quadrant max pooling of every
conv layer; Caltech-101 resized to 150 x 150 with a 3-level spatial pyramid, 30 training and up to 50
test images per class over 10 splits; any other folder at the trunk's input size, half of each class for
training over 5 seeded splits. The probes: a linear classifier (multinomial logistic regression; the
paper's one-vs-rest linear SVM with probe.linear=svm) and a cosine k-NN.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from infra.configlib import RayConfig, TrackingConfig, _check, load_config
from pretrain.models.alexnet import ARCHS, LAYERS
from transfer.labelled import PROTOCOLS
from transfer.probes import LINEAR

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def default_config(protocol: str) -> Path:
    return CONFIG_DIR / f"classify_{protocol}.yaml"


@dataclass(frozen=True)
class RunSection:
    name: str = ""  # run directory <root>/<name>-<variant>; "" = the protocol's name
    root: str = "runs/classify"
    seed: int = 0  # the random trunk's weights and the probes' cross-validation folds

    def __post_init__(self):
        _check("/" not in self.name, "run.name", "a name without '/'", self.name)
        _check(self.seed >= 0, "run.seed", ">= 0", self.seed)


@dataclass(frozen=True)
class DataSection:
    protocol: str = "folder"  # folder | stl10 | caltech101
    path: str = ""  # the data folder (--data)
    image_px: int = 0  # images are resized to image_px square; 0 = the trunk's input size
    train_per_class: int = 0  # caltech101 / folder: training images per class; 0 = train_fraction of each
    train_fraction: float = 0.5
    test_per_class: int = 0  # at most this many of the rest per class; 0 = all
    splits: int = 5  # seeded splits (stl10: its 10 predefined folds)
    split_seed: int = 0  # the splits' own seed: runs with other run.seed values score the same images

    def __post_init__(self):
        _check(self.protocol in PROTOCOLS, "data.protocol", " | ".join(PROTOCOLS), self.protocol)
        _check(self.image_px == 0 or self.image_px >= 16, "data.image_px", "0 or >= 16", self.image_px)
        _check(self.train_per_class >= 0 and self.test_per_class >= 0, "data.train_per_class/test_per_class",
               ">= 0", (self.train_per_class, self.test_per_class))
        _check(0 < self.train_fraction < 1, "data.train_fraction", "in (0, 1)", self.train_fraction)
        _check(self.splits >= 1, "data.splits", ">= 1", self.splits)


@dataclass(frozen=True)
class FeaturesSection:
    layers: tuple[str, ...] = ("conv1", "conv2", "conv3", "conv4", "conv5")  # any of conv1..conv5, fc6, fc7
    pool_levels: tuple[int, ...] = (2,)  # max-pooling grids per conv layer: [2] quadrants, [1, 2, 4] a pyramid
    pixels_px: int = 32  # --features pixels: images at this side, flattened
    hog_cell_px: int = 0  # --features hog: VLFeat cell side; 0 = image_px / 8 (an 8 x 8 grid of cells)
    batch: int = 128  # images a forward pass
    part_images: int = 2000  # images a part file (and a Ray task)
    ray_min_images: int = 20000  # at least this many images: extraction as Ray tasks, else this process
    gpus_per_task: float = 0.0  # Ray tasks on a GPU cluster: 1

    def __post_init__(self):
        bad = [n for n in self.layers if n not in LAYERS]
        _check(bool(self.layers) and not bad, "features.layers", f"a list of {', '.join(LAYERS)}",
               list(self.layers))
        _check(bool(self.pool_levels) and min(self.pool_levels) >= 1, "features.pool_levels", "a list of >= 1",
               list(self.pool_levels))
        _check(self.pixels_px >= 4 and self.hog_cell_px >= 0, "features.pixels_px/hog_cell_px", ">= 4 / >= 0",
               (self.pixels_px, self.hog_cell_px))
        _check(self.batch >= 1 and self.part_images >= 1, "features.batch/part_images", ">= 1",
               (self.batch, self.part_images))
        _check(self.ray_min_images >= 0 and self.gpus_per_task >= 0, "features.ray_min_images/gpus_per_task",
               ">= 0", (self.ray_min_images, self.gpus_per_task))


@dataclass(frozen=True)
class ModelSection:
    arch: str = "alexnet96"  # --init random without --ckpt: the trunk to build (else the checkpoint's)
    width: float = 1.0

    def __post_init__(self):
        _check(self.arch in ARCHS, "model.arch", " | ".join(ARCHS), self.arch)
        _check(self.width > 0, "model.width", "> 0", self.width)


@dataclass(frozen=True)
class ProbeSection:
    # logreg (multinomial, L-BFGS: BLAS-bound, ~10x faster here) | svm (one-vs-rest LinearSVC, the paper's)
    linear: str = "logreg"
    cs: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0)  # C candidates, chosen by CV on each training split
    knn_k: tuple[int, ...] = (1, 5, 10, 20)  # k candidates, chosen the same way
    cv_folds: int = 3
    max_iter: int = 2000

    def __post_init__(self):
        _check(self.linear in LINEAR, "probe.linear", " | ".join(LINEAR), self.linear)
        _check(bool(self.cs) and min(self.cs) > 0, "probe.cs", "a list of > 0", list(self.cs))
        _check(bool(self.knn_k) and min(self.knn_k) >= 1, "probe.knn_k", "a list of >= 1", list(self.knn_k))
        _check(self.cv_folds >= 2 and self.max_iter >= 1, "probe.cv_folds/max_iter", ">= 2 / >= 1",
               (self.cv_folds, self.max_iter))


@dataclass(frozen=True)
class ClassifyConfig:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    features: FeaturesSection = field(default_factory=FeaturesSection)
    model: ModelSection = field(default_factory=ModelSection)
    probe: ProbeSection = field(default_factory=ProbeSection)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def load_classify_config(path: str | Path | None = None, overrides: list[str] = (), *,
                         protocol: str = "folder") -> ClassifyConfig:
    """YAML (default: the protocol's) + `a.b=c` overrides -> ClassifyConfig. Raises ConfigError."""
    return load_config(path, overrides, root=ClassifyConfig, default=default_config(protocol))
