"""Where a training process runs: its rank, its device, and where its checkpoints go.

`train_worker` (pretrain/train/loop.py) talks only to this small interface, so the same loop runs
under Ray Train (`infra.ray_edge.RaySession`) and as plain processes (`LocalSession`, used by
tests and by the benchmark's baseline). Checkpoints are directories; rank 0 writes one into a
temporary directory and every rank calls `report` the same number of times (Ray Train's rule).
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

from infra import storage

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
    """Checkpoints under `root/checkpoint_NNNNNNNNN` (step number), the newest `keep` kept; `root` a local
    path or a bucket URI. Rank and world size come from torch.distributed when it is initialised.

    Locally a checkpoint directory is renamed into place whole; on a store its files are uploaded and a
    `.complete` marker written last, and only marked checkpoints count."""

    def __init__(self, root, keep: int = 2, device: torch.device | None = None):
        self.root = storage.absolute(root)
        self.keep = keep
        ready = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if ready else 0
        self.world_size = dist.get_world_size() if ready else 1
        self.device = device or default_device(self.rank if torch.cuda.device_count() > 1 else 0)

    def checkpoints(self) -> list:
        if storage.is_remote(self.root):
            names = {p.rsplit("/", 1)[-1] for p in _ls_dirs(self.root)}
            return sorted(self.root / n for n in names if n.startswith("checkpoint_")
                          and storage.size_of(self.root / n / COMPLETE) is not None)
        return sorted(p for p in self.root.glob("checkpoint_*") if p.is_dir())

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        if not found:
            return None
        if not storage.is_remote(self.root):
            return found[-1]
        local = Path(tempfile.mkdtemp(prefix="discoattr-resume-"))  # outlives the session: the caller reads it
        atexit.register(shutil.rmtree, local, True)
        src = found[-1]
        for key in src.fs.find(src.path):
            rel = key[len(src.path.rstrip("/")) + 1:]
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            src.fs.get_file(key, str(local / rel))
        return local

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is not None and self.rank == 0:
            dst = self.root / f"checkpoint_{int(metrics['step']):09d}"
            if storage.is_remote(self.root):
                storage.rmtree(dst)
                for f in sorted(Path(checkpoint_dir).rglob("*")):
                    if f.is_file():
                        storage.put_file(f, dst / str(f.relative_to(checkpoint_dir)))
                storage.atomic_write_text(dst / COMPLETE, str(metrics["step"]))
            else:
                self.root.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
                shutil.copytree(checkpoint_dir, tmp, dirs_exist_ok=True)
                if dst.exists():
                    shutil.rmtree(dst)
                os.replace(tmp, dst)  # a checkpoint directory appears whole or not at all
            for old in self.checkpoints()[: -self.keep]:
                storage.rmtree(old)
        if self.world_size > 1:
            dist.barrier()  # like ray.train.report: every rank passes here together


COMPLETE = ".complete"


def _ls_dirs(root) -> list[str]:
    try:
        return [e["name"].rstrip("/") for e in root.fs.ls(root.path, detail=True, refresh=True)
                if e["type"] == "directory"]
    except FileNotFoundError:
        return []


def local_trainer(fn, config: dict, *, name: str, storage_path) -> Path:
    """The `ray_train` contract in this process (one worker): checkpoints under storage_path/name (a path
    or URI), resumed from there by a rerun -> a local directory with the final checkpoint's files."""
    session = LocalSession(storage.to_path(storage_path) / name)
    fn(dict(config), session)
    latest = session.latest_checkpoint()
    if latest is None:
        raise RuntimeError(f"training run {name} finished without a checkpoint")
    return latest


def fresh_storage(path, key: str) -> None:
    """Empties `path` (a directory or prefix) unless it holds checkpoints of the run with this key."""
    path = storage.to_path(path)
    stamp = path / "spec.key"
    try:
        same = stamp.read_text() == key
    except FileNotFoundError:
        same = False
    if not same:
        storage.rmtree(path)
        storage.makedirs(path)
        storage.atomic_write_text(stamp, key)
