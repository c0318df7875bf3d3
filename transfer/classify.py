"""Classification transfer (paper sec. 4.2, Table 3): a linear classifier and k-NN on image-level features.

    python transfer/classify.py --ckpt runs/<id>/final.safetensors --data /data/my-set              # folder
    python transfer/classify.py --protocol stl10 --data /data/stl10_binary --ckpt runs/<id>/final.safetensors
    python transfer/classify.py --protocol caltech101 --data /data/101_ObjectCategories --ckpt ...
    python transfer/classify.py --data /data/my-set --init random --ckpt ...   # same trunk, random weights
    python transfer/classify.py --data /data/my-set --features hog             # or pixels: the floors

Stages (each skipped on rerun when done): the protocol's splits, image-level features (conv maps pooled
over a grid per layer, or fc6/fc7; Ray tasks over parts of the set when it is large, a GPU when there is
one) cached in the run directory, then per split a linear SVM (C by cross-validation on the training
split) and a cosine k-NN (k likewise). Writes `<run dir>/results.json`, `results.md`,
`figures/confusion.png` and `metrics.jsonl`; metrics go to W&B. `scripts/classify_table.py` puts the
four variants side by side.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python transfer/classify.py` from a checkout

from infra import storage  # noqa: E402
from infra.cli import add_run_args, check_force, run_dir_of  # noqa: E402
from infra.configlib import ConfigError, dump_yaml, to_dict, valid_keys  # noqa: E402
from infra.layout import ClassifyLayout  # noqa: E402
from infra.ray_edge import connecting_map, serial_map  # noqa: E402
from infra.rundir import RunDir, RunDirError  # noqa: E402
from infra.storage import StorageError, atomic_write_text  # noqa: E402
from infra.tracking import Tracker  # noqa: E402
from pretrain.models.alexnet import ARCHS  # noqa: E402
from pretrain.models.weights import WeightsError, load_trunk  # noqa: E402
from transfer import classify_stages as stages  # noqa: E402
from transfer.classify_config import ClassifyConfig, load_classify_config  # noqa: E402
from transfer.image_features import METHODS, FeatureSpec, trunk_arch  # noqa: E402
from transfer.labelled import PROTOCOLS, DataError, LabelledSet, read_caltech101, read_folder, read_stl10  # noqa: E402

log = logging.getLogger("transfer.classify")
STAGES = (ClassifyLayout.DATA, ClassifyLayout.FEATURES, ClassifyLayout.EVAL)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="transfer/classify.py", description=__doc__.split("\n\n")[0],
                                epilog="config keys: " + ", ".join(valid_keys(ClassifyConfig)))
    p.add_argument("--ckpt", default="", help="pretraining weights (final.safetensors), a path or URI; "
                   "with --init random or a baseline it only names the trunk and its input size")
    p.add_argument("--data", default=None, help="the data folder (default: data.path)")
    p.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="folder (default), stl10 or caltech101; picks transfer/configs/classify_<protocol>.yaml")
    p.add_argument("--init", choices=("pretrained", "random"), default="pretrained",
                   help="the trunk's weights: from --ckpt, or He-normal random (the no-pretraining floor)")
    p.add_argument("--features", choices=METHODS, default="trunk",
                   help="trunk (the network's), or the pixels / hog floors through the same probes")
    add_run_args(p, stages=STAGES, config_default="the protocol's", set_example="features.layers=[conv5]",
                 run_dir_default="<run.root>/<run.name or protocol>-<variant>")
    return p.parse_args(argv)


def variant_name(method: str, init: str) -> str:
    """pretrained | random for the trunk's features, else the baseline's name."""
    return init if method == "trunk" else method


def read_set(cfg: ClassifyConfig) -> LabelledSet:
    d = cfg.data
    if not d.path:
        raise ConfigError("no data folder: give --data DIR (or data.path)")
    if d.protocol == "stl10":
        return read_stl10(d.path)
    if d.protocol == "caltech101":
        return read_caltech101(d.path, train_per_class=d.train_per_class or 30, test_per_class=d.test_per_class,
                               splits=d.splits, seed=d.split_seed)
    return read_folder(d.path, train_fraction=d.train_fraction, train_per_class=d.train_per_class,
                       splits=d.splits, seed=d.split_seed)


def feature_spec(cfg: ClassifyConfig, *, method: str, init: str, ckpt: str) -> FeatureSpec:
    """The resolved spec: the trunk's arch and width (the checkpoint's when given), image_px 0 -> the
    trunk's input size, hog_cell_px 0 -> an 8 x 8 grid of cells."""
    if method == "trunk" and init == "pretrained" and not ckpt:
        raise WeightsError("--init pretrained needs --ckpt (a final.safetensors); --init random needs none")
    if ckpt:
        storage.check_location(ckpt, what="--ckpt")
    arch, width = trunk_arch(ckpt, cfg.model.arch, cfg.model.width)
    f = cfg.features
    image_px = cfg.data.image_px or ARCHS[arch].input_px
    return FeatureSpec(method=method, ckpt=ckpt if method == "trunk" and init == "pretrained" else "",
                       init=init if method == "trunk" else "", arch=arch, width=width, seed=cfg.run.seed,
                       layers=f.layers, pool_levels=f.pool_levels, image_px=image_px, pixels_px=f.pixels_px,
                       hog_cell_px=f.hog_cell_px or max(1, image_px // 8), batch=f.batch)


def describe(spec: FeatureSpec) -> str:
    if spec.method == "pixels":
        return f"raw pixels at {spec.pixels_px} px"
    if spec.method == "hog":
        return f"HOG, {spec.hog_cell_px} px cells at {spec.image_px} px"
    pooled = f", max-pooled {'+'.join(f'{g}x{g}' for g in spec.pool_levels)}" \
        if any(n.startswith("conv") for n in spec.layers) else ""
    return f"{spec.init} {spec.arch} x{spec.width:g} {','.join(spec.layers)}{pooled}, at {spec.image_px} px"


def run(cfg: ClassifyConfig, run_dir, *, spec: FeatureSpec, lset: LabelledSet, force: list[str]) -> dict:
    storage.check_location(run_dir, what="run directory")
    run = RunDir(run_dir)
    run.lock()
    lay = ClassifyLayout(run.path)
    variant = variant_name(spec.method, spec.init)
    atomic_write_text(lay.config, dump_yaml(cfg))
    tracker = Tracker(run.path, run_id=run.run_id, run_name=run.path.name,
                      config={**to_dict(cfg), "variant": variant, "ckpt": spec.ckpt},
                      wandb_mode=cfg.tracking.wandb, project=cfg.tracking.project, entity=cfg.tracking.entity,
                      init_timeout_s=cfg.tracking.init_timeout_s)
    try:
        result = stages.data_stage(cfg, run, lset, force="data" in force)
        tracker.log({"stage": "data", "skipped": result.skipped,
                     **{f"data/{k}": v for k, v in lset.summary().items() if isinstance(v, int)}})
        result = stages.features_stage(cfg, run, lset, spec, connecting_map(cfg.ray.address, cfg.ray.num_cpus),
                                       serial_map, force="features" in force)
        meta = json.loads(storage.to_path(lay.features_meta).read_text())
        tracker.log({"stage": "features", "skipped": result.skipped,
                     **{f"features/{k}": v for k, v in meta.items() if isinstance(v, (int, float))}})
        stages.eval_stage(cfg, run, variant=variant, spec=spec, desc=describe(spec), force="eval" in force)
        results = json.loads(storage.to_path(lay.results).read_text())
        tracker.summary({f"{p}/{k}": results[p][k] for p in stages.PROBES for k in ("accuracy", "accuracy_std")})
        tracker.log_image("eval/confusion", lay.confusion_figure)
        print(storage.to_path(lay.results_md).read_text(), end="")
        return results
    finally:
        tracker.finish()
        run.unlock()


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        overrides = ([f"data.protocol={args.protocol}"] if args.protocol else []) + list(args.set) + \
            ([f"data.path={args.data}"] if args.data else [])
        cfg = load_classify_config(args.config, overrides, protocol=args.protocol or "folder")
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        check_force(args.force, STAGES)
        spec = feature_spec(cfg, method=args.features, init=args.init, ckpt=args.ckpt)
        if spec.ckpt:
            load_trunk(spec.ckpt)  # a wrong checkpoint fails here, before anything is written
        lset = read_set(cfg)
        name = f"{cfg.run.name or cfg.data.protocol}-{variant_name(spec.method, spec.init)}"
        run_dir = run_dir_of(args.run_dir, storage.to_path(cfg.run.root) / name, cfg.ray.address)
        run(cfg, run_dir, spec=spec, lset=lset, force=args.force)
    except (ConfigError, WeightsError, DataError, RunDirError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
