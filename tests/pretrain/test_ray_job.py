"""`ray job submit -- python pretrain/run.py` against a real local head node.

The head is this test's own: free ports for everything Ray would otherwise bind at a fixed one (GCS
6379, dashboard 8265, Ray Client 10001, the dashboard agent's HTTP server 52365, which the job server
hands jobs to), a private temp dir, a private auth token (`ray start` refuses to start with token auth
and no token in ~/.ray, as on a fresh machine, instead of creating one as ray.init does), and, at the
end, exactly its own processes killed (found by a tag in their environment and as their children):
never `ray stop`, which stops every Ray instance of the machine, other tests' and other users'.
"""
import importlib.util
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from infra.ray_edge import kill_all, tagged_pids
from tests.conftest import REPO, TOY_RUN

pytestmark = [pytest.mark.ray, pytest.mark.slow]
HEAD_TAG = "DISCOATTR_TEST_RAY_HEAD"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:  # held open together: n different ports
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def ray_head():
    ray = str(Path(sys.executable).with_name("ray"))
    # short: Ray's socket paths under it must stay within the 107 bytes of a unix socket name
    temp = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))
    port, dash, client, agent = _free_ports(4)
    tag = uuid.uuid4().hex
    # As a user with the venv activated: the job's `python` is the venv's. Ray 2.5x clusters require a
    # token and the client only sends it with RAY_AUTH_MODE=token. RAY_API_SERVER_ADDRESS: the state
    # API inside the head's processes (Ray Train's placement-group cleaner) asks this head's dashboard
    # instead of looking for "the" Ray instance of the machine.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")} | {
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), HEAD_TAG: tag,
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dash}",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    client_port = [f"--ray-client-server-port={client}"] if importlib.util.find_spec("grpc") else []
    cmd = [ray, "start", "--head", f"--port={port}", f"--dashboard-port={dash}", *client_port,
           f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp}", "--num-cpus=2",
           "--include-dashboard=true", "--disable-usage-stats"]
    try:
        start = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert start.returncode == 0, (f"ray start --head exited {start.returncode}\n--- stdout\n"
                                       f"{start.stdout[-4000:]}\n--- stderr\n{start.stderr[-4000:]}")
        yield ray, f"http://127.0.0.1:{dash}", env
    finally:
        left = kill_all(tagged_pids(tag, HEAD_TAG))  # the head's processes and all below them
        shutil.rmtree(temp, ignore_errors=True)
        assert not left and not tagged_pids(tag, HEAD_TAG), f"processes of the test's head left: {left}"


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
    assert "Traceback" not in out.stdout + out.stderr  # a clean run reads as one (the workers' logs included)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "shards/shards.json" in manifest["stages"]["shard"]["outputs"]
    assert "final.safetensors" in manifest["stages"]["hash_k16"]["outputs"]  # Ray Train ran inside the job
    assert shutil.which(ray)
