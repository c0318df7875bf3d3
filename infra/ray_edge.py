"""The Ray edge of the system: connect to a cluster and fan plain functions out as tasks.

Everything else is plain Python that tests call without Ray; `serial_map` is the same contract
in-process. `ray_train` runs a plain per-process training function under Ray Train's
`TorchTrainer`, handing it a `RaySession` (rank, device, checkpoints); the function never imports Ray.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
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
        # the dashboard serves the state API, which Ray Train's placement-group cleaner polls
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, logging_level=logging.WARNING)
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
        """A local copy of the run's latest reported checkpoint (the one to resume from), or None."""
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


def ray_train(fn: Callable[[dict, object], object], config: dict, *, name: str, storage_path: str | Path,
              num_workers: int, use_gpu: bool, cpus_per_worker: float = 1, max_failures: int = 0,
              keep_checkpoints: int = 2) -> Path:
    """Runs fn(config, session) on `num_workers` Ray Train workers (DDP: gloo on CPUs, NCCL on GPUs).

    A relaunch with the same `name` and `storage_path` resumes from the run's latest checkpoint;
    `max_failures` worker failures are recovered from it within this call. -> the final checkpoint's
    directory (under `storage_path/name`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _train_with_ray_session,
        train_loop_config={**config, "__train_fn__": fn},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=str(Path(storage_path).resolve()),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} finished without a checkpoint")
    return Path(result.checkpoint.path)
