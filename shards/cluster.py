"""The Ray edge of the system: connect to a cluster and fan plain functions out as tasks.

Everything else is plain Python that tests call without Ray; `serial_map` is the same contract
in-process.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

from tqdm.auto import tqdm


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
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
        where = "a local instance"
    cpus = int(ray.cluster_resources().get("CPU", 0))
    return f"ray: {where}, {len(ray.nodes())} node(s), {cpus} CPUs"


def node_gpus() -> float:
    """The most GPUs any one live node of the connected Ray cluster has (0 on a CPU-only cluster):
    a task asking for more can never be scheduled."""
    import ray

    return max((float(n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0.0)


def ray_map(fn: Callable, arg_tuples: Sequence[tuple], *, desc: str, num_cpus: float = 1, num_gpus: float = 0,
            on_result: Callable[[int, object], None] | None = None) -> list:
    """Runs fn(*args) for each tuple as Ray tasks; returns results in input order (progress bar).
    `on_result(i, result)` is called in the driver as each task finishes, in completion order."""
    import ray

    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=2)(fn)
    refs = [task.remote(*args) for args in arg_tuples]
    position = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    with tqdm(total=len(refs), desc=desc, unit="task") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                if on_result is not None:
                    on_result(position[ref], ray.get(ref))
            bar.update(len(done))
    return ray.get(refs)


def serial_map(fn: Callable, arg_tuples: Sequence[tuple], *, desc: str, num_cpus: float = 1, num_gpus: float = 0,
               on_result: Callable[[int, object], None] | None = None) -> list:
    """The same contract as `ray_map`, in this process."""
    results = []
    for i, args in enumerate(tqdm(arg_tuples, desc=desc, unit="task")):
        results.append(fn(*args))
        if on_result is not None:
            on_result(i, results[-1])
    return results
