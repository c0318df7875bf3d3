"""The run directory: every stage's artifacts plus `manifest.json`, the record of finished stages.

A stage record holds its name, config hash (and config), input fingerprints, outputs (bytes,
sha256 and mtime per file), wall time and finish time. A rerun skips a stage whose config hash and
inputs match and whose outputs are unchanged (same size; a file whose mtime moved is hashed again),
and redoes it otherwise; later stages take earlier stages' fingerprints as inputs, so a redo
propagates. A stage's record is dropped before it is redone and written after it finishes, the
manifest always atomically, so a killed run resumes at the stage it was in and never trusts
half-rewritten outputs. One driver at a time: `lock()` refuses a directory another run holds.

The run directory is a local or mounted shared path (NFS on a multi-node cluster).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from infra.configlib import config_hash
from infra.storage import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class RunDirError(ValueError):
    """A run directory that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class StageResult:
    name: str
    skipped: bool
    record: dict


class RunDir:
    def __init__(self, path: str | Path):
        if Path(path).exists() and not Path(path).is_dir():
            raise RunDirError(f"run directory {path} exists and is not a directory")
        Path(path).mkdir(parents=True, exist_ok=True)
        self.path = Path(path).resolve()
        self._lock_fd: int | None = None
        manifest = self.manifest()
        if "run_id" not in manifest:  # stable across relaunches: W&B resumes the same run
            manifest.update(run_id=uuid.uuid4().hex[:12], created=time.strftime("%Y-%m-%dT%H:%M:%S"))
            self._write(manifest)

    @property
    def run_id(self) -> str:
        return self.manifest()["run_id"]

    def manifest(self) -> dict:
        p = self.path / MANIFEST
        if not p.is_file():
            return {"stages": {}}
        try:
            return json.loads(p.read_text())
        except ValueError as exc:
            raise RunDirError(f"{p} is damaged ({exc}); move it away to rerun every stage") from None

    def lock(self) -> None:
        """Holds an exclusive lock on the directory until this process exits (or `unlock`)."""
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise RunDirError(f"run directory {self.path} is in use by another run (pid {owner})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _write(self, manifest: dict) -> None:
        atomic_write_json(self.path / MANIFEST, manifest)

    def rel(self, path: str | Path) -> str:
        """A path (absolute, or relative to the working directory) -> relative to the run directory."""
        return str(Path(path).resolve().relative_to(self.path))

    def file_entry(self, path: str | Path, sha256: str | None = None) -> dict:
        p = self.path / self.rel(path)
        st = p.stat()
        return {"bytes": st.st_size, "sha256": sha256 or sha256_file(p), "mtime_ns": st.st_mtime_ns}

    def outputs_fingerprint(self, stage: str) -> str:
        """A hash of a finished stage's config, inputs and outputs: the input fingerprint for the
        stages after it (so prebuilt inputs outside the run directory count too)."""
        rec = self.manifest()["stages"].get(stage)
        if rec is None:
            raise KeyError(f"stage {stage} has not finished in {self.path}")
        outputs = {k: v["sha256"] for k, v in rec["outputs"].items()}
        what = {"config": rec["config_hash"], "inputs": rec["inputs"], "outputs": outputs}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def _output_changed(self, rel: str, entry: dict) -> bool:
        p = self.path / rel
        if not p.is_file():
            return True
        st = p.stat()
        if st.st_size != entry["bytes"]:
            return True
        return st.st_mtime_ns != entry.get("mtime_ns") and sha256_file(p) != entry["sha256"]

    def why_not_done(self, name: str, config: dict, inputs: dict) -> str | None:
        """None when the stage's record matches; otherwise the reason it must run."""
        rec = self.manifest()["stages"].get(name)
        if rec is None:
            return "not run yet"
        if rec["config_hash"] != config_hash(config):
            return "config changed"
        if rec["inputs"] != inputs:
            return "inputs changed"
        for rel, entry in rec["outputs"].items():
            if self._output_changed(rel, entry):
                return f"output {rel} missing or changed"
        return None

    def run_stage(
        self, name: str, fn: Callable[[], dict[str, str | None]], *, config: dict, inputs: dict,
        force: bool = False,
    ) -> StageResult:
        """Runs `fn` unless the stage is up to date. `fn` returns {output path: sha256 or None}
        (paths inside the run directory; None: hash it here)."""
        reason = "forced" if force else self.why_not_done(name, config, inputs)
        if reason is None:
            log.info("stage %s: up to date, skipped", name)
            return StageResult(name, True, self.manifest()["stages"][name])
        log.info("stage %s: running (%s)", name, reason)
        manifest = self.manifest()
        if manifest["stages"].pop(name, None) is not None:  # never trust outputs a killed redo half-wrote
            self._write(manifest)
        t0 = time.perf_counter()
        produced = fn()
        outputs = {self.rel(p): self.file_entry(p, sha) for p, sha in sorted(produced.items())}
        record = {
            "name": name, "config_hash": config_hash(config), "config": config, "inputs": inputs,
            "outputs": outputs, "wall_s": round(time.perf_counter() - t0, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        manifest = self.manifest()
        manifest["stages"][name] = record
        self._write(manifest)
        log.info("stage %s: done in %.1fs", name, record["wall_s"])
        return StageResult(name, False, record)
