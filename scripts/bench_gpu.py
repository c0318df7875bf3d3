"""The GPU figures the scale planner needs, in one run: one JSON line per figure.

    python scripts/bench_gpu.py [--out FILE.jsonl] [--small] [--only train,kmeans,svm,export,classify]

  {"bench": "train", ...}   AlexNet-96 (width 1) at batch 256 with bf16 autocast, fed by the real loader
                            (`scripts/bench_train.py`'s measurement): samples_per_s, mfu against
                            --peak-tflops, flops_per_sample (counted by FlopCounterMode)
  {"bench": "kmeans", ...}  `pretrain.cluster.kmeans.kmeans` (FAISS; on the GPU with the `gpu` extra) of
                            --kmeans-n x 256 float32 points into --kmeans-k clusters, 20 iterations: wall_s
  {"bench": "svm", ...}     one block of the discovery's SVMs (`pretrain.cluster.svm.train_svms`):
                            --svm-clusters clusters of 5 members against --svm-negatives negatives with
                            hard-negative mining, imagenet.yaml's C, tolerance and mining rounds: wall_s
  {"bench": "export", ...}  the hashing code export's model pass (`pretrain.train.export.hash_scores`, the
                            function every code task runs) on 96x96 patches: images_per_s
  {"bench": "classify", ...} the classification transfer's feature extraction
                            (`transfer.image_features.trunk_features`, conv1-5 of AlexNet-96 at width 1):
                            STL-10's 96 px images with quadrant pooling and Caltech-101's 150 px with a
                            3-level pyramid: images_per_s of each (decoded images in memory)

Every line carries "device" (the GPU's name, or "cpu") so `scripts/plan_scale.py --measured FILE`
can tell measured GPU figures from CPU ones. `--small` runs every figure at a size a CPU finishes in
seconds (what the test suite runs); the default sizes are the issue's: 1.3M x 256 -> 30k, 1,000 clusters.
Each figure is timed once after a warm-up at a small size (CUDA kernels, FAISS's GPU resources).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.cluster.kmeans import faiss_gpus, kmeans  # noqa: E402
from pretrain.cluster.svm import pick_device, train_svms  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.models.alexnet import HashHead, build_trunk  # noqa: E402
from pretrain.models.weights import save_weights  # noqa: E402
from infra.storage import sha256_file  # noqa: E402

FIGURES = ("train", "kmeans", "svm", "export", "classify")


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def planted(n: int, d: int, centres: int, seed: int = 0, chunk: int = 262144) -> np.ndarray:
    """(n, d) float32 points around `centres` random centres (so k-means has structure to find)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        out[s : s + m] = c[rng.integers(0, centres, m)] + 0.5 * rng.standard_normal((m, d), dtype=np.float32)
    return out


def bench_train(small: bool, peak_tflops: float) -> dict:
    """bench_train.py's bf16 figure (CUDA only; on a CPU its narrow default trunk instead, mfu null)."""
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--skip-ray", "--repeats", "2" if small else "3",
           "--peak-tflops", str(peak_tflops)]
    if small:
        cmd += ["--steps", "3", "--warmup", "1", "--patches-per-image", "20", "--search-db", "1000",
                "--search-queries", "10", "--search-k", "10"]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    got = json.loads(run.stdout.strip().splitlines()[-1])
    cuda = got.get("train_samples_per_s_bf16") is not None
    return {"arch": "alexnet96", "width": 1.0 if cuda else got["width"], "batch": 256 if cuda else got["batch"],
            "amp": "bf16" if cuda else "fp32",
            "samples_per_s": got["train_samples_per_s_bf16"] if cuda else got["loader_samples_per_s"],
            "samples_per_s_synthetic": got.get("train_samples_per_s_bf16_synthetic"),
            "mfu": got.get("mfu"), "flops_per_sample": got.get("flops_per_sample_bf16") or got["flops_per_sample"],
            "loader_workers": got["loader_workers"]}


def bench_kmeans(n: int, k: int, d: int = 256, niter: int = 20) -> dict:
    x = planted(n, d, centres=max(2 * k, 1))
    kmeans(x[: 20 * 64], 64, niter=2)  # warm-up
    wall = timed(lambda: kmeans(x, k, niter=niter, init="random"))
    return {"n": n, "k": k, "d": d, "niter": niter, "faiss_gpus": faiss_gpus(), "wall_s": round(wall, 3)}


def bench_svm(clusters: int, negatives: int, d: int = 256, members: int = 5) -> dict:
    c = load_config(ROOT / "pretrain" / "configs" / "imagenet.yaml").cluster
    feats = planted(clusters * members + negatives, d, centres=clusters).astype(np.float16)
    groups = [np.arange(i * members, (i + 1) * members) for i in range(clusters)]
    neg = np.arange(clusters * members, len(feats))
    kw = dict(c=c.svm_c, tol=c.svm_tol, cache_size=c.cache_size, mining_rounds=c.mining_rounds)
    train_svms(feats, groups[:8], neg[:1000], **kw)  # warm-up
    wall = timed(lambda: train_svms(feats, groups, neg, **kw))
    return {"clusters": clusters, "members_per_cluster": members, "negatives": negatives, "d": d,
            "svm_device": str(pick_device("auto")), "wall_s": round(wall, 3)}


def bench_export(images: int, bits: int = 64) -> dict:
    from pretrain.train.export import hash_scores

    trunk = build_trunk("alexnet96").eval()
    head = HashHead(trunk.feature_dim, bits)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_weights(path, {**trunk.state_dict(), **{f"hash.{k}": v for k, v in head.state_dict().items()}},
                     {"model": {"arch": "alexnet96", "width": 1.0, "dropout": 0.5}})
        patches = np.random.default_rng(0).integers(0, 256, (images, 96, 96, 3), dtype=np.uint8)
        sha = sha256_file(path)
        hash_scores(patches[:64], str(path), sha)  # warm-up: loads the model once (cached)
        wall = timed(lambda: hash_scores(patches, str(path), sha))
    return {"images": images, "bits": bits, "images_per_s": round(images / wall, 1)}


def bench_classify(images: int) -> dict:
    from transfer.image_features import CONV_LAYERS, trunk_features

    trunk = build_trunk("alexnet96").eval().to("cuda" if torch.cuda.is_available() else "cpu")
    out = {"images": images, "layers": list(CONV_LAYERS)}
    for name, px, levels in (("stl10", 96, (2,)), ("caltech101", 150, (1, 2, 4))):
        x = np.random.default_rng(0).integers(0, 256, (images, px, px, 3), dtype=np.uint8)
        trunk_features(trunk, x[:32], CONV_LAYERS, levels)  # warm-up
        wall = timed(lambda: trunk_features(trunk, x, CONV_LAYERS, levels, batch=256))
        out[f"{name}_images_per_s"] = round(images / wall, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="append the JSON lines to this file too")
    ap.add_argument("--small", action="store_true", help="CPU-sized figures (seconds), e.g. for the tests")
    ap.add_argument("--only", default=",".join(FIGURES), help=f"comma-separated subset of {','.join(FIGURES)}")
    ap.add_argument("--kmeans-n", type=int, default=1_300_000)
    ap.add_argument("--kmeans-k", type=int, default=30_000)
    ap.add_argument("--svm-clusters", type=int, default=1000)
    ap.add_argument("--svm-negatives", type=int, default=200_000, help="imagenet.yaml's cluster.cache_size")
    ap.add_argument("--export-images", type=int, default=50_000)
    ap.add_argument("--classify-images", type=int, default=20_000)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="peak bf16 dense TFLOP/s (H100 SXM)")
    args = ap.parse_args()
    only = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = sorted(set(only) - set(FIGURES))
    if unknown:
        ap.error(f"unknown figures {', '.join(unknown)} (choose from {', '.join(FIGURES)})")
    if args.small:
        args.kmeans_n, args.kmeans_k, args.svm_clusters, args.svm_negatives, args.export_images = 20000, 200, 20, 2000, 128
        args.classify_images = 64
    runs = {"train": lambda: bench_train(args.small, args.peak_tflops),
            "kmeans": lambda: bench_kmeans(args.kmeans_n, args.kmeans_k),
            "svm": lambda: bench_svm(args.svm_clusters, args.svm_negatives),
            "export": lambda: bench_export(args.export_images),
            "classify": lambda: bench_classify(args.classify_images)}
    for name in only:
        line = json.dumps({"bench": name, "device": device_name(), **runs[name]()})
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
