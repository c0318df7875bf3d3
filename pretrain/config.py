"""Experiment configuration: frozen dataclasses nested by concern, set by YAML, overridden by --set.

    cfg = load_config("pretrain/configs/imagenet.yaml", ["data.patches_per_image=20"])
    cfg.data.patch_size_px  -> 96

An unknown key anywhere (YAML or --set) is an error that lists the valid keys. Values are checked
against the field types. Modules take explicit keyword arguments, not this object; the driver maps
config to arguments.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

from infra import configlib
from infra.configlib import (ConfigError, RayConfig, TrackingConfig, _check, config_hash, dump_yaml,  # noqa: F401
                             to_dict)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"
LR_SCALING = ("linear", "sqrt", "none")


def scaled_lr(lr: float, global_batch: int, base_batch: int, rule: str) -> float:
    """The rate at `global_batch` of one chosen at `base_batch`: linear (Goyal et al. 2017, "Accurate,
    large minibatch SGD"), sqrt (the variance-preserving rule), or none."""
    ratio = global_batch / base_batch
    return lr * {"linear": ratio, "sqrt": ratio ** 0.5, "none": 1.0}[rule]


@dataclass(frozen=True)
class RunConfig:
    name: str = "demo"  # run directory is <root>/<name> unless --run-dir is given
    root: str = "runs"
    seed: int = 0

    def __post_init__(self):
        _check(bool(self.name.strip()) and "/" not in self.name, "run.name", "a non-empty name without '/'",
               self.name)
        _check(bool(self.root.strip()), "run.root", "a non-empty path", self.root)
        _check(self.seed >= 0, "run.seed", ">= 0", self.seed)


@dataclass(frozen=True)
class DataConfig:
    """Stage 0: patch shards (paper sec. 4.1: 96x96 patches)."""

    source: str = "demo"  # demo | digits | image folder | tar | VOC devkit (see shards/sources.py)
    kind: str = "auto"
    shards_dir: str = ""  # use shards built beforehand (python -m shards.build) instead of building
    patch_size_px: int = 96
    patches_per_image: int = 64
    scale_range: tuple[float, float] = (0.25, 0.6)  # patch side / shorter image side
    patches_per_record: int = 16
    jpeg_quality: int = 90
    images_per_shard: int = 4

    def __post_init__(self):
        # the patch geometry is checked where it is used (shards.writer.PatchParams), before Ray starts
        _check(bool(self.source.strip()), "data.source", "a source (demo, digits or a path)", self.source)
        _check(self.images_per_shard >= 1, "data.images_per_shard", ">= 1", self.images_per_shard)


@dataclass(frozen=True)
class FeaturesConfig:
    """Stage 1: init features (paper sec. 3.1; DESIGN.md): improved Fisher vectors of dense SIFT +
    colour, or HOG (the paper's CIFAR init), PCA-whitened to out_dim and L2-normalised."""

    kind: str = "fv"  # fv | hog
    sift_step_px: int = 8
    sift_bin_px: int = 8  # a SIFT descriptor spans 4x4 bins
    desc_pca_dim: int = 64
    gmm_components: int = 32  # FV length 2 * gmm_components * desc_pca_dim
    hog_cell_px: int = 8
    out_dim: int = 128  # <= 256: FAISS and the SVMs work in this dimension
    fit_sample_patches: int = 2000  # PCA, GMM and whitening are fit on this many patches

    def __post_init__(self):
        _check(self.kind in ("fv", "hog"), "features.kind", "fv | hog", self.kind)
        for key in ("sift_step_px", "sift_bin_px", "desc_pca_dim", "gmm_components", "hog_cell_px"):
            _check(getattr(self, key) >= 1, f"features.{key}", ">= 1", getattr(self, key))
        _check(1 <= self.out_dim <= 256, "features.out_dim", "in 1..256", self.out_dim)
        _check(self.fit_sample_patches >= 2, "features.fit_sample_patches", ">= 2", self.fit_sample_patches)


@dataclass(frozen=True)
class ClusterConfig:
    """Stage 2: discriminative clustering (paper sec. 3.1, Singh et al. 2012; pretrain/cluster/)."""

    natural_fraction: float = 0.5  # share of the patches that forms the natural-world set N
    # Or name N by the patches' source keys: a glob such as "web/*" (an image-folder class of random
    # web images, the paper's other choice for N). Empty: a random natural_fraction of all patches.
    natural_world: str = ""
    init_divisor: int = 4  # k-means on D1 with |D1| / init_divisor clusters (Singh et al.)
    max_clusters: int = 30000
    min_init_members: int = 3
    rounds: int = 4
    top_m: int = 5  # held-out firings kept as members each round
    min_members: int = 3  # firings above -1 needed to survive a round
    min_discriminative: float = 0.0  # > 0 only with a separate natural-world set (see discover.py)
    svm_c: float = 0.1  # the paper's C
    svm_tol: float = 1e-4
    cache_size: int = 100000  # hard-negative cache per block of clusters
    mining_rounds: int = 3
    merge_threshold: float = 0.4  # the paper's firing-overlap threshold (SVMs between the clusters in D)
    merge_top: int = 20  # firings per cluster compared when merging
    # Coverage (pretrain/cluster/cover.py): after merging, the final SVMs fire on every patch and a patch
    # joins its best cluster when it ranks within that cluster's top cover_top_n patches (0: its fair
    # share, patches / clusters), or scores above cover_min_score (1 = past the SVM's positive margin).
    # false keeps only the loop's top-m members (about 9% of digits; the paper's members).
    cover: bool = True
    cover_top_n: int = 0
    cover_min_score: float = 1.0
    # svm: the final SVMs score the patches (the paper's detectors) | centroid: the cosine to each
    # cluster's mean member (top-n rule only). On digits the SVMs' argmax was the less pure partition
    # of the same clusters (0.944 vs 0.972 at 82% coverage, labels looked at; README)
    cover_score: str = "svm"
    # Later rounds of the cluster <-> CNN alternation start from the previous round's clusters (SVMs
    # retrained on the new features) on a fresh D/N split; false: from k-means on the same split
    refine: bool = True
    reseed_split: bool = True
    # discover (the paper's discriminative clustering) | kmeans (the k-means+CNN ablation: k-means on
    # each round's features, each cluster cut to the share kmeans_coverage nearest its centroid)
    method: str = "discover"
    kmeans_clusters: int = 100
    kmeans_coverage: float = 1.0
    block_clusters: int = 2000  # clusters per Ray task
    cover_rows: int = 65536  # patches per coverage task
    kmeans_iters: int = 20
    kmeans_init: str = "kmeans++"  # kmeans++ | afkmc2 (cheaper at 30k clusters) | random
    gpus_per_task: float = 0.0  # > 0: SVM and k-means tasks ask Ray for GPUs
    montage_clusters: int = 16
    montage_members: int = 8

    def __post_init__(self):
        _check(0 < self.natural_fraction < 1, "cluster.natural_fraction", "in (0, 1)", self.natural_fraction)
        for key in ("init_divisor", "max_clusters", "min_init_members", "rounds", "top_m", "min_members",
                    "cache_size", "mining_rounds", "merge_top", "block_clusters", "kmeans_iters",
                    "montage_clusters", "montage_members", "kmeans_clusters", "cover_rows"):
            _check(getattr(self, key) >= 1, f"cluster.{key}", ">= 1", getattr(self, key))
        _check(self.min_members <= self.top_m, "cluster.min_members", "<= cluster.top_m", self.min_members)
        _check(0 <= self.min_discriminative < 1, "cluster.min_discriminative", "in [0, 1)", self.min_discriminative)
        _check(self.svm_c > 0 and self.svm_tol > 0, "cluster.svm_c/svm_tol", "> 0", (self.svm_c, self.svm_tol))
        _check(0 < self.merge_threshold <= 1, "cluster.merge_threshold", "in (0, 1]", self.merge_threshold)
        _check(self.kmeans_init in ("kmeans++", "afkmc2", "random"), "cluster.kmeans_init",
               "kmeans++ | afkmc2 | random", self.kmeans_init)
        _check(self.gpus_per_task >= 0, "cluster.gpus_per_task", ">= 0", self.gpus_per_task)
        _check(self.cover_top_n >= 0, "cluster.cover_top_n", ">= 0", self.cover_top_n)
        _check(self.cover_score in ("svm", "centroid"), "cluster.cover_score", "svm | centroid", self.cover_score)
        _check(self.method in ("discover", "kmeans"), "cluster.method", "discover | kmeans", self.method)
        _check(0 < self.kmeans_coverage <= 1, "cluster.kmeans_coverage", "in (0, 1]", self.kmeans_coverage)


@dataclass(frozen=True)
class TrainConfig:
    """Stage 3: the CNN trained on the clusters as classes, alternating with re-clustering (paper
    sec. 3.1; pretrain/train/). Round r trains on clusters/roundR.npz; its fc7 features, PCA-whitened
    to features.out_dim, are what round r+1 clusters."""

    RENAMED: ClassVar[dict] = {"batch_size_per_worker": "train.global_batch (one step's samples over all workers)"}

    arch: str = "alexnet96"  # alexnet96 (96x96 patches) | alexnet32 (32x32, the paper's CIFAR setting)
    width: float = 1.0  # channel multiplier; 1 = AlexNet widths
    dropout: float = 0.5
    rounds: int = 3  # clustering + training rounds (the paper: converges within 3)
    # scratch: every round starts from a random trunk, so a round's features depend on its clusters only;
    # previous: round r > 0 continues from round r-1's trunk. On digits continuing lost 3-5 points of
    # PCA+ITQ mAP a round (README): the trunk keeps learning to split the previous clusters.
    round_init: str = "scratch"
    views_per_member: int = 20  # the paper's 20 augmented views: an epoch is views * members samples
    # per round. One pass over the views: on digits fc7 got worse with more (PCA+ITQ mAP 0.88 after half
    # a pass, 0.87 after one, 0.85 after two, 0.76 after four; README)
    epochs: float = 1.0
    max_steps_per_round: int = 0  # > 0 caps a round's steps (tests, demos)
    # The recipe does not change with the cluster: global_batch samples per SGD step over all workers
    # (each of train.num_workers takes global_batch / num_workers), and lr is the rate at lr_base_batch,
    # scaled to global_batch by lr_scaling: linear (Goyal et al. 2017) | sqrt | none. The manifest records
    # the batch per worker and the rate used (train stages' "resources").
    global_batch: int = 64
    lr: float = 0.01
    lr_base_batch: int = 64
    lr_scaling: str = "linear"
    warmup_steps: int = 0  # linear warm-up of the rate from 0 (large global batches, Goyal et al.)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    aug_scale: tuple[float, float] = (0.5, 1.0)  # random-resized-crop area range
    aug_color: float = 0.3  # brightness/contrast/saturation jitter
    aug_flip: bool = True  # horizontal flips (off where a mirrored patch is another shape, e.g. digits)
    # round r > 0: clusters whose mean fc7 features under round r-1's trunk have at least this cosine are
    # near-duplicates, left out of each other's softmax (pretrain/train/similar.py); 0: off. 0.4 was
    # chosen on digits by looking at its labels (94% of the pairs above it are one digit), then kept
    # unchanged for the second labelled set (configs/vocboxes.yaml)
    skip_similar: float = 0.4
    feature_layer: str = "fc7"  # the next round's features
    feature_fit_patches: int = 2000  # their whitening is fit on this many patches
    num_workers: int = 1  # Ray Train workers (DDP)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    loader_workers: int = 0  # DataLoader processes per worker
    amp: bool = True  # bf16 autocast on GPUs
    # none | bf16: DDP all-reduces gradients in bf16 (half the bytes between nodes; torch's
    # bf16_compress_hook). Off by default: it rounds the summed gradients
    grad_compression: str = "none"
    checkpoint_every: int = 200  # steps
    # worker failures Ray Train recovers from the last checkpoint within a stage; -1: any number (spot nodes)
    max_failures: int = 1

    def __post_init__(self):
        _check(self.arch in ("alexnet96", "alexnet32"), "train.arch", "alexnet96 | alexnet32", self.arch)
        _check(self.round_init in ("previous", "scratch"), "train.round_init", "previous | scratch", self.round_init)
        _check(0 <= self.skip_similar <= 1, "train.skip_similar", "in [0, 1]", self.skip_similar)
        _check(self.width > 0, "train.width", "> 0", self.width)
        _check(0 <= self.dropout < 1, "train.dropout", "in [0, 1)", self.dropout)
        for key in ("rounds", "views_per_member", "global_batch", "lr_base_batch", "feature_fit_patches",
                    "num_workers", "checkpoint_every"):
            _check(getattr(self, key) >= 1, f"train.{key}", ">= 1", getattr(self, key))
        for key in ("max_steps_per_round", "loader_workers", "warmup_steps"):
            _check(getattr(self, key) >= 0, f"train.{key}", ">= 0", getattr(self, key))
        _check(self.max_failures >= -1, "train.max_failures", ">= -1 (-1: any number)", self.max_failures)
        _check(self.global_batch % self.num_workers == 0, "train.global_batch",
               f"a multiple of train.num_workers={self.num_workers}", self.global_batch)
        _check(self.lr_scaling in LR_SCALING, "train.lr_scaling", " | ".join(LR_SCALING), self.lr_scaling)
        _check(self.grad_compression in ("none", "bf16"), "train.grad_compression", "none | bf16",
               self.grad_compression)
        _check(min(self.lr, self.cpus_per_worker, self.epochs) > 0, "train.lr/cpus_per_worker/epochs", "> 0",
               (self.lr, self.cpus_per_worker, self.epochs))
        _check(0 < self.aug_scale[0] <= self.aug_scale[1] <= 1, "train.aug_scale", "0 < lo <= hi <= 1",
               self.aug_scale)
        _check(self.feature_layer in ("conv5", "fc6", "fc7"), "train.feature_layer", "conv5 | fc6 | fc7",
               self.feature_layer)


@dataclass(frozen=True)
class HashConfig:
    """Stage 4: K-bit attributes by the triplet hashing loss (paper sec. 3.2, Eq. 1-4; DESIGN.md
    states the departures from the printed Eq. 2). Fine-tunes the last round's trunk with W."""

    RENAMED: ClassVar[dict] = {"batch_size_per_worker": "hash.global_batch (one step's samples over all workers)"}

    code_bits: int = 32  # K of final.safetensors and codes.npy
    extra_bits: tuple[int, ...] = ()  # more code lengths trained and evaluated (e.g. [16, 64])
    alpha: float = 1.0  # variance term
    beta: float = 1.0  # decorrelation term
    gamma: float = 5e-4  # weight term
    printed_eq2: bool = False  # the printed signs and W W^T (to measure the difference)
    margin: float = 0.5  # rho = margin * K (the paper: K / 2)
    # hardest: the in-batch negative that most violates the triplet order (the paper); semihard: the
    # nearest one farther than the positive (FaceNet), the hardest where there is none
    negatives: str = "hardest"
    # > 0: clusters whose mean features have at least this cosine are not each other's negatives
    # (near-duplicates of one concept that merging left apart; pretrain/train/similar.py). As
    # train.skip_similar: chosen on digits by looking at its labels, kept for the second set
    skip_similar: float = 0.4
    freeze_bn: bool = True  # trunk in eval mode (BatchNorm running statistics, no dropout) while tuned
    init: str = "itq"  # itq (PCA+ITQ on the trunk's features, the paper's [37] stand-in) | random
    views_per_member: int = 20
    epochs: float = 1.0  # one pass over the views, as train.epochs (digits: measured only at 1)
    max_steps: int = 0  # > 0 caps the steps
    # as train: samples per step over all train.num_workers; lr is the rate at lr_base_batch, scaled
    # by train.lr_scaling
    global_batch: int = 64
    lr: float = 0.001
    lr_base_batch: int = 64
    # The trunk moves 10x slower than W: on digits, fine-tuning it at W's rate lost 0.05 mAP of the
    # PCA+ITQ start (0.858 -> 0.806 at 32 bits, 100 steps), at 0.1x 0.014 (-> 0.845)
    trunk_lr_scale: float = 0.1

    def __post_init__(self):
        for k in (self.code_bits, *self.extra_bits):
            _check(k >= 8 and k % 8 == 0, "hash.code_bits/extra_bits", "multiples of 8 (packed codes)", k)
        _check(self.init in ("itq", "random"), "hash.init", "itq | random", self.init)
        _check(self.margin >= 0, "hash.margin", ">= 0", self.margin)
        _check(self.negatives in ("hardest", "semihard"), "hash.negatives", "hardest | semihard", self.negatives)
        _check(0 <= self.skip_similar <= 1, "hash.skip_similar", "in [0, 1]", self.skip_similar)
        _check(min(self.alpha, self.beta, self.gamma) >= 0, "hash.alpha/beta/gamma", ">= 0",
               (self.alpha, self.beta, self.gamma))
        for key in ("views_per_member", "global_batch", "lr_base_batch"):
            _check(getattr(self, key) >= 1, f"hash.{key}", ">= 1", getattr(self, key))
        _check(self.trunk_lr_scale >= 0, "hash.trunk_lr_scale", ">= 0", self.trunk_lr_scale)
        _check(self.max_steps >= 0 and min(self.lr, self.epochs) > 0, "hash.max_steps/lr/epochs", ">= 0 / > 0",
               (self.max_steps, self.lr, self.epochs))

    @property
    def all_bits(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys((self.code_bits, *self.extra_bits)))


@dataclass(frozen=True)
class EvalConfig:
    """Stage 5: Hamming-ranking retrieval on the labelled patches (paper sec. 4: random queries per
    class, the rest as gallery, averaged over repeats) against LSH, PCAH, ITQ and SH."""

    queries_per_class: int = 100
    repeats: int = 10
    precision_at: tuple[int, ...] = (1000,)
    baseline_input: str = "pixels"  # pixels (gray, flattened) | features (the round-0 init features)
    figure_bits: int = 5  # rows of the attribute figure (paper Fig. 4)
    figure_queries: int = 4  # queries in the retrieval grid (paper Fig. 7)
    round_bits: int = 32  # each round's report: PCA+ITQ at this many bits on the round's fc7 ...
    round_patches: int = 20000  # ... of a seeded sample of at most this many labelled patches
    # Retrieval scores the queries plus at most this many gallery items: a larger labelled set gives a
    # seeded subset, chosen from the labels' classes only (CIFAR-10's 59000-image gallery is the model;
    # every query chunk ranks the whole gallery, so time grows with queries x gallery_max, not with N)
    gallery_max: int = 100000
    # LSH, PCAH, ITQ and SH are fitted on a seeded sample of at most this many of the scored patches
    # (then every scored patch is encoded in chunks); under it they are fitted on all of them
    baseline_fit_max: int = 20000

    def __post_init__(self):
        for key in ("queries_per_class", "repeats", "figure_bits", "figure_queries", "round_bits", "round_patches",
                    "gallery_max", "baseline_fit_max"):
            _check(getattr(self, key) >= 1, f"eval.{key}", ">= 1", getattr(self, key))
        _check(len(self.precision_at) >= 1 and min(self.precision_at) >= 1, "eval.precision_at",
               "a list of N >= 1", self.precision_at)
        _check(self.baseline_input in ("pixels", "features"), "eval.baseline_input", "pixels | features",
               self.baseline_input)


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hash: HashConfig = field(default_factory=HashConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self):
        _check(self.hash.global_batch % self.train.num_workers == 0, "hash.global_batch",
               f"a multiple of train.num_workers={self.train.num_workers}", self.hash.global_batch)


def valid_keys(cls=Config, prefix: str = "") -> list[str]:
    return configlib.valid_keys(cls, prefix)


def load_config(path: str | Path | None = None, overrides: list[str] = (), *, root=Config,
                default: Path = DEFAULT_CONFIG):
    """YAML file (default: demo.yaml) + `a.b=c` overrides -> a Config (or `root`). Raises ConfigError."""
    return configlib.load_config(path, overrides, root=root, default=default)
