"""A training step's checkpoint (weights, optimizer, step), its seeds and its metrics line: what the
pretraining loop and the detector's loop both write and resume from."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from infra import storage
from infra.session import Session
from pretrain.models.weights import load_weights, save_weights


def write_checkpoint(tensors: dict[str, torch.Tensor], meta: dict, optimizer: torch.optim.Optimizer,
                     step: int) -> Path:
    """A checkpoint directory in a fresh temporary folder (the caller reports, then removes it):
    model.safetensors (tensors + meta), optimizer.pt, step.json."""
    tmp = Path(tempfile.mkdtemp(prefix="discoattr-ckpt-"))
    save_weights(tmp / "model.safetensors", tensors, {**meta, "step": step})
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "step.json").write_text(json.dumps({"step": step}))
    return tmp


def read_checkpoint(ckpt: Path, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], int]:
    """Restores `optimizer` from a checkpoint directory -> (its model tensors, its step)."""
    tensors, _ = load_weights(ckpt / "model.safetensors")
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    return tensors, int(json.loads((ckpt / "step.json").read_text())["step"])


def step_seed(seed: int, rank: int, step: int, stream: int) -> int:
    """A seed for one step's randomness on one rank: a resumed run redraws what the killed one drew."""
    return int(np.random.SeedSequence([seed, rank, step, stream]).generate_state(1)[0])


def log_metrics(path, record: dict, rank: int) -> None:
    """Appends one JSON line to a run's metrics.jsonl (a path or URI), on rank 0 only."""
    if rank == 0:
        storage.append_line(path, json.dumps(record))


def report_checkpoint(session: Session, metrics: dict, step: int, save: Callable[[], Path]) -> None:
    """Rank 0 writes a checkpoint with `save()`, every rank reports (Ray Train's rule), the temporary
    directory goes."""
    ckpt = save() if session.rank == 0 else None
    session.report({**metrics, "step": step}, ckpt)
    if ckpt is not None:
        shutil.rmtree(ckpt, ignore_errors=True)
