"""The Ray edge of the system: connect to a cluster and fan plain functions out as tasks.

Everything else is plain Python that tests call without Ray; `serial_map` is the same contract
in-process. `ray_train` runs a plain per-process training function under Ray Train's
`TorchTrainer`, handing it a `RaySession` (rank, device, checkpoints); the function never imports Ray.

A local instance (`connect()` without an address) belongs to its driver:

- its processes know their own dashboard (RAY_API_SERVER_ADDRESS, on a free port), so Ray's state API
  inside them never goes looking for "the" Ray instance of the machine. Ray Train's
  `PlacementGroupCleaner` polls that API once a second; without an address it auto-detects the cluster
  from the gcs_server processes it can see and, when there are two (a second run, a test's cluster, a
  killed driver's leftovers), its monitor thread dies with "Found multiple active Ray instances" and a
  traceback, once per `TorchTrainer.fit`; were /tmp/ray/ray_current_cluster (`ray start`) naming another
  cluster, it would ask that one for our controller, find none, and remove the run's placement group.
- it dies with its driver, even by SIGKILL: Ray has the kernel kill the processes ray.init forks (gcs,
  raylet, dashboard, monitors) with the driver, but the raylet's agents (DashboardAgent,
  RuntimeEnvAgent, which catch SIGTERM) mostly outlive the raylet, holding their ports (52365, the
  agent's HTTP port that job submission needs) until someone kills them. A small watcher process
  (`_reap`, in its own process session) follows the session's processes while the driver lives and
  SIGKILLs what is left of them when the driver or the session ends (`ray.shutdown`); the next
  `connect()` also kills what a dead driver's watcher recorded and could not (were it killed too).
  Processes are found by a tag in their environment (set only while ray.init starts them) and as their
  descendants (the agents overwrite their environment with their process title), each by pid and start
  time, so a reused pid is never taken for one of them.
"""
from __future__ import annotations

import atexit
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
TAG_VAR = "DISCOATTR_RAY_SESSION"  # "<driver pid>:<driver start time>:<nonce>", in a local instance's environment


def connect(address: str | None = None, num_cpus: int | None = None) -> str:
    """Connects to `address` or $RAY_ADDRESS (as `ray job submit` sets it); else starts a local
    Ray instance, never silently joining another local cluster. Returns a description."""
    import ray

    if ray.is_initialized():
        return "ray: already connected"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        where = f"cluster at {address}"
    else:
        sweep_dead_sessions()
        _start_local(num_cpus)
        where = "a local instance"
    cpus = int(ray.cluster_resources().get("CPU", 0))
    return f"ray: {where}, {len(ray.nodes())} node(s), {cpus} CPUs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_local(num_cpus: int | None, attempts: int = 3) -> None:
    """ray.init of a local instance whose processes carry the session's tag and their dashboard's
    address (the dashboard serves the state API, which Ray Train's placement-group cleaner polls)."""
    import ray

    for _ in range(attempts):
        port = _free_port()
        me = _proc_stat(os.getpid())
        tag = f"{os.getpid()}:{me[1] if me else 0}:{uuid.uuid4().hex[:8]}"
        env = {TAG_VAR: tag, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the processes ray.init starts inherit these, and the raylet's workers from it
        try:
            ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                           dashboard_port=port, logging_level=logging.WARNING)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        _start_watcher(tag)
        url = str(getattr(ctx, "dashboard_url", None) or "")
        if not url or url.endswith(f":{port}"):
            return
        # another process took the port in between: the dashboard moved, the processes point elsewhere
        ray.shutdown()
    raise RuntimeError(f"could not start a local Ray instance with its dashboard on a free port ({attempts} tries)")


def node_gpus() -> float:
    """The most GPUs any one live node of the connected Ray cluster has (0 on a CPU-only cluster):
    a task asking for more can never be scheduled."""
    import ray

    return max((float(n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0.0)


def _in_flight_limit(num_cpus: float, num_gpus: float) -> int:
    """Tasks submitted at a time: 4x what the cluster runs at once (at least 8)."""
    import ray

    res = ray.cluster_resources()
    slots = [res.get(k, 0.0) / need for k, need in (("CPU", num_cpus), ("GPU", num_gpus)) if need > 0]
    return max(8, math.ceil(4 * (min(slots) if slots else res.get("CPU", 1.0))))


def ray_map(fn: Callable, arg_tuples: Sequence[tuple], *, desc: str, num_cpus: float = 1, num_gpus: float = 0,
            on_result: Callable[[int, object], None] | None = None, max_retries: int = 2) -> list:
    """Runs fn(*args) for each tuple as Ray tasks; returns results in input order (progress bar).
    `on_result(i, result)` is called in the driver as each task finishes, in completion order. A task
    whose worker or node dies is rerun up to `max_retries` times (-1: always); an exception it raises
    is not retried (the tasks are deterministic: it would raise again).

    At most a few times the cluster's capacity is in flight; each finished task's result is fetched
    once, in completion order, and its object reference dropped, so the object store frees it."""
    import ray
    from tqdm.auto import tqdm

    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries)(fn)
    results: list = [None] * len(arg_tuples)
    window = _in_flight_limit(num_cpus, num_gpus)
    position: dict = {}  # in-flight reference -> input index
    submitted = 0
    try:
        with tqdm(total=len(arg_tuples), desc=desc, unit="task") as bar:
            while submitted < len(arg_tuples) or position:
                while submitted < len(arg_tuples) and len(position) < window:
                    position[task.remote(*arg_tuples[submitted])] = submitted
                    submitted += 1
                done, _ = ray.wait(list(position), num_returns=1)
                for ref in done:
                    i = position.pop(ref)
                    results[i] = ray.get(ref)
                    if on_result is not None:
                        on_result(i, results[i])
                bar.update(len(done))
                del done
    except BaseException:
        for ref in position:  # a failed task or an interrupt: stop what is still running
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - finished meanwhile, or Ray going down: the first error counts
                pass
        raise
    return results


def connecting_map(address: str | None = None, num_cpus: int | None = None) -> Callable:
    """`ray_map` that connects (see `connect`) on its first call: a stage whose outputs are cached, or that
    runs in this process, needs no cluster."""

    def map_fn(*args, **kw):
        logging.getLogger(__name__).info(connect(address or None, num_cpus or None))
        return ray_map(*args, **kw)

    return map_fn


def serial_map(fn: Callable, arg_tuples: Sequence[tuple], *, desc: str, num_cpus: float = 1, num_gpus: float = 0,
               on_result: Callable[[int, object], None] | None = None, max_retries: int = 0) -> list:
    """The same contract as `ray_map`, in this process (nothing to retry: an error is raised)."""
    from tqdm.auto import tqdm

    results = []
    for i, args in enumerate(tqdm(arg_tuples, desc=desc, unit="task")):
        results.append(fn(*args))
        if on_result is not None:
            on_result(i, results[-1])
    return results


class RaySession:
    """The session interface of `infra.session` inside a Ray Train worker."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self._tmp: tempfile.TemporaryDirectory | None = None

    def latest_checkpoint(self) -> Path | None:
        """A local copy of the run's latest reported checkpoint (the one to resume from), or None;
        downloaded from the run's storage (a local path or a bucket)."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        self._tmp = tempfile.TemporaryDirectory(prefix="discoattr-resume-")
        return Path(ckpt.to_directory(self._tmp.name))

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)


def _train_with_ray_session(config: dict) -> None:
    fn = config.pop("__train_fn__")
    fn(config, RaySession())


_FINAL_COPIES: list[Path] = []


def _remove_final_copies() -> None:
    for p in _FINAL_COPIES:
        shutil.rmtree(p, ignore_errors=True)


def ray_train(fn: Callable[[dict, object], object], config: dict, *, name: str, storage_path: str | Path,
              num_workers: int, use_gpu: bool, cpus_per_worker: float = 1, max_failures: int = 0,
              keep_checkpoints: int = 2) -> Path:
    """Runs fn(config, session) on `num_workers` Ray Train workers (DDP: gloo on CPUs, NCCL on GPUs).

    Checkpoints go to `storage_path/name`: a local (or shared) path or a bucket URI (s3://...), through
    `infra.storage`. A relaunch with the same `name` and `storage_path` resumes from the run's latest
    checkpoint; `max_failures` worker failures are recovered from it within this call. -> a local
    directory with the final checkpoint's files (a copy, removed when this process exits)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from infra.storage import ray_storage

    path, filesystem = ray_storage(storage_path)
    trainer = TorchTrainer(
        _train_with_ray_session,
        train_loop_config={**config, "__train_fn__": fn},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} finished without a checkpoint")
    if not _FINAL_COPIES:
        atexit.register(_remove_final_copies)
    local = Path(tempfile.mkdtemp(prefix=f"discoattr-{name.replace(os.sep, '-')}-final-"))
    _FINAL_COPIES.append(local)
    return Path(result.checkpoint.to_directory(str(local)))


# -- the processes of a local instance ----------------------------------------------------------------
# Linux /proc; elsewhere these find nothing and do nothing.

def _proc_stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time in clock ticks since boot, state) of a process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[1]), int(fields[19]), fields[0].decode()


def _alive(pid: int, start: int) -> bool:
    """Whether the process `pid` that started at `start` still runs (not a zombie, not a reused pid)."""
    st = _proc_stat(pid)
    return st is not None and st[1] == start and st[2] not in ("Z", "X")


def _processes() -> dict[int, tuple[int, int, str]]:
    try:
        names = os.listdir("/proc")
    except OSError:
        return {}
    table = {}
    for name in names:
        if name.isdigit() and (st := _proc_stat(int(name))) is not None:
            table[int(name)] = st
    return table


def tagged_pids(value: str, var: str = TAG_VAR) -> dict[int, int]:
    """{pid: start time} of the live processes (of this user) whose environment has var=value. A
    process that rewrites its title over its environment (Ray's agents and workers may) is no longer
    found this way; `descendants` of the ones that are finds it."""
    needle = f"\0{var}={value}\0".encode()
    found = {}
    for pid, (_, start, state) in _processes().items():
        if state in ("Z", "X"):
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in b"\0" + env:
            found[pid] = start
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(roots: dict[int, int], table: dict[int, tuple[int, int, str]] | None = None) -> dict[int, int]:
    """{pid: start} of the live `roots` ({pid: start}) and of every live process below them."""
    table = _processes() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out = {p: s for p, s in roots.items() if p in table and table[p][1] == s and table[p][2] not in "ZX"}
    todo = list(out)
    while todo:
        for c in children.get(todo.pop(), ()):
            if c not in out and table[c][2] not in "ZX":
                out[c] = table[c][1]
                todo.append(c)
    return out


def kill_all(pids: dict[int, int], timeout: float = 30.0) -> dict[int, int]:
    """SIGKILLs the processes {pid: start} and whatever they start meanwhile, until none is left or
    `timeout`; -> those still alive (none, normally)."""
    deadline = time.monotonic() + timeout
    left = descendants(pids)
    while left and time.monotonic() < deadline:
        for pid, start in left.items():
            if _alive(pid, start):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        time.sleep(0.2)
        left = descendants({**pids, **left})
    return left


def _state_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"discoattr-ray-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def _state_file(tag: str) -> Path:
    return _state_dir() / (tag.replace(":", "-") + ".json")


_WATCHERS: list[subprocess.Popen] = []


def _start_watcher(tag: str) -> None:
    """Starts `_reap(tag)` in its own process session (a signal to the driver's process group
    does not reach it), with nothing of the driver's but the interpreter."""
    if not os.path.isdir("/proc"):
        return
    _WATCHERS[:] = [w for w in _WATCHERS if w.poll() is None]  # reaps the ones whose session ended
    env = {k: v for k, v in os.environ.items() if k != TAG_VAR}
    code = "import sys; sys.path.insert(0, sys.argv[1]); from infra.ray_edge import _reap; _reap(sys.argv[2])"
    _WATCHERS.append(subprocess.Popen([sys.executable, "-c", code, str(ROOT), tag], env=env, cwd="/",
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True))


def _write_state(path: Path, driver: tuple[int, int], pids: dict[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"driver": list(driver), "pids": sorted(pids.items())}))
    os.replace(tmp, path)


def _reap(tag: str, interval: float = 1.0) -> None:
    """The watcher of one local instance. While its driver lives, follows the processes that ray.init
    started (they carry the session's tag) and everything below them (the raylet's agents and
    workers), recording them in a state file. When the driver is gone, or the processes ray.init
    started are (`ray.shutdown`), SIGKILLs whatever is left of them, and returns."""
    pid, start, _ = tag.split(":")
    driver = (int(pid), int(start))
    state = _state_file(tag)
    core: dict[int, int] = {}  # gcs_server, raylet, dashboard, ...: the driver's tagged children
    tracked: dict[int, int] = {}
    polls = 0
    try:
        while True:
            table = _processes()
            if polls < 10 or polls % 5 == 0:  # the tag: at first, then now and then (it reads every environ)
                for p, s in tagged_pids(tag).items():
                    if p in table and table[p][0] == driver[0] and "/ray/" in _cmdline(p):
                        core.setdefault(p, s)
            now = descendants({**core, **tracked}, table)
            if now != tracked:
                _write_state(state, driver, now)
            tracked, polls = now, polls + 1
            if not _alive(*driver) or (core and not any(p in now for p in core)):
                break
            if not core and polls >= 30:
                return  # no session to watch
            time.sleep(interval)
        kill_all({**tracked, **tagged_pids(tag)})
    finally:
        state.unlink(missing_ok=True)


def sweep_dead_sessions() -> list[int]:
    """Kills what the local instances of dead drivers left running (as their watchers recorded it,
    had they no time to kill it themselves) -> the pids killed. Never touches a live driver's."""
    killed = []
    for path in sorted(_state_dir().glob("*.json")) if _state_dir().is_dir() else []:
        try:
            rec = json.loads(path.read_text())
            driver, pids = tuple(rec["driver"]), {int(p): int(s) for p, s in rec["pids"]}
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _alive(*driver):
            continue
        live = descendants(pids)
        kill_all(live)
        killed += sorted(live)
        path.unlink(missing_ok=True)
    return killed
