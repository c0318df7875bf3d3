"""Run tracking: JSON lines in the run directory always, Weights & Biases on rank 0 when it works.

`metrics.jsonl` is the ground truth (offline W&B runs cannot be resumed, and W&B may be down);
a tracking failure is logged once and never stops a run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from infra import storage

log = logging.getLogger(__name__)

MODES = ("auto", "online", "offline", "disabled")


def resolve_wandb_mode(mode: str) -> str:
    """auto -> $WANDB_MODE if set, else online with WANDB_API_KEY, else offline."""
    if mode not in MODES:
        raise ValueError(f"tracking.wandb must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "")
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class Tracker:
    def __init__(
        self, run_dir: str | Path, *, run_id: str, run_name: str, config: dict, wandb_mode: str = "auto",
        project: str = "discoattr", entity: str = "", rank: int = 0, init_timeout_s: float = 30.0,
    ):
        self.run_dir = storage.absolute(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        # W&B keeps its files on local disk: the run directory itself, or this node's cache for a bucket
        self.local_dir = (storage.cache_dir() / "wandb" / hashlib.sha256(str(self.run_dir).encode()).hexdigest()[:16]
                          if storage.is_remote(self.run_dir) else self.run_dir)
        if storage.is_remote(self.run_dir):
            self.local_dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.mode = resolve_wandb_mode(wandb_mode) if rank == 0 else "disabled"
        self._wandb = None
        if self.mode != "disabled":
            self._wandb = self._init_wandb(run_id, run_name, config, project, entity, init_timeout_s)

    def _init_wandb(self, run_id, run_name, config, project, entity, timeout):
        try:
            import wandb

            return wandb.init(
                project=project, entity=entity or None, id=run_id, name=run_name, resume="allow",
                dir=str(self.local_dir), config=config, mode=self.mode,
                settings=wandb.Settings(init_timeout=timeout, console="off", silent=True),
            )
        except Exception as exc:  # noqa: BLE001 - tracking must never stop a run
            log.warning("tracking: W&B unavailable (%s); metrics go to %s only", str(exc)[:200], self.path)
            return None

    @property
    def wandb_dir(self) -> str | None:
        return getattr(self._wandb, "dir", None) if self._wandb else None

    def _append(self, record: dict) -> None:
        if self.rank != 0:
            return
        storage.append_line(self.path, json.dumps(record, default=str))

    def _wandb_call(self, fn, *args, **kw) -> None:
        if self._wandb is None:
            return
        try:
            fn(*args, **kw)
        except Exception as exc:  # noqa: BLE001
            log.warning("tracking: W&B call failed (%s); disabling W&B for this run", str(exc)[:200])
            self._wandb = None

    def log(self, metrics: dict, step: int | None = None) -> None:
        self._append({"time": round(time.time(), 3), "step": step, **metrics})
        self._wandb_call(lambda: self._wandb.log(metrics, step=step))

    def log_image(self, name: str, path: str | Path, step: int | None = None) -> None:
        self._append({"time": round(time.time(), 3), "step": step, "image": name, "path": str(path)})

        def _log():
            import wandb

            self._wandb.log({name: wandb.Image(str(storage.local_copy(path)))}, step=step)

        self._wandb_call(_log)

    def summary(self, values: dict) -> None:
        self._append({"time": round(time.time(), 3), "summary": values})
        self._wandb_call(lambda: self._wandb.summary.update(values))

    def finish(self) -> None:
        self._wandb_call(lambda: self._wandb.finish())
        self._wandb = None
