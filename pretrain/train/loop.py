"""The training loop of stages 3 and 4, one function per process: `train_worker(config, session)`.

mode "cluster" (paper sec. 3.1): softmax over the discovered clusters, members sampled uniformly
over clusters, each batch augmented on the device (crop/scale, flip, colour), so a round of
`views_per_member * M` samples shows each member about 20 times under different transformations.

mode "hash" (paper sec. 3.2, Eq. 1-4): a trunk trained in mode "cluster" plus the hashing layer W,
initialised from PCA+ITQ on the trunk's features (`hash_init`); anchors drawn uniformly over
clusters, positives from the same cluster, the hardest negative from another cluster in the batch
(pretrain/train/losses.py). Trunk and W are fine-tuned together. With `freeze_bn` the trunk runs in
eval mode (BatchNorm's running statistics, no dropout) and W's feature mean stays the one PCA+ITQ
was fitted with: the codes are computed in eval mode, and features of another mode (batch
statistics of augmented cluster members) would centre and threshold them differently.

DDP when the session's world size is > 1 (the process group exists already: Ray Train makes it with
gloo on CPUs and NCCL on GPUs); bf16 autocast on GPUs when `amp`. Rank 0 writes a checkpoint every
`checkpoint_every` steps and at the end; a process that finds a checkpoint in its session resumes
from its step, and the seeded per-step sampling makes the resumed batches the ones it would have
drawn.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from pretrain.models.alexnet import ClusterHead, HashHead, build_trunk
from pretrain.models.weights import load_weights, split_prefix, trunk_state
from pretrain.train.augment import augment
from pretrain.train.data import ClusterBatches, batch_loader
from pretrain.train.losses import hash_objective
from pretrain.train.similar import SkipPairs
from infra import storage
from infra.session import Session
from pretrain.models.checkpoint import log_metrics, read_checkpoint, report_checkpoint, step_seed, write_checkpoint


# where a run's inputs and outputs lie: not part of what a checkpoint records (the same weights trained in
# another run directory must be the same file, byte for byte)
PATH_FIELDS = ("pixels_path", "clusters_path", "out_dir", "init_from", "hash_init", "skip_pairs")


def recipe(spec: "TrainSpec") -> dict:
    """A spec without its locations: what a weights file records of how it was trained."""
    return {k: v for k, v in dataclasses.asdict(spec).items() if k not in PATH_FIELDS}


@dataclass(frozen=True)
class TrainSpec:
    """Everything one training run needs, as plain values (it travels to Ray workers as a dict)."""

    mode: str  # cluster | hash
    pixels_path: str  # members.npy (M, P, P, 3) uint8
    clusters_path: str  # clusters/roundR.npz: its offsets split the member rows into clusters
    out_dir: str  # metrics.jsonl of rank 0
    arch: str = "alexnet96"
    width: float = 1.0
    dropout: float = 0.5
    init_from: str = ""  # weights whose trunk starts this run ("" = random init)
    steps: int = 100
    batch_size_per_worker: int = 64
    lr: float = 0.01
    lr_drops: tuple = (0.6, 0.85)  # x0.1 at these fractions of the steps (the paper's step schedule)
    warmup_steps: int = 0  # the rate rises linearly from lr / warmup_steps to lr over these first steps
    trunk_lr_scale: float = 1.0  # the trunk's rate relative to the head's (hashing fine-tune)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    aug_scale: tuple = (0.5, 1.0)  # random-resized-crop area range
    aug_color: float = 0.3
    aug_flip: bool = True
    bits: int = 32
    hash_init: str = ""  # npz with mean (d,) and proj (d, K): PCA+ITQ on the trunk's features
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 5e-4
    printed_eq2: bool = False
    margin: float = 0.5  # rho = margin * bits
    negatives: str = "hardest"  # hardest | semihard
    skip_pairs: str = ""  # npz with `pairs` (P, 2): cluster pairs that are not each other's negatives
                          # (hash mode) or wrong answers (cluster mode: out of each other's softmax)
    freeze_bn: bool = True  # hash mode: the trunk in eval mode
    checkpoint_every: int = 100
    log_every: int = 10
    loader_workers: int = 0
    amp: bool = True
    grad_compression: str = "none"  # none | bf16: DDP all-reduces gradients in bf16
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.mode not in ("cluster", "hash"):
            raise ValueError(f"mode must be cluster or hash, got {self.mode!r}")
        if self.grad_compression not in ("none", "bf16"):
            raise ValueError(f"grad_compression must be none or bf16, got {self.grad_compression!r}")


class Net(nn.Module):
    """trunk (conv1..fc7) + head (cluster classifier or hashing layer)."""

    def __init__(self, trunk: nn.Module, head: nn.Module):
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.trunk(x)  # (B, d)
        return f, self.head(f)  # head: (B, C) logits | (B, K) relaxed codes


def build_net(spec: TrainSpec, num_clusters: int) -> Net:
    trunk = build_trunk(spec.arch, width=spec.width, dropout=spec.dropout)
    if spec.init_from:
        tensors, _ = load_weights(spec.init_from)
        trunk.load_state_dict(trunk_state(tensors), strict=True)
    if spec.mode == "cluster":
        return Net(trunk, ClusterHead(trunk.feature_dim, num_clusters))
    head = HashHead(trunk.feature_dim, spec.bits)
    if spec.hash_init:
        with np.load(storage.local_copy(spec.hash_init), allow_pickle=False) as z:
            head.init_from(torch.from_numpy(z["mean"]), torch.from_numpy(z["proj"]))
        # the eval-mode mean of all patches that PCA+ITQ was fitted with, not one of augmented members
        head.track_mean = not spec.freeze_bn
    return Net(trunk, head)


def _head_prefix(net: Net) -> str:
    return "classifier" if isinstance(net.head, ClusterHead) else "hash"


def state_tensors(net: Net) -> dict[str, torch.Tensor]:
    """The checkpoint's keys: trunk keys bare (conv1.weight, ...), the head under its role's prefix."""
    prefix = _head_prefix(net)
    return {**net.trunk.state_dict(), **{f"{prefix}.{k}": v for k, v in net.head.state_dict().items()}}


def load_state(net: Net, tensors: dict[str, torch.Tensor]) -> None:
    net.trunk.load_state_dict(trunk_state(tensors), strict=True)
    net.head.load_state_dict(split_prefix(tensors, _head_prefix(net)), strict=True)


def model_meta(spec: TrainSpec) -> dict:
    return {"arch": spec.arch, "width": spec.width, "dropout": spec.dropout}


def lr_at(spec: TrainSpec, step: int) -> float:
    warm = min(1.0, (step + 1) / spec.warmup_steps) if spec.warmup_steps else 1.0
    return warm * spec.lr * 0.1 ** sum(step >= int(f * spec.steps) for f in spec.lr_drops)


def data_parallel(net: Net, spec: TrainSpec) -> DistributedDataParallel:
    """DDP over the session's process group; with grad_compression=bf16 the gradient buckets are cast
    to bf16 for the all-reduce and back (torch's bf16_compress_hook: half the bytes on the wire)."""
    model = DistributedDataParallel(net)
    if spec.grad_compression == "bf16":
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return model


def _optimizer(net: Net, spec: TrainSpec) -> torch.optim.Optimizer:
    """SGD with four groups: trunk/head x decayed/not. No weight decay on BatchNorm and bias
    parameters, nor on W (Eq. 2's gamma term is W's decay); the trunk's rate is scaled by
    `trunk_lr_scale` (each group's `lr_scale`, applied by the schedule)."""
    groups = []
    for part, scale in ((net.trunk, spec.trunk_lr_scale), (net.head, 1.0)):
        params = list(part.named_parameters())
        plain = [p for n, p in params if p.ndim < 2 or part is net.head and spec.mode == "hash"]
        decay = [p for n, p in params if not (p.ndim < 2 or part is net.head and spec.mode == "hash")]
        groups += [{"params": decay, "weight_decay": spec.weight_decay, "lr_scale": scale},
                   {"params": plain, "weight_decay": 0.0, "lr_scale": scale}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=spec.lr, momentum=spec.momentum)


def _unwrap(model: nn.Module) -> Net:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _loss(net, spec: TrainSpec, batch: dict, device, gen: torch.Generator,
          skip: SkipPairs | None = None) -> tuple[torch.Tensor, dict]:
    """One batch's loss -> (scalar, logs). `net`: Net or DDP(Net); batch: see ClusterBatches."""
    aug = dict(generator=gen, out_px=_unwrap(net).trunk.input_px, scale=spec.aug_scale, brightness=spec.aug_color,
               contrast=spec.aug_color, saturation=spec.aug_color, flip=spec.aug_flip)
    x = augment(batch["image"].to(device, non_blocking=True), **aug)  # (B, 3, px, px)
    cluster = batch["cluster"].to(device)
    use_amp = spec.amp and device.type == "cuda"
    if spec.mode == "cluster":
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            _, logits = net(x)
        logits = logits.float()
        if skip is not None:  # a near-duplicate of the sample's cluster is no wrong answer: out of the softmax
            logits = logits.masked_fill(skip.mask(cluster, torch.arange(logits.shape[1], device=device)), -torch.inf)
        loss = F.cross_entropy(logits, cluster)
        acc = (logits.argmax(1) == cluster).float().mean()
        return loss, {"loss": loss.detach(), "accuracy": acc}
    xp = augment(batch["positive"].to(device, non_blocking=True), **aug)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        f, b = net(torch.cat([x, xp]))  # anchors and positives in one pass: (2B, d), (2B, K)
    head, n = _unwrap(net).head, len(x)
    # Eq. 2's regularizers shape W on the (zero-meaned) features; the features are detached so the
    # variance term cannot be raised by inflating the trunk's activations instead of turning W
    centred = (f[:n].float() - head.mean).detach()
    mask = skip.mask(cluster, torch.cat([cluster, cluster])) if skip is not None else None
    loss, info = hash_objective(b[:n].float(), b[n:].float(), cluster, head.weight, centred, alpha=spec.alpha,
                                beta=spec.beta, gamma=spec.gamma, printed=spec.printed_eq2,
                                margin=spec.margin * spec.bits, mining=spec.negatives, skip=mask)
    return loss, {"loss": loss.detach(), **info}


def _save_checkpoint(net: Net, opt, spec: TrainSpec, step: int) -> Path:
    meta = {"model": model_meta(spec), "mode": spec.mode, "spec": recipe(spec)}
    return write_checkpoint(state_tensors(net), meta, opt, step)


def _resume(net: Net, opt, ckpt: Path | None) -> int:
    if ckpt is None:
        return 0
    tensors, step = read_checkpoint(ckpt, opt)
    load_state(net, tensors)
    return step


def _scalars(info: dict) -> dict:
    return {k: float(v) for k, v in info.items() if torch.is_tensor(v) and v.numel() == 1 or isinstance(v, float)}


def train_worker(config: dict, session: Session) -> dict:
    """Runs (or resumes) one training run in this process -> the last metrics."""
    spec = TrainSpec(**config)
    device = session.device
    torch.manual_seed(spec.seed + session.rank)
    offsets = np.load(storage.local_copy(spec.clusters_path), allow_pickle=False)["offsets"]
    net = build_net(spec, len(offsets) - 1).to(device)
    opt = _optimizer(net, spec)
    start = _resume(net, opt, session.latest_checkpoint())
    model = data_parallel(net, spec) if session.world_size > 1 else net
    data = ClusterBatches(spec.pixels_path, offsets, batch_size=spec.batch_size_per_worker, steps=spec.steps,
                          seed=spec.seed, rank=session.rank, start_step=start, pairs=spec.mode == "hash")
    loader = batch_loader(data, spec.loader_workers, pin_memory=device.type == "cuda")
    gen = torch.Generator()
    skip = None
    if spec.skip_pairs:
        with np.load(storage.local_copy(spec.skip_pairs), allow_pickle=False) as z:
            skip = SkipPairs(z["pairs"], len(offsets) - 1, device)
    log = storage.to_path(spec.out_dir) / "metrics.jsonl"
    bar = tqdm(total=spec.steps, initial=start, desc=f"train {spec.mode}", unit="step",
               disable=session.rank != 0 or not spec.progress, mininterval=5)
    metrics, t0, seen = {"step": start}, time.perf_counter(), 0
    model.train()
    if spec.mode == "hash" and spec.freeze_bn:
        net.trunk.eval()  # BatchNorm's running statistics (the ones the codes use), no dropout
    for batch in loader:
        step = batch["step"]
        # per-step seeds: a resumed run draws the augmentations and dropout masks the killed one would have
        gen.manual_seed(step_seed(spec.seed, session.rank, step, 0))
        torch.manual_seed(step_seed(spec.seed, session.rank, step, 1))
        for g in opt.param_groups:
            g["lr"] = lr_at(spec, step) * g["lr_scale"]
        loss, info = _loss(model, spec, batch, device, gen, skip)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(batch["image"])
        bar.update(1)
        last = step + 1 == spec.steps
        if (step + 1) % spec.log_every == 0 or last:
            rate = seen * session.world_size / (time.perf_counter() - t0)
            metrics = {"step": step + 1, "lr": lr_at(spec, step), "samples_per_s": rate, **_scalars(info)}
            log_metrics(log, {"mode": spec.mode, **metrics}, session.rank)
        if (step + 1) % spec.checkpoint_every == 0 or last:
            report_checkpoint(session, metrics, step + 1, lambda: _save_checkpoint(net, opt, spec, step + 1))
    bar.close()
    return metrics
