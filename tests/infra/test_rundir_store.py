"""The run directory and its lease on a local path and on the S3 server."""
import signal
import subprocess
import sys
import time

import pytest

from infra import storage
from infra.rundir import RunDir, RunDirError
from tests.conftest import REPO


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    return str(tmp_path / "run") if request.param == "local" else request.getfixturevalue("bucket") + "/runs/r"


def test_stages_skip_and_redo_on_any_store(root):
    run = RunDir(root)
    calls = []

    def stage():
        calls.append(1)
        return {storage.atomic_write_text(run.path / "a" / "out.txt", "v1"): None}

    first = run.run_stage("s", stage, config={"k": 1}, inputs={})
    assert first.record["outputs"]["a/out.txt"]["bytes"] == 2
    assert RunDir(root).run_stage("s", stage, config={"k": 1}, inputs={}).skipped and len(calls) == 1
    storage.atomic_write_text(run.path / "a" / "out.txt", "changed")  # an output replaced under the run
    assert run.why_not_done("s", {"k": 1}, {}) == "output a/out.txt missing or changed"
    storage.remove(run.path / "a" / "out.txt")
    assert not run.run_stage("s", stage, config={"k": 1}, inputs={}).skipped and len(calls) == 2
    if storage.is_remote(run.path):  # the manifest is an object in the bucket, not a local file
        assert storage.size_of(storage.to_path(root) / "manifest.json")


def test_lease_refuses_a_second_driver_and_is_released(root):
    first, second = RunDir(root), RunDir(root)
    first.lock()
    with pytest.raises(RunDirError, match="in use by another run"):
        second.lock()
    first.unlock()
    assert storage.size_of(storage.to_path(root) / ".lease") is None
    second.lock()
    second.unlock()


def test_lease_of_a_killed_driver_is_taken_over(root):
    code = ("import sys, time; from infra.rundir import RunDir; r = RunDir(sys.argv[1]); r.lock(); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, root], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirError, match="in use"):
        RunDir(root).lock()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = RunDir(root)
    t0 = time.monotonic()
    run.lock()  # the holder's pid is gone on this host: taken over at once, not after the ttl
    assert time.monotonic() - t0 < 5
    run.unlock()
