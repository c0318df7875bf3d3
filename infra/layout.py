"""The run directories written down once: every artifact's path and every stage's name.

Stages, the drivers, scripts and tests ask a layout for a location instead of joining strings, so a
name changes in one place. Roots are local paths or bucket URIs (see `infra.storage.to_path`).

    <run>/manifest.json config.yaml metrics.jsonl .lease
    <run>/shards/                      stage `shard` (unless data.shards_dir names prebuilt shards)
    <run>/features/round0.npy          stage `features`; roundR.npy (R > 0): `features_roundR`
    <run>/clusters/roundR.npz .json    stage `cluster_roundR` (resume state in roundR.work/)
    <run>/train/roundR/                stage `train_roundR`: model.safetensors, members.npy, metrics.jsonl,
                                       ray/ (Ray Train storage); `report_roundR`: report.json
    <run>/hash/kK/                     stage `hash_kK` (`hash_<variant>_kK` in hash/<variant>/kK/)
    <run>/final.safetensors codes.npy  the K = hash.code_bits model and codes
    <run>/eval/ figures/ rounds.json   stage `eval`; figures of every stage
"""
from __future__ import annotations

from infra.storage import Location, absolute

SHARD, FEATURES, EVAL = "shard", "features", "eval"
# --force names: cluster/train/features apply to every round, hash to every code length
FORCE_NAMES = (SHARD, FEATURES, "cluster", "train", "hash", EVAL)


def features_stage(r: int) -> str:
    return FEATURES if r == 0 else f"features_round{r}"


def cluster_stage(r: int) -> str:
    return f"cluster_round{r}"


def train_stage(r: int) -> str:
    return f"train_round{r}"


def report_stage(r: int) -> str:
    return f"report_round{r}"


def stage_round(name: str, kind: str) -> int | None:
    """R for a stage named `<kind>_roundR` (kind: features, cluster, train, report), else None."""
    head, sep, tail = name.partition("_round")
    return int(tail) if sep and head == kind and tail.isdigit() else None


def hash_stage(bits: int, variant: str = "") -> str:
    return f"hash_{variant}_k{bits}" if variant else f"hash_k{bits}"


class _Root:
    """What every run directory has: its manifest, its lease, the resolved config, its figures."""

    def __init__(self, root):
        self.root: Location = absolute(root)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root})"

    @property
    def manifest(self) -> Location:
        return self.root / "manifest.json"

    @property
    def lease(self) -> Location:
        return self.root / ".lease"

    @property
    def config(self) -> Location:
        return self.root / "config.yaml"

    @property
    def figures(self) -> Location:
        return self.root / "figures"


class RunLayout(_Root):
    """Where each artifact of one pretraining run lives."""

    @property
    def metrics(self) -> Location:
        return self.root / "metrics.jsonl"

    @property
    def shards(self) -> Location:
        return self.root / "shards"

    def figure(self, name: str) -> Location:
        return self.figures / f"{name}.png"

    # stages 1-2 and the alternation
    @property
    def features_dir(self) -> Location:
        return self.root / "features"

    def features(self, r: int) -> Location:
        return self.features_dir / f"round{r}.npy"

    def encoder(self, r: int = 0) -> Location:
        return self.features_dir / ("encoder.npz" if r == 0 else f"encoder_round{r}.npz")

    def clusters(self, r: int) -> Location:
        return self.root / "clusters" / f"round{r}.npz"

    def cluster_summary(self, r: int) -> Location:
        return self.root / "clusters" / f"round{r}.json"

    def cluster_work(self, r: int) -> Location:
        return self.root / "clusters" / f"round{r}.work"

    def train_dir(self, r: int) -> Location:
        return self.root / "train" / f"round{r}"

    def model(self, r: int) -> Location:
        return self.train_dir(r) / "model.safetensors"

    def members(self, r: int) -> Location:
        return self.train_dir(r) / "members.npy"

    def report(self, r: int) -> Location:
        return self.train_dir(r) / "report.json"

    @property
    def rounds(self) -> Location:
        return self.root / "rounds.json"

    # stage 4
    def hash_dir(self, bits: int, variant: str = "") -> Location:
        return self.root / "hash" / variant / f"k{bits}" if variant else self.root / "hash" / f"k{bits}"

    def codes(self, bits: int, variant: str = "") -> Location:
        return self.hash_dir(bits, variant) / "codes.npy"

    def scores(self, bits: int, variant: str = "") -> Location:
        return self.hash_dir(bits, variant) / "scores.npy"

    @property
    def final(self) -> Location:
        return self.root / "final.safetensors"

    @property
    def final_codes(self) -> Location:
        return self.root / "codes.npy"

    # stage 5
    @property
    def eval_dir(self) -> Location:
        return self.root / "eval"

    @property
    def retrieval(self) -> Location:
        return self.eval_dir / "retrieval.json"


def ray_storage_of(train_dir) -> Location:
    """Where Ray Train keeps a training run's checkpoints, inside the stage's directory."""
    return train_dir / "ray"


class _Scored(_Root):
    """A transfer run: a summary of its data, its results as JSON and as a markdown table."""

    @property
    def data_summary(self) -> Location:
        return self.root / "data" / "summary.json"

    @property
    def results(self) -> Location:
        return self.root / "results.json"

    @property
    def results_md(self) -> Location:
        return self.root / "results.md"


class TransferLayout(_Scored):
    """Where each artifact of one detection-transfer run lives (transfer/voc07.py)."""

    DATA, TRAIN, TEST = "data", "train", "test"

    def roidb(self, role: str) -> Location:
        return self.root / "data" / f"{role}.npz"

    @property
    def train_dir(self) -> Location:
        return self.root / "train"

    @property
    def train_metrics(self) -> Location:
        return self.train_dir / "metrics.jsonl"

    @property
    def detector(self) -> Location:
        return self.root / "detector.safetensors"


class ClassifyLayout(_Scored):
    """Where each artifact of one classification-transfer run lives (transfer/classify.py).

        <run>/data/index.npz summary.json     stage `data`: labels, the images used, the splits
        <run>/features/features.npy meta.json stage `features` (parts/part-NNNNN.npy: one task's rows)
        <run>/results.json results.md         stage `eval`; eval/predictions.npz, figures/confusion.png
    """

    DATA, FEATURES, EVAL = "data", "features", "eval"

    @property
    def data_index(self) -> Location:
        return self.root / "data" / "index.npz"

    @property
    def features(self) -> Location:
        return self.root / "features" / "features.npy"

    @property
    def features_meta(self) -> Location:
        return self.root / "features" / "meta.json"

    def feature_part(self, i: int) -> Location:
        return self.root / "features" / "parts" / f"part-{i:05d}.npy"

    @property
    def predictions(self) -> Location:
        return self.root / "eval" / "predictions.npz"

    @property
    def confusion_figure(self) -> Location:
        return self.figures / "confusion.png"
