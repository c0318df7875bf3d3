"""The pretraining driver: runs the pipeline's stages in one run directory, resuming finished ones.

    python pretrain/run.py                                   # the demo, on a local Ray instance
    python pretrain/run.py --config pretrain/configs/digits.yaml --set data.images_per_shard=500
    ray job submit --working-dir . -- python pretrain/run.py --config pretrain/configs/imagenet.yaml

Connects to the cluster in $RAY_ADDRESS (set by `ray job submit`) or `ray.address`, else starts a
local Ray instance. Writes `<run dir>/config.yaml`, `manifest.json`, `metrics.jsonl` and each
stage's artifacts; a rerun skips the stages whose record still matches.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    # `python pretrain/run.py` puts pretrain/, not the repo root, on sys.path. Under `ray job submit
    # --working-dir .` the uploaded copy is the code that must run, so its root goes first.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain import stages  # noqa: E402
from pretrain.alternation import alternate  # noqa: E402
from pretrain.cluster.discover import ClusteringError  # noqa: E402
from pretrain.config import ConfigError, dump_yaml, load_config, to_dict, valid_keys  # noqa: E402
from pretrain.eval.stage import eval_stage  # noqa: E402
from pretrain.models.weights import WeightsError  # noqa: E402
from infra import layout, storage  # noqa: E402
from infra.layout import RunLayout  # noqa: E402
from infra.rundir import RunDir, RunDirError  # noqa: E402
from infra.tracking import Tracker  # noqa: E402
from pretrain.train.loop import train_worker  # noqa: E402
from pretrain.train.stage import hash_stage  # noqa: E402
from infra.storage import StorageError, atomic_write_text  # noqa: E402
from shards.shardset import ShardError, ShardSet  # noqa: E402
from shards.sources import SourceError  # noqa: E402

log = logging.getLogger("pretrain.run")
STAGES = layout.FORCE_NAMES  # --force names; cluster/train/features: every round, hash: every code length


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pretrain/run.py", description=__doc__.split("\n\n")[0],
        epilog="config keys: " + ", ".join(valid_keys()),
    )
    p.add_argument("--config", default=None, help="experiment YAML (default: pretrain/configs/demo.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. data.patches_per_image=32 (repeatable)")
    p.add_argument("--run-dir", default=None,
                   help="run directory: a path or a bucket URI such as s3://bucket/runs/x (default: <run.root>/<run.name>)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo this stage even if its record matches (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p.parse_args(argv)


def run(cfg, run_dir, force: list[str]) -> dict:
    run_dir = storage.to_path(run_dir)
    storage.check_location(run_dir, what="run directory")  # before anything is written
    data = stages.check_data(cfg)  # a bad source fails here, before Ray starts or anything is written
    if (cfg.ray.address or os.environ.get("RAY_ADDRESS")) and not storage.is_remote(run_dir) \
            and not run_dir.is_absolute():
        # a job's working directory is Ray's unpacked copy of the code, deleted with the job
        raise ConfigError(f"on a cluster the run directory must be an absolute shared path or a bucket URI, "
                          f"got {run_dir}")
    run = RunDir(run_dir)
    run.lock()
    lay = RunLayout(run.path)
    atomic_write_text(lay.config, dump_yaml(cfg))
    from infra.ray_edge import connect, node_gpus

    log.info(connect(cfg.ray.address or None, cfg.ray.num_cpus or None))
    cpu_map = task_map_for(cfg, gpus=0)  # Ray tasks on CPUs, with the configured retries
    gpus = node_gpus()
    if cfg.cluster.gpus_per_task > gpus:  # such tasks would wait forever
        raise ConfigError(f"cluster.gpus_per_task is {cfg.cluster.gpus_per_task} but no node of the Ray cluster "
                          f"has that many GPUs (most on one node: {gpus:g}); 0 runs the SVMs on CPUs")
    if cfg.train.use_gpu and gpus < 1:
        raise ConfigError("train.use_gpu is true but no node of the Ray cluster has a GPU")
    tracker = Tracker(
        run.path, run_id=run.run_id, run_name=cfg.run.name, config=to_dict(cfg), wandb_mode=cfg.tracking.wandb,
        project=cfg.tracking.project, entity=cfg.tracking.entity, init_timeout_s=cfg.tracking.init_timeout_s,
    )
    try:
        result = stages.shard_stage(cfg, run, data, cpu_map, force="shard" in force)
        index = ShardSet.open(stages.shards_root(cfg, run))
        tracker.log({"stage": "shard", "skipped": result.skipped, "wall_s": result.record["wall_s"],
                     "patches": index.total, "shards": len(index.names)})
        log.info("shards: %d patches in %d shards at %s", index.total, len(index.names), index.root)
        try:
            preview = stages.patch_preview(index, lay.figure("patches"), seed=cfg.run.seed)
            tracker.log_image("shard/patches", preview)
        except ShardError as exc:  # a figure never stops a run
            log.warning("patch preview skipped: %s", exc)
        result = stages.features_stage(cfg, run, cpu_map, force="features" in force)
        tracker.log({"stage": "features", "skipped": result.skipped, "wall_s": result.record["wall_s"]})
        log_stage = functools.partial(_log_stage, tracker, lay)
        reports = alternate(cfg, run, index.root, trainer=trainer_for(cfg), task_map=task_map_for(cfg),
                            cluster_map=task_map_for(cfg, gpus=cfg.cluster.gpus_per_task),
                            log_stage=log_stage, force=force)
        for bits in cfg.hash.all_bits:
            result = hash_stage(cfg, run, index.root, bits, trainer_for(cfg), task_map_for(cfg), force="hash" in force)
            log_stage(result, lay.hash_dir(bits) / "metrics.jsonl", layout.hash_stage(bits))
        result = eval_stage(cfg, run, index.root, force="eval" in force)
        _log_eval(tracker, result, lay)
        return {"run_dir": str(run.path), "patches": index.total, "clusters": reports[-1]["clusters"],
                "rounds": reports, "final": str(lay.final)}
    finally:
        tracker.finish()
        run.unlock()


def task_map_for(cfg, gpus: float | None = None):
    """Ray tasks with the configured retries (ray.task_retries); `gpus` each, by default the share for
    CNN inference (features, codes): a quarter GPU when training uses GPUs."""
    from infra.ray_edge import ray_map

    gpus = (0.25 if cfg.train.use_gpu else 0) if gpus is None else gpus
    return functools.partial(ray_map, num_gpus=gpus, max_retries=cfg.ray.task_retries)


def trainer_for(cfg):
    """Ray Train with the configured workers: trainer(config, name=..., storage_path=...); a stage
    recovers from train.max_failures worker failures (-1: any number) at its last checkpoint."""
    from infra.ray_edge import ray_train

    return functools.partial(ray_train, train_worker, num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                             cpus_per_worker=cfg.train.cpus_per_worker, max_failures=cfg.train.max_failures)


def _log_stage(tracker: Tracker, lay: RunLayout, result, metrics, prefix: str) -> None:
    """Records a stage in the tracker: its wall time, a training run's metrics.jsonl (written by its
    rank 0), a clustering round's summary and montage, a round's report."""
    tracker.log({"stage": result.name, "skipped": result.skipped, "wall_s": result.record["wall_s"]})
    r = layout.stage_round(result.name, "cluster")
    if r is not None:
        summary = json.loads(lay.cluster_summary(r).read_text())
        tracker.log({f"{prefix}/{k}": summary[k] for k in ("clusters", "members", "coverage", "purity", "nmi")
                     if k in summary})
        montage = lay.figure(f"clusters_round{r}")
        if montage.is_file() and not result.skipped:
            tracker.log_image(f"cluster/montage_round{r}", montage)
    r = layout.stage_round(result.name, "report")
    if r is not None:
        report = json.loads(lay.report(r).read_text())
        tracker.log({f"{result.name}/{k}": v for k, v in report.items() if isinstance(v, (int, float))})
    if result.skipped or metrics is None or not metrics.is_file():
        return
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        tracker.log({f"{prefix}/{k}": v for k, v in rec.items() if isinstance(v, (int, float))})


def _log_eval(tracker: Tracker, result, lay: RunLayout) -> None:
    tracker.log({"stage": "eval", "skipped": result.skipped, "wall_s": result.record["wall_s"]})
    if lay.retrieval.is_file():
        rows = json.loads(lay.retrieval.read_text())["results"]
        tracker.summary({f"map/{r['method']}/k{r['bits']}": r["map"] for r in rows if "map" in r})
    for png in sorted(lay.figures.glob("*_k*.png")) if lay.figures.exists() else []:
        tracker.log_image(f"eval/{png.stem}", png)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        run_dir = args.run_dir or storage.to_path(cfg.run.root) / cfg.run.name
        unknown = set(args.force) - set(STAGES)
        if unknown:
            raise ConfigError(f"--force: unknown stage(s) {', '.join(sorted(unknown))}; stages: {', '.join(STAGES)}")
        run(cfg, run_dir, args.force)
    except (ConfigError, SourceError, ShardError, RunDirError, ClusteringError, WeightsError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
