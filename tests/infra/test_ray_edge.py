"""The Ray edge against real local Ray instances, each driver its own process: a driver killed with
SIGKILL leaves no Ray process behind (its watcher kills them; if the watcher is killed too, the next
`connect()` does) and the next `connect()` works; Ray Train prints no traceback while another Ray
instance runs on the machine; `ray_map` returns results in input order with a bounded number of tasks
in flight."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from infra import ray_edge
from infra.ray_edge import descendants
from tests.conftest import REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DRIVER = """
import json, os, sys, time
import ray
from infra.ray_edge import connect, descendants
from infra.ray_edge import _proc_stat

print(connect(num_cpus=1), flush=True)
ray.get(ray.remote(lambda: os.getpid()).remote())  # a worker too
me = {os.getpid(): _proc_stat(os.getpid())[1]}
BODY
tree = {p: s for p, s in descendants(me).items() if p != os.getpid()}
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump(sorted(tree.items()), f)
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(float(sys.argv[2]))
"""


def tiny_train(config: dict, session) -> dict:
    """One report with a one-file checkpoint, from every rank. Module level: workers import it."""
    import tempfile

    ckpt = None
    if session.rank == 0:
        ckpt = Path(tempfile.mkdtemp())
        (ckpt / "step.json").write_text('{"step": 1}')
    session.report({"step": 1}, ckpt)
    return {"step": 1}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


class Driver:
    """A driver process: connect(), one task, then it records the processes below it (gcs, raylet,
    dashboard, agents, workers, its watcher) and sleeps."""

    def __init__(self, tmp: Path, name: str, body: str = "", sleep: float = 600):
        self.tree_file, self.log = tmp / f"{name}.tree.json", tmp / f"{name}.log"
        script = tmp / f"{name}.py"
        script.write_text(DRIVER.replace("BODY", textwrap.dedent(body)))
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, str(script), str(self.tree_file), str(sleep)], cwd=REPO,
                                         env=_env(), stdout=log, stderr=subprocess.STDOUT)

    def tree(self, timeout: float = 180) -> dict[int, int]:
        import json

        deadline = time.monotonic() + timeout
        while not self.tree_file.exists():
            assert self.proc.poll() is None, f"driver exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"driver not ready:\n{self.log.read_text()[-4000:]}"
            time.sleep(0.5)
        return {int(p): int(s) for p, s in json.loads(self.tree_file.read_text())}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def drivers(tmp_path):
    made: list[Driver] = []

    def start(name: str, **kw) -> Driver:
        made.append(Driver(tmp_path, name, **kw))
        return made[-1]

    yield start
    for d in made:
        d.stop()
        if d.tree_file.exists():
            ray_edge.kill_all(d.tree(timeout=0))  # whatever a failed test left


def _gone(tree: dict[int, int], timeout: float) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    left = descendants(tree)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = descendants(tree)
    return left


def test_a_killed_driver_leaves_no_ray_process_and_the_next_connect_works(drivers):
    first = drivers("first")
    tree = first.tree()
    names = {p: _cmdline(p) for p in tree}
    assert any("raylet" in n for n in names.values()) and any("_reap" in n for n in names.values()), names
    os.kill(first.proc.pid, signal.SIGKILL)  # not waited for: a zombie until the test reaps it
    left = _gone(tree, timeout=30)
    assert not left, {p: names.get(p) or _cmdline(p) for p in left}
    first.stop()

    # the watcher killed with its driver: the next connect() kills what the watcher had recorded
    second = drivers("second")
    tree = second.tree()
    watcher = [p for p in tree if "_reap" in _cmdline(p)]
    assert len(watcher) == 1
    time.sleep(2)  # the watcher has recorded the session (it polls every second)
    os.kill(watcher[0], signal.SIGKILL)
    os.kill(second.proc.pid, signal.SIGKILL)
    second.stop()
    third = drivers("third", body="print('swept', len(descendants({p: s for p, s in %r.items()})))" % tree,
                    sleep=0)
    third.tree()
    assert third.proc.wait(timeout=120) == 0, third.log.read_text()[-4000:]
    left = _gone(tree, timeout=10)
    assert not left, {p: _cmdline(p) for p in left}
    assert "swept 0" in third.log.read_text()  # gone already when its connect() returned
    assert "ray: a local instance" in third.log.read_text()
    assert not _gone(third.tree(timeout=0), timeout=30)  # and a driver that exits normally leaves nothing


def test_ray_train_prints_no_traceback_next_to_another_ray_instance(drivers, tmp_path):
    other = drivers("other")
    other.tree()  # a second gcs_server on the machine, as when two runs or a test cluster run at once
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        from infra.ray_edge import connect, ray_train
        from tests.infra.test_ray_edge import tiny_train
        print(connect(num_cpus=2), flush=True)
        for i in range(2):
            final = ray_train(tiny_train, {{}}, name=f"tiny{{i}}", storage_path={str(tmp_path / "ray")!r},
                              num_workers=2, use_gpu=False)
            print("final", (final / "step.json").read_text(), flush=True)
    """))
    env = _env() | {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    out = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=400)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert text.count('final {"step": 1}') == 2
    assert "Traceback" not in text and "multiple active Ray instances" not in text, text[-6000:]


def test_ray_map_keeps_input_order_with_few_tasks_in_flight(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_edge, "_in_flight_limit", lambda *a: 3)
    ray_edge.connect(num_cpus=2)
    try:
        seen = []
        out = ray_edge.ray_map(_timed_square, [(i,) for i in range(12)], desc="squares", num_cpus=0.5,
                               on_result=lambda i, r: seen.append((i, r[0])))
        assert [r[0] for r in out] == [i * i for i in range(12)]
        assert sorted(seen) == [(i, i * i) for i in range(12)]
        events = sorted([(t0, 1) for _, t0, _ in out] + [(t1, -1) for _, _, t1 in out], key=lambda e: (e[0], e[1]))
        running = [0]
        for _, step in events:
            running.append(running[-1] + step)
        assert max(running) <= 3  # 4 fit on the 2 CPUs at 0.5 each; 3 are in flight
        with pytest.raises(Exception, match="no 5"):
            ray_edge.ray_map(_fails_at_5, [(i,) for i in range(12)], desc="fails", num_cpus=0.5)
    finally:
        ray.shutdown()


def _timed_square(i: int) -> tuple[int, float, float]:
    t0 = time.time()
    time.sleep(0.3)
    return i * i, t0, time.time()


def _fails_at_5(i: int) -> int:
    if i == 5:
        raise ValueError("no 5")
    return i
