"""Detection-transfer throughput: one JSON line of figures, ratios measured in the same run.

    python scripts/bench_transfer.py                       # CPU: width-0.25 trunk at the demo scale
    python scripts/bench_transfer.py --width 1 --scale-px 600 --max-size-px 1000   # paper scale (GPU)

Figures:
  proposals_per_s_per_core   selective search (fast mode) on the generated set, one process
  proposals_parallel_eff     Ray tasks over all cores vs cores x the one-process rate
  train_images_per_s         Fast R-CNN fine-tuning (2 images x 64 RoIs a batch), after warm-up
  test_images_per_s, test_ms_per_image   detection on the test split, all proposals per image
  eval_fraction              VOC07 evaluation time / test forward time (goal <= 0.1)
  test_forward_ratio         bare model forward time / whole test time (image decode, NMS included)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np    # noqa: E402
import torch    # noqa: E402

from infra.session import LocalSession, default_device  # noqa: E402
from infra.ray_edge import connect, ray_map, serial_map  # noqa: E402 (Ray itself is imported on first use)
from transfer.data import prepare_image, read_roidb, write_roidb    # noqa: E402
from transfer.engine import DetectorSpec, detect_all, load_detector, train_detector    # noqa: E402
from transfer.proposals import compute_proposals, load_precomputed    # noqa: E402
from transfer.synthetic import make_voc    # noqa: E402
from transfer.voc import VOC_CLASSES, load_split    # noqa: E402
from transfer.voc_eval import evaluate_detections    # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=48, help="generated trainval images (test: half)")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--fc-dim", type=int, default=512)
    p.add_argument("--scale-px", type=int, default=224)
    p.add_argument("--max-size-px", type=int, default=400)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--max-boxes", type=int, default=1000)
    p.add_argument("--loader-workers", type=int, default=None,
                   help="image decoding processes for training and test (default: 4 on a GPU, 0 on CPUs, where "
                   "they take cores from the model)")
    p.add_argument("--voc", default="", help="an existing VOC devkit instead of a generated one")
    p.add_argument("--proposals", default="", help="boxes from this .npz (transfer/proposals.py's format) instead "
                   "of selective search: no proposal figures (for machines without OpenCV contrib or Ray)")
    return p.parse_args()


def bench_proposals(anns, cache: Path, settings: dict) -> dict:
    ids, paths = [a.image_id for a in anns], [str(a.image_path) for a in anns]
    t0 = time.perf_counter()
    props = compute_proposals(ids, paths, cache / "serial", settings=settings, map_fn=serial_map)
    serial_s = time.perf_counter() - t0
    cores = os.cpu_count() or 1
    connect(num_cpus=cores)
    t0 = time.perf_counter()
    compute_proposals(ids, paths, cache / "ray", settings=settings, map_fn=ray_map)
    ray_s = time.perf_counter() - t0
    rate = len(ids) / serial_s
    return props, {"proposals_per_s_per_core": round(rate, 2), "cores": cores,
                   "proposals_parallel_eff": round(len(ids) / ray_s / (cores * rate), 3)}


def bench_test(model, db, device, args) -> dict:
    kw = dict(scale_px=args.scale_px, max_size_px=args.max_size_px, nms_iou=0.3, score_thresh=0.001, max_per_image=100)
    kw.update(device=device, loader_workers=args.loader_workers, progress=False)
    detect_all(model, db, **kw)  # warm-up (allocator, kernels)
    dets, forward_s = detect_all(model, db, **kw)
    gts = db.ground_truth()
    t0 = time.perf_counter()
    evaluate_detections(dets, gts, VOC_CLASSES)
    eval_s = time.perf_counter() - t0
    # the bare network on the same inputs: what the test loop costs beyond the forward pass
    inputs = []
    for i in range(len(db)):
        x, s = prepare_image(db.image(i), args.scale_px, args.max_size_px)
        props = torch.from_numpy(db.boxes(i)) * s
        inputs.append((x[None].to(device), torch.cat([torch.zeros(len(props), 1), props], 1).to(device)))
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        for x, rois in inputs:
            model(x, rois)
        _sync(device)
        bare_s = time.perf_counter() - t0
    return {"test_images_per_s": round(len(db) / forward_s, 2), "test_ms_per_image": round(1e3 * forward_s / len(db), 2),
            "eval_s": round(eval_s, 4), "eval_fraction": round(eval_s / forward_s, 4),
            "test_forward_ratio": round(bare_s / forward_s, 3)}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        tmp = Path(tmp)
        voc = args.voc or make_voc(tmp / "voc", trainval=args.images, test=max(1, args.images // 2), seed=0)
        train_anns, _ = load_split(voc, "trainval")
        test_anns, _ = load_split(voc, "test")
        if args.proposals:
            props, out = load_precomputed(args.proposals, [a.image_id for a in train_anns + test_anns]), {}
        else:
            settings = {"mode": "fast", "max_side_px": 320, "min_size_px": 4, "max_boxes": args.max_boxes}
            props, out = bench_proposals(train_anns + test_anns, tmp / "proposals", settings)
        out["proposals_per_image"] = round(float(np.mean([len(props[a.image_id]) for a in test_anns])), 1)
        write_roidb(tmp / "train.npz", train_anns, props)
        write_roidb(tmp / "test.npz", test_anns, props)
        device = default_device()
        if args.loader_workers is None:
            args.loader_workers = 4 if device.type == "cuda" else 0
        spec = DetectorSpec(roidb=str(tmp / "train.npz"), out_dir=str(tmp / "train"), init="random",
                            width=args.width, fc_dim=args.fc_dim, iterations=args.iterations, lr=0.001,
                            scale_px=args.scale_px, max_size_px=args.max_size_px, loader_workers=args.loader_workers,
                            checkpoint_every=args.iterations, log_every=5, progress=False)
        session = LocalSession(tmp / "ckpt", device=device)
        train_detector(spec.__dict__, session)
        rates = [json.loads(line)["images_per_s"] for line in (tmp / "train" / "metrics.jsonl").read_text().splitlines()]
        out["train_images_per_s"] = round(rates[-1], 2)  # cumulative rate at the end: warm-up amortised
        model = load_detector(session.latest_checkpoint() / "model.safetensors", device)
        out.update(bench_test(model, read_roidb(tmp / "test.npz"), device, args))
        out.update(device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(), width=args.width,
                   scale_px=args.scale_px, max_size_px=args.max_size_px, test_images=len(test_anns))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
