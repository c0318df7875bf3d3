"""Crash rehearsal: the demo pipeline killed with SIGKILL at points spread over its stages, rerun after
each kill, and compared with an uninterrupted run.

    python scripts/rehearse_crash.py                 # shards, run directory, Ray Train storage on s3://
    python scripts/rehearse_crash.py --local DIR     # the same with a POSIX run directory under DIR

Starts a local S3 server (moto, its own process) unless --local, runs `pretrain/run.py` once straight
through, then once more in a second run directory where the driver is SIGKILLed when a kill point is
reached (the first time a stage starts, plus a delay; inside Ray Train once the first checkpoint exists),
restarted after every kill, and finally let finish. Prints one JSON line:

    {"kills": N, "stages_killed": [...], "identical": true|false, "wall_s": ..., "differ": [...]}

`identical`: every output recorded in the final manifests (shards, features, clusters, weights, codes,
figures, evaluation) has the same sha256 in both runs.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from infra import s3local, storage  # noqa: E402
from infra.layout import RunLayout, ray_storage_of  # noqa: E402

# the demo at a size this machine runs in about a minute per pass; checkpoints every 2 steps so that the
# kill inside training lands after one (the rerun then resumes from it)
SETTINGS = [
    "data.patches_per_image=12", "data.images_per_shard=4", "tracking.wandb=disabled",
    "features.out_dim=32", "features.gmm_components=8", "features.desc_pca_dim=32",
    "train.rounds=1", "train.width=0.125", "train.max_steps_per_round=8", "train.checkpoint_every=2",
    "train.global_batch=16", "hash.max_steps=6", "hash.global_batch=16",
    "hash.code_bits=16", "hash.extra_bits=[]", "ray.num_cpus=2",
]
# (stage whose start arms the kill, seconds after it starts; "checkpoint": once Ray Train wrote one)
# (fast stages are killed as soon as they start: a later point could land after they finished)
KILL_POINTS = [("shard", 0.5), ("features", 2.0), ("cluster_round0", 0.0), ("train_round0", "checkpoint"),
               ("hash_k16", "checkpoint"), ("eval", 0.0)]


def _driver(run_dir: str, env: dict, log) -> tuple[subprocess.Popen, queue.Queue]:
    args = [sys.executable, str(REPO / "pretrain" / "run.py"), "--run-dir", run_dir]
    for s in SETTINGS:
        args += ["--set", s]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            log.write(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _has_checkpoint(run_dir: str, stage: str) -> bool:
    lay = RunLayout(run_dir)
    where = ray_storage_of(lay.train_dir(0) if stage.startswith("train") else lay.hash_dir(16))
    try:
        return any(p.name.startswith("checkpoint_") for p in where.rglob("*"))
    except (FileNotFoundError, OSError):
        return False


def _run_until(run_dir: str, env: dict, log, point: tuple | None, timeout_s: float = 900) -> str | None:
    """Runs the driver; with a kill point, SIGKILLs it there -> the stage it was in (None: it finished)."""
    proc, lines = _driver(run_dir, env, log)
    armed_at, deadline = None, time.monotonic() + timeout_s
    while True:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            line = ""
        if line is None:
            proc.wait()
            if proc.returncode != 0:
                raise RuntimeError(f"the driver failed (exit {proc.returncode}); see the log")
            return None
        if point and armed_at is None and f"stage {point[0]}: running" in line:
            armed_at = time.monotonic()
        if point and armed_at is not None:
            ready = _has_checkpoint(run_dir, point[0]) if point[1] == "checkpoint" else \
                time.monotonic() - armed_at >= point[1]
            if ready:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return _running_stage(run_dir)
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the driver did not reach its kill point in time")


def _running_stage(run_dir: str) -> str:
    """The first stage of the pipeline without a record: where the kill landed."""
    done = json.loads((storage.to_path(run_dir) / "manifest.json").read_text())["stages"]
    order = ["shard", "features", "cluster_round0", "train_round0", "report_round0", "hash_k16", "eval"]
    return next((s for s in order if s not in done), "after eval")


def _outputs(run_dir: str) -> dict[str, str]:
    stages = json.loads((storage.to_path(run_dir) / "manifest.json").read_text())["stages"]
    return {f"{name}:{rel}": entry["sha256"] for name, rec in stages.items() for rel, entry in rec["outputs"].items()}


def rehearse(root: str, env: dict, log) -> dict:
    t0 = time.perf_counter()
    reference, crashed = f"{root}/uninterrupted", f"{root}/crashed"
    _run_until(reference, env, log, None)
    killed = []
    for point in KILL_POINTS:
        stage = _run_until(crashed, env, log, point)
        if stage is None:
            break  # finished before this point: nothing left to kill
        killed.append(stage)
        log.write(f"\n=== SIGKILL at {point} -> in stage {stage} ===\n")
    _run_until(crashed, env, log, None)
    a, b = _outputs(reference), _outputs(crashed)
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return {"kills": len(killed), "stages_killed": killed, "identical": not differ and bool(a),
            "wall_s": round(time.perf_counter() - t0, 1), "differ": differ[:10]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--local", metavar="DIR", default=None, help="POSIX run directories under DIR instead of s3://")
    p.add_argument("--log", default=None, help="the drivers' output (default: a file in the temp dir)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="rehearse-"))
    log_path = Path(args.log) if args.log else work / "drivers.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"PYTHONPATH": str(REPO), "DISCOATTR_CACHE": str(work / "cache")}
    with open(log_path, "w") as log:
        if args.local:
            result = rehearse(str(Path(args.local).resolve()), env, log)
        else:
            with s3local.s3_server(log_path=str(work / "s3.log")) as endpoint:
                env |= s3local.env(endpoint)
                os.environ.update(s3local.env(endpoint))  # this process reads the manifests too
                s3local.make_bucket(endpoint, "rehearsal")
                result = rehearse("s3://rehearsal/runs", env, log)
    print(json.dumps(result | {"store": "local" if args.local else "s3", "log": str(log_path)}))
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
