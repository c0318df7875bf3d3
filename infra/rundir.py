"""The run directory: every stage's artifacts plus `manifest.json`, the record of finished stages.

A stage record holds its name, config hash (and config), input fingerprints, outputs (bytes and
sha256 per file, plus the mtime of a local file or the ETag of an object), wall time and finish time.
A rerun skips a stage whose config hash and inputs match and whose outputs are unchanged, and redoes it
otherwise; later stages take earlier stages' fingerprints as inputs, so a redo propagates. A stage's
record is dropped before it is redone and written after its outputs are, and the manifest is the only
object that is ever rewritten (atomically: rename on POSIX, one PUT on a store), so a killed run resumes
at the stage it was in and never trusts half-written outputs.

The directory is a local path, a shared mount, or a bucket URI (`infra.storage`). One driver at a time:
`lock()` takes the directory's lease object, created only if absent (O_EXCL on POSIX, a conditional PUT
on S3) and renewed by a heartbeat; a lease whose holder is gone (a dead pid on this host, or no renewal
for `ttl_s` from another host) is taken over, any other refuses the run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from infra import storage
from infra.configlib import config_hash

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LEASE = ".lease"


class RunDirError(ValueError):
    """A run directory that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class StageResult:
    name: str
    skipped: bool
    record: dict


def _process_start(pid: int) -> float | None:
    """A live process's start time (clock ticks since boot, from /proc), None when it is gone (or a
    zombie); 0.0 where /proc is missing and the process answers signal 0."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else float(fields[19])
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(pid, 0)
            return 0.0
        except ProcessLookupError:
            return None
        except PermissionError:
            return 0.0


class Lease:
    """One driver per directory: a small JSON object {owner, host, pid, started, renewed}."""

    def __init__(self, path, ttl_s: float = 120.0):
        self.path, self.ttl_s = storage.to_path(path), ttl_s
        self.me = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                   "started": _process_start(os.getpid())}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.me, "renewed": time.time()}).encode()

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # torn by a store without atomic writes: nobody's

    def _stale(self, held: dict) -> bool:
        if not held:
            return True
        if held.get("host") == self.me["host"]:  # this machine: is that process still there?
            start = _process_start(int(held.get("pid", -1)))
            return start is None or (held.get("started") is not None and start != held["started"])
        return time.time() - float(held.get("renewed", 0)) > self.ttl_s

    def acquire(self) -> None:
        for _ in range(3):
            if storage.create_once(self.path, self._body()):
                break
            held = self._holder()
            if held is None:
                continue  # released in between
            if not self._stale(held):
                age = time.time() - float(held.get("renewed", 0))
                raise RunDirError(f"run directory {self.path.parent} is in use by another run (pid {held.get('pid')} "
                                  f"on {held.get('host')}, lease renewed {age:.0f}s ago)")
            log.info("taking over the lease of a run that is gone (pid %s on %s)", held.get("pid"), held.get("host"))
            storage.remove(self.path)
        else:
            raise RunDirError(f"run directory {self.path.parent}: could not take its lease")
        if self._holder() and self._holder().get("owner") != self.me["owner"]:  # a store without conditional writes
            raise RunDirError(f"run directory {self.path.parent} was taken by another run at the same moment")
        self._thread = threading.Thread(target=self._beat, daemon=True, name="lease-heartbeat")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                held = self._holder()
                if held and held.get("owner") == self.me["owner"]:
                    storage.atomic_write_bytes(self.path, self._body())
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried; the ttl covers several
                log.warning("lease heartbeat failed: %s", str(exc)[:200])

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
            held = self._holder()
            if held and held.get("owner") == self.me["owner"]:
                storage.remove(self.path)


class RunDir:
    def __init__(self, path):
        p = storage.absolute(path)
        if not storage.is_remote(p):
            if p.exists() and not p.is_dir():
                raise RunDirError(f"run directory {path} exists and is not a directory")
            p.mkdir(parents=True, exist_ok=True)
        self.path = p
        self._lease: Lease | None = None
        manifest = self.manifest()
        if "run_id" not in manifest:  # stable across relaunches: W&B resumes the same run
            manifest.update(run_id=uuid.uuid4().hex[:12], created=time.strftime("%Y-%m-%dT%H:%M:%S"))
            self._write(manifest)

    @property
    def run_id(self) -> str:
        return self.manifest()["run_id"]

    @property
    def remote(self) -> bool:
        return storage.is_remote(self.path)

    def manifest(self) -> dict:
        p = self.path / MANIFEST
        try:
            text = p.read_text()
        except FileNotFoundError:
            return {"stages": {}}
        try:
            return json.loads(text)
        except ValueError as exc:
            raise RunDirError(f"{p} is damaged ({exc}); move it away to rerun every stage") from None

    def lock(self, ttl_s: float = 120.0) -> None:
        """Holds the directory's lease until `unlock` (or until this process is gone)."""
        self._lease = Lease(self.path / LEASE, ttl_s)
        self._lease.acquire()

    def unlock(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def _write(self, manifest: dict) -> None:
        storage.atomic_write_json(self.path / MANIFEST, manifest)

    def rel(self, path) -> str:
        """A location inside the run directory (absolute, or relative to the working directory) -> its
        name relative to the run directory."""
        p, root = str(storage.absolute(path)), str(self.path).rstrip("/")
        if not p.startswith(root + "/"):
            raise ValueError(f"{path} is not inside the run directory {self.path}")
        return p[len(root) + 1:]

    def file_entry(self, path, sha256: str | None = None) -> dict:
        p = self.path / self.rel(path)
        if self.remote:
            info = p.fs.info(p.path)
            return {"bytes": int(info["size"]), "sha256": sha256 or storage.sha256_file(p), "etag": storage.etag(info)}
        st = p.stat()
        return {"bytes": st.st_size, "sha256": sha256 or storage.sha256_file(p), "mtime_ns": st.st_mtime_ns}

    def outputs_fingerprint(self, stage: str) -> str:
        """A hash of a finished stage's config, inputs and outputs: the input fingerprint for the
        stages after it (so prebuilt inputs outside the run directory count too)."""
        rec = self.manifest()["stages"].get(stage)
        if rec is None:
            raise KeyError(f"stage {stage} has not finished in {self.path}")
        outputs = {k: v["sha256"] for k, v in rec["outputs"].items()}
        what = {"config": rec["config_hash"], "inputs": rec["inputs"], "outputs": outputs}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def output_sha256(self, path) -> str | None:
        """The recorded sha256 of an output of a finished stage (None if no stage recorded it)."""
        rel = self.rel(path)
        for rec in self.manifest()["stages"].values():
            if rel in rec.get("outputs", {}):
                return rec["outputs"][rel]["sha256"]
        return None

    def _output_changed(self, rel: str, entry: dict) -> bool:
        p = self.path / rel
        if self.remote:  # objects are written whole: same size and ETag, same bytes
            try:
                info = p.fs.info(p.path)
            except FileNotFoundError:
                return True
            return int(info["size"]) != entry["bytes"] or ("etag" in entry and storage.etag(info) != entry["etag"])
        if not p.is_file():
            return True
        st = p.stat()
        if st.st_size != entry["bytes"]:
            return True
        return st.st_mtime_ns != entry.get("mtime_ns") and storage.sha256_file(p) != entry["sha256"]

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
        self, name: str, fn: Callable[[], dict], *, config: dict, inputs: dict, force: bool = False,
        resources: dict | None = None,
    ) -> StageResult:
        """Runs `fn` unless the stage is up to date. `fn` returns {output location: sha256, a part record
        {key, size, sha256}, or None (hash it here)}; outputs lie inside the run directory. `resources`
        (what it ran on: workers, batch per worker, ...) are recorded as they were, not hashed."""
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
        outputs = {}
        for p, sha in sorted(produced.items(), key=lambda kv: str(kv[0])):
            sha = sha["sha256"] if isinstance(sha, dict) else sha
            outputs[self.rel(p)] = self.file_entry(p, sha)
        record = {
            "name": name, "config_hash": config_hash(config), "config": config, "inputs": inputs,
            "outputs": outputs, "wall_s": round(time.perf_counter() - t0, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if resources:
            record["resources"] = resources
        manifest = self.manifest()
        manifest["stages"][name] = record
        self._write(manifest)
        log.info("stage %s: done in %.1fs", name, record["wall_s"])
        return StageResult(name, False, record)
