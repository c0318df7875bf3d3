"""Detection transfer (paper sec. 4.1, Table 1): Fast R-CNN from our conv1-5, scored by the VOC07 metric.

    python transfer/voc07.py --ckpt runs/demo/final.safetensors                 # the generated VOC set
    python transfer/voc07.py --ckpt runs/demo/final.safetensors --init random   # no pretraining, same code
    python transfer/voc07.py --ckpt runs/<id>/final.safetensors --voc /data/VOCdevkit \\
        --config transfer/configs/voc07.yaml                                      # hours on one GPU

Stages (each skipped on rerun when done): selective-search proposals as Ray tasks (cached under
`<run.root>/proposals`, shared by runs), the splits' roidb files, fine-tuning (this process, or Ray
Train DDP when train.num_workers > 1), then test detections and VOC07 AP. Writes `<run dir>/results.json`,
`results.md`, `figures/pr_curves.png`, `figures/detections.png` and `metrics.jsonl`; metrics go to W&B.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python transfer/voc07.py` from a checkout

from infra.cli import add_run_args, check_force, run_dir_of    # noqa: E402
from infra.configlib import ConfigError, dump_yaml, to_dict, valid_keys    # noqa: E402
from pretrain.models.weights import WeightsError    # noqa: E402
from infra.ray_edge import connecting_map    # noqa: E402
from infra.rundir import RunDir, RunDirError    # noqa: E402
from infra.tracking import Tracker    # noqa: E402
from infra.session import default_device, local_trainer  # noqa: E402
from infra import storage  # noqa: E402
from infra.layout import TransferLayout  # noqa: E402
from infra.storage import StorageError, atomic_write_text  # noqa: E402
from transfer import stages    # noqa: E402
from transfer.config import GENERATED, TransferConfig, load_transfer_config    # noqa: E402
from transfer.engine import train_detector    # noqa: E402
from transfer.model import read_conv_weights    # noqa: E402
from transfer.proposals import ProposalError    # noqa: E402
from transfer.synthetic import make_voc    # noqa: E402
from transfer.voc import VocError, find_year_dir    # noqa: E402

log = logging.getLogger("transfer.voc07")
STAGES = (TransferLayout.DATA, TransferLayout.TRAIN, TransferLayout.TEST)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="transfer/voc07.py", description=__doc__.split("\n\n")[0],
                                epilog="config keys: " + ", ".join(valid_keys(TransferConfig)))
    p.add_argument("--ckpt", default="", help="pretraining weights (final.safetensors), a path or URI such as "
                   "s3://bucket/runs/demo/final.safetensors; --init random needs none")
    p.add_argument("--init", choices=("pretrained", "random"), default="pretrained",
                   help="conv1-5 from --ckpt, or He-normal random (the no-pretraining baseline)")
    p.add_argument("--voc", default=None, help="VOCdevkit folder, or 'generated' (default: data.voc)")
    add_run_args(p, stages=STAGES, config_default="transfer/configs/demo.yaml", set_example="train.iterations=500",
                 run_dir_default="<run.root>/<run.name>-<init>")
    return p.parse_args(argv)


def resolve_voc(cfg: TransferConfig) -> Path:
    """The VOC year folder (VOCdevkit/VOC2007); the generated set is built first if asked for."""
    voc = cfg.data.voc
    if voc == GENERATED:
        voc = make_voc(Path(cfg.run.root) / "voc-generated", trainval=cfg.data.generated_trainval,
                       test=cfg.data.generated_test, seed=cfg.data.generated_seed)
    return find_year_dir(voc)


def _trainer(cfg: TransferConfig):
    """trainer(config, name=, storage_path=): this process (CUDA when it sees a GPU), or Ray Train DDP."""
    t = cfg.train
    if t.num_workers == 1 and not t.use_gpu:
        return functools.partial(local_trainer, train_detector)

    def trainer(config: dict, **kw):
        from infra.ray_edge import connect, ray_train

        log.info(connect(cfg.ray.address or None, cfg.ray.num_cpus or None))
        return ray_train(train_detector, config, num_workers=t.num_workers, use_gpu=t.use_gpu,
                         cpus_per_worker=max(1, t.loader_workers), **kw)

    return trainer


def run(cfg: TransferConfig, run_dir, *, init: str, ckpt: str, force: list[str]) -> dict:
    if init == "pretrained" and not ckpt:
        raise WeightsError("--init pretrained needs --ckpt (a final.safetensors); --init random needs none")
    storage.check_location(run_dir, what="run directory")
    if ckpt:
        storage.check_location(ckpt, what="--ckpt")
        read_conv_weights(ckpt)  # a wrong checkpoint fails here, before anything is computed
    year_dir = resolve_voc(cfg)
    run = RunDir(run_dir)
    run.lock()
    lay = TransferLayout(run.path)
    atomic_write_text(lay.config, dump_yaml(cfg))
    tracker = Tracker(run.path, run_id=run.run_id, run_name=run.path.name, config={**to_dict(cfg), "init": init,
                      "ckpt": ckpt}, wandb_mode=cfg.tracking.wandb, project=cfg.tracking.project,
                      entity=cfg.tracking.entity, init_timeout_s=cfg.tracking.init_timeout_s)
    try:
        map_fn = connecting_map(cfg.ray.address, cfg.ray.num_cpus)
        result = stages.data_stage(cfg, run, year_dir, map_fn, force="data" in force)
        summary = json.loads(lay.data_summary.read_text())
        tracker.log({"stage": "data", "skipped": result.skipped,
                     **{f"data/{r}/{k}": v for r, s in summary.items() for k, v in s.items() if k != "split"}})
        trainer = _trainer(cfg)
        result = stages.train_stage(cfg, run, trainer, init=init, ckpt=ckpt, force="train" in force)
        tracker.log({"stage": "train", "skipped": result.skipped, "wall_s": result.record["wall_s"]})
        metrics = lay.train_metrics
        if not result.skipped and metrics.is_file():
            for line in metrics.read_text().splitlines():
                rec = json.loads(line)
                tracker.log({f"train/{k}": v for k, v in rec.items()}, step=rec["step"])
        result = stages.test_stage(cfg, run, device=default_device(), init=init, ckpt=ckpt, force="test" in force)
        results = json.loads(lay.results.read_text())
        tracker.summary({"map": results["map"], **{f"ap/{k}": v for k, v in results["ap"].items() if v is not None},
                         **{f"timing/{k}": v for k, v in results["timing"].items() if k != "device"}})
        for png in sorted(lay.figures.glob("*.png")):
            tracker.log_image(f"test/{png.stem}", png)
        print(lay.results_md.read_text(), end="")
        return results
    finally:
        tracker.finish()
        run.unlock()


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        overrides = list(args.set) + ([f"data.voc={args.voc}"] if args.voc else [])
        cfg = load_transfer_config(args.config, overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        check_force(args.force, STAGES)
        run_dir = run_dir_of(args.run_dir, storage.to_path(cfg.run.root) / f"{cfg.run.name}-{args.init}",
                             cfg.ray.address)
        run(cfg, run_dir, init=args.init, ckpt=args.ckpt, force=args.force)
    except (ConfigError, WeightsError, VocError, ProposalError, RunDirError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
