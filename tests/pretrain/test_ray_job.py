"""`ray job submit -- python pretrain/run.py` against a real local head node."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TOY_RUN

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    ray = str(Path(sys.executable).with_name("ray"))
    port, dash = _free_port(), _free_port()
    # As a user with the venv activated: the job's `python` is the venv's. Ray 2.5x clusters require a
    # token and the client only sends it with RAY_AUTH_MODE=token.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_AUTH_MODE": "token", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([ray, "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=2",
                    "--include-dashboard=true", "--disable-usage-stats"], check=True, env=env,
                   capture_output=True, timeout=180)
    try:
        yield ray, f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_job_submit_runs_the_pipeline_on_the_cluster(ray_head, tmp_path):
    ray, address, env = ray_head
    run_dir = tmp_path / "run"
    cmd = [ray, "job", "submit", "--address", address, "--working-dir", ".", "--", "python", "pretrain/run.py",
           "--run-dir", str(run_dir), *TOY_RUN, "--set", "tracking.wandb=disabled"]
    # the job server, and the agent it hands jobs to, come up a little after `ray start` returns (later
    # on a loaded machine): those two refusals are retried, any other failure is the test's
    not_up = ("Connection", "No available agent to submit job")
    for attempt in range(20):
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        if out.returncode == 0 or not any(s in out.stderr + out.stdout for s in not_up):
            break
        time.sleep(3)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "ray: cluster at" in out.stdout  # the driver joined the cluster, not a private instance
    assert "succeeded" in out.stdout + out.stderr
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "shards/shards.json" in manifest["stages"]["shard"]["outputs"]
    assert "final.safetensors" in manifest["stages"]["hash_k16"]["outputs"]  # Ray Train ran inside the job
    assert shutil.which(ray)
