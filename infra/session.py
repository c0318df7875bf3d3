"""Where a training process runs: its rank, its device, and where its checkpoints go.

`train_worker` (pretrain/train/loop.py) talks only to this small interface, so the same loop runs
under Ray Train (`infra.ray_edge.RaySession`) and as plain processes (`LocalSession`, used by
tests and by the benchmark's baseline). Checkpoints are directories; rank 0 writes one into a
temporary directory and every rank calls `report` the same number of times (Ray Train's rule).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

from infra.storage import atomic_write_text

import torch
import torch.distributed as dist


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def latest_checkpoint(self) -> Path | None: ...

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None: ...


def default_device(local_rank: int = 0) -> torch.device:
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


class LocalSession:
    """Checkpoints under `root/checkpoint_NNNNNNNNN` (step number), the newest `keep` kept. Rank and
    world size come from torch.distributed when it is initialised."""

    def __init__(self, root: str | Path, keep: int = 2, device: torch.device | None = None):
        self.root = Path(root)
        self.keep = keep
        ready = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if ready else 0
        self.world_size = dist.get_world_size() if ready else 1
        self.device = device or default_device(self.rank if torch.cuda.device_count() > 1 else 0)

    def checkpoints(self) -> list[Path]:
        return sorted(p for p in self.root.glob("checkpoint_*") if p.is_dir())

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is not None and self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            dst = self.root / f"checkpoint_{int(metrics['step']):09d}"
            tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
            shutil.copytree(checkpoint_dir, tmp, dirs_exist_ok=True)
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(tmp, dst)  # a checkpoint directory appears whole or not at all
            for old in self.checkpoints()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        if self.world_size > 1:
            dist.barrier()  # like ray.train.report: every rank passes here together


def local_trainer(fn, config: dict, *, name: str, storage_path: str | Path) -> Path:
    """The `ray_train` contract in this process (one worker): checkpoints under storage_path/name,
    resumed from there by a rerun -> the final checkpoint's directory."""
    session = LocalSession(Path(storage_path) / name)
    fn(dict(config), session)
    latest = session.latest_checkpoint()
    if latest is None:
        raise RuntimeError(f"training run {name} finished without a checkpoint")
    return latest


def fresh_storage(path: Path, key: str) -> None:
    """Empties `path` unless it holds checkpoints of the run with this key."""
    stamp = path / "spec.key"
    if not (stamp.is_file() and stamp.read_text() == key):
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        atomic_write_text(stamp, key)
