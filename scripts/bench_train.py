"""Training throughput against bare baselines measured in the same run: loader, Ray Train, Hamming search.

    python scripts/bench_train.py [--arch alexnet96] [--width 0.25] [--batch 64] [--steps 20] [--repeats 5]
                                  [--loader-workers 1] [--ray-workers 2] [--ray-steps 100] [--peak-tflops 989]

Builds real shards from the demo photos, a cluster file and its members.npy in a temporary directory, then
prints one JSON line:
  loader_steps_per_s, synthetic_steps_per_s  the training step (`pretrain.train.loop._loss`: augmentation on
                        the device + forward/backward, then SGD) fed by `ClusterBatches` over members.npy
                        through `batch_loader(num_workers=--loader-workers)` vs by the same dict batches
                        pre-made in memory and cycled; loader_ratio = loader / synthetic (goal >= 0.9)
  ray_samples_per_s, plain_samples_per_s  `train_worker` on --ray-workers DDP (gloo) CPU processes under
                        Ray Train (`infra.ray_edge.ray_train`) vs under `torch.multiprocessing.spawn` with
                        `LocalSession`, both from rank 0's metrics.jsonl: the median 10-step interval past
                        --ray-warmup steps (start-up excluded); *_cumulative is the last line's rate since
                        the loop began (first steps and checkpoints in); wall times apart: plain_wall_s
                        (spawn to join), ray_wall_s (the `ray_train` call), ray_connect_s (starting the local
                        Ray instance, once); ray_ratio = ray / plain (goal >= 0.95)
  search_s, search_bare_s  `HammingIndex(db).search(q, k)` vs bare `faiss.IndexBinaryFlat` add + search on
                        the same random packed codes; search_ratio = bare / ours (goal >= 0.8)
  train_samples_per_s_bf16, mfu  (CUDA only, else null) alexnet96 width 1, batch 256, bf16 autocast, fed by
                        the real loader; FLOPs per sample counted by FlopCounterMode on one fwd+bwd, peak
                        --peak-tflops (H100 bf16 dense); also the same with synthetic batches
Timings are medians of --repeats, the two sides of each ratio run alternately so drift hits both alike.
With $RAY_ADDRESS set, `connect` joins that cluster instead of starting a local instance.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.eval.retrieval import HammingIndex    # noqa: E402
from pretrain.train.data import ClusterBatches, batch_loader, write_member_pixels    # noqa: E402
from pretrain.train.loop import TrainSpec, _loss, _optimizer, build_net, lr_at, train_worker    # noqa: E402
from infra.session import LocalSession  # noqa: E402
from shards.build import build_shards    # noqa: E402
from shards.sources import list_items    # noqa: E402
from shards.writer import PatchParams    # noqa: E402


def build_members(tmp: Path, patches_per_image: int, clusters: int) -> tuple[Path, Path]:
    """Real shards of the demo photos -> (members.npy, clusters.npz) with clusters of unequal sizes."""
    shards = tmp / "shards"
    build_shards(list_items("demo"), shards, PatchParams(patch_px=96, patches_per_image=patches_per_image, seed=0),
                 images_per_shard=5)
    rng = np.random.default_rng(0)
    n = len(list_items("demo").items) * patches_per_image
    member_index = rng.permutation(n).astype(np.int64)
    cuts = np.sort(rng.choice(np.arange(1, n), clusters - 1, replace=False))
    offsets = np.concatenate([[0], cuts, [n]]).astype(np.int64)
    np.savez(tmp / "clusters.npz", offsets=offsets, member_index=member_index)
    return write_member_pixels(shards, member_index, tmp / "members.npy"), tmp / "clusters.npz"


def spec_for(pixels: Path, clusters: Path, out_dir: Path, args, **kw) -> TrainSpec:
    base = dict(mode="cluster", pixels_path=str(pixels), clusters_path=str(clusters), out_dir=str(out_dir),
                arch=args.arch, width=args.width, batch_size_per_worker=args.batch, progress=False)
    return TrainSpec(**(base | kw))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps_per_s(spec: TrainSpec, num_clusters: int, batches, device: torch.device, warmup: int, steps: int) -> float:
    """The loop body of `train_worker` (one process, no DDP) on a fresh net, timed after `warmup` steps."""
    torch.manual_seed(spec.seed)
    net = build_net(spec, num_clusters).to(device)
    opt = _optimizer(net, spec)
    gen = torch.Generator()
    net.train()
    it = iter(batches)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        batch = next(it)
        gen.manual_seed(spec.seed * 1_000_003 + batch["step"])
        for g in opt.param_groups:
            g["lr"] = lr_at(spec, batch["step"])
        loss, _ = _loss(net, spec, batch, device, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return steps / (time.perf_counter() - t0)


def compare_sources(spec: TrainSpec, device: torch.device, workers: int, warmup: int, steps: int,
                    repeats: int) -> tuple[float, float]:
    """Median steps/s of the real loader and of synthetic in-memory batches, repeats alternating."""
    offsets = np.load(spec.clusters_path)["offsets"]
    data = lambda n: ClusterBatches(spec.pixels_path, offsets, batch_size=spec.batch_size_per_worker,  # noqa: E731
                                    steps=n, seed=spec.seed)
    pin = device.type == "cuda"
    premade = list(data(16))
    if pin:
        premade = [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()} for b in premade]
    synthetic = lambda: ({**b, "step": i} for i, b in enumerate(itertools.cycle(premade)))  # noqa: E731
    real, fake = [], []
    for _ in range(repeats):
        loader = batch_loader(data(warmup + steps), workers, pin_memory=pin)
        real.append(steps_per_s(spec, len(offsets) - 1, loader, device, warmup, steps))
        fake.append(steps_per_s(spec, len(offsets) - 1, synthetic(), device, warmup, steps))
    return statistics.median(real), statistics.median(fake)


def flops_per_sample(spec: TrainSpec, num_clusters: int, device: torch.device) -> float:
    net = build_net(spec, num_clusters).to(device).train()
    b = spec.batch_size_per_worker
    batch = {"step": 0, "image": torch.randint(0, 256, (b, 96, 96, 3), dtype=torch.uint8),
             "cluster": torch.randint(0, num_clusters, (b,))}
    with FlopCounterMode(display=False) as counter:
        loss, _ = _loss(net, spec, batch, device, torch.Generator())
        loss.backward()
    return counter.get_total_flops() / b


def _threaded_train(config: dict, session) -> dict:
    """train_worker with this process's torch threads set first (W processes must not oversubscribe)."""
    config = dict(config)
    torch.set_num_threads(config.pop("__threads__"))
    return train_worker(config, session)


def _plain_rank(rank: int, world: int, port: int, config: dict, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _threaded_train(config, LocalSession(root, device=torch.device("cpu")))
    finally:
        dist.destroy_process_group()


def spawn_plain(world: int, config: dict, root: Path) -> None:
    """`world` gloo ranks of `_threaded_train` as plain processes, with OMP_NUM_THREADS defaulted as Ray
    does for a worker of 1 CPU (`ray_train`'s cpus_per_worker): OpenMP reads it when it loads."""
    unset = "OMP_NUM_THREADS" not in os.environ
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        mp.spawn(_plain_rank, args=(world, _free_port(), config, str(root)), nprocs=world, join=True)
    finally:
        if unset:
            del os.environ["OMP_NUM_THREADS"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def steady_rate(metrics: Path, batch: int, world: int, warmup: int) -> tuple[float, float]:
    """rank 0's metrics.jsonl -> (samples/s over the median log interval past `warmup` steps, the last
    line's cumulative samples/s). Line s logs seen(s) * world / elapsed(s) with seen(s) = s * batch, so
    elapsed(s) can be recovered; the median interval shrugs off other processes' bursts on the node."""
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    t = [(r["step"], r["step"] * batch * world / r["samples_per_s"]) for r in lines if r["step"] >= warmup]
    if len(t) < 2:
        raise ValueError("--ray-steps must exceed --ray-warmup by at least one log interval")
    rates = [(s1 - s0) * batch * world / (t1 - t0) for (s0, t0), (s1, t1) in zip(t, t[1:])]
    return statistics.median(rates), lines[-1]["samples_per_s"]


def bench_ray(pixels: Path, clusters: Path, tmp: Path, args) -> dict:
    import ray

    from infra.ray_edge import connect, ray_train

    w = args.ray_workers
    # a local Ray instance's workers inherit the driver's environment, not its sys.path
    repo = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    runs = {f"{side}_{key}": [] for side in ("plain", "ray") for key in ("wall_s", "samples_per_s", "cumulative")}
    out = {}
    try:
        for r, side in itertools.product(range(args.ray_repeats), ("plain", "ray")):
            d = tmp / f"{side}{r}"
            config = dataclasses.asdict(spec_for(pixels, clusters, d, args, steps=args.ray_steps, log_every=10,
                                                 checkpoint_every=args.ray_checkpoint_every, loader_workers=0))
            config["__threads__"] = args.threads
            if side == "ray" and r == 0:  # Ray starts after the first plain run, so its daemons idle only later
                t0 = time.perf_counter()
                connect(num_cpus=w)
                out["ray_connect_s"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            if side == "plain":
                spawn_plain(w, config, d / "ckpt")
            else:
                ray_train(_threaded_train, config, name="bench", storage_path=d / "ray", num_workers=w,
                          use_gpu=False)
            runs[f"{side}_wall_s"].append(time.perf_counter() - t0)
            steady, cumulative = steady_rate(d / "metrics.jsonl", args.batch, w, args.ray_warmup)
            runs[f"{side}_samples_per_s"].append(steady)
            runs[f"{side}_cumulative"].append(cumulative)
    finally:
        ray.shutdown()
    out |= {k.replace("_cumulative", "_samples_per_s_cumulative"): round(statistics.median(v), 2 if "wall" in k else 1)
            for k, v in runs.items()}
    out["ray_ratio"] = round(out["ray_samples_per_s"] / out["plain_samples_per_s"], 3)
    return {"ray_workers": w, "ray_steps": args.ray_steps, "ray_repeats": args.ray_repeats, **out}


def bench_search(n: int, q: int, bits: int, k: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    db = rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
    queries = rng.integers(0, 256, (q, bits // 8), dtype=np.uint8)

    def bare():
        index = faiss.IndexBinaryFlat(bits)
        index.add(db)
        return index.search(queries, k)

    ours = lambda: HammingIndex(db).search(queries, k)  # noqa: E731
    assert np.array_equal(ours()[0], bare()[0])
    t_ours, t_bare = [], []
    for _ in range(repeats):
        for fn, acc in ((ours, t_ours), (bare, t_bare)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    t_ours, t_bare = statistics.median(t_ours), statistics.median(t_bare)
    return {"search_db": n, "search_queries": q, "search_bits": bits, "search_k": k, "search_device": "cpu",
            "search_s": round(t_ours, 4), "search_bare_s": round(t_bare, 4),
            "search_ratio": round(t_bare / t_ours, 3)}


def bench_bf16(pixels: Path, clusters: Path, tmp: Path, args, device: torch.device) -> dict:
    spec = spec_for(pixels, clusters, tmp, args, arch="alexnet96", width=1.0, batch_size_per_worker=256, amp=True)
    real, fake = compare_sources(spec, device, args.loader_workers, args.warmup, args.steps, args.repeats)
    flops = flops_per_sample(spec, len(np.load(clusters)["offsets"]) - 1, device)
    peak = args.peak_tflops * 1e12
    return {"train_samples_per_s_bf16": round(real * 256, 1), "train_samples_per_s_bf16_synthetic": round(fake * 256, 1),
            "flops_per_sample_bf16": flops, "mfu": round(real * 256 * flops / peak, 4),
            "mfu_synthetic": round(fake * 256 * flops / peak, 4), "peak_tflops": args.peak_tflops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="alexnet96", choices=("alexnet96", "alexnet32"))
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=64, help="samples per step per worker")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per repeat (20 on CPU, 100 on CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (5 on CPU, 20 on CUDA)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    ap.add_argument("--loader-workers", type=int, default=None, help="DataLoader processes (1 on CPU, 4 on CUDA)")
    ap.add_argument("--patches-per-image", type=int, default=200)
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--ray-workers", type=int, default=2)
    ap.add_argument("--ray-steps", type=int, default=100)
    ap.add_argument("--ray-warmup", type=int, default=20)
    ap.add_argument("--ray-checkpoint-every", type=int, default=50,
                    help="steps between checkpoints (each one a report: Ray's persist vs LocalSession's copy)")
    ap.add_argument("--ray-repeats", type=int, default=2, help="plain/Ray run pairs (each Ray run ~1 min on CPU)")
    ap.add_argument("--search-db", type=int, default=100_000)
    ap.add_argument("--search-queries", type=int, default=1000)
    ap.add_argument("--search-bits", type=int, default=64)
    ap.add_argument("--search-k", type=int, default=1000)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="peak bf16 dense TFLOP/s (H100 SXM)")
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    for name, on_cpu, on_cuda in (("loader_workers", 1, 4), ("steps", 20, 100), ("warmup", 5, 20)):
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if cuda else on_cpu)
    torch.set_num_threads(args.threads)
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "cpus": os.cpu_count(),
           "torch_threads": args.threads, "arch": args.arch, "width": args.width, "batch": args.batch,
           "steps": args.steps, "repeats": args.repeats, "loader_workers": args.loader_workers}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pixels, clusters = build_members(tmp, args.patches_per_image, args.clusters)
        out["members"] = len(np.load(pixels, mmap_mode="r"))
        spec = spec_for(pixels, clusters, tmp, args)
        real, fake = compare_sources(spec, device, args.loader_workers, args.warmup, args.steps, args.repeats)
        out |= {"loader_steps_per_s": round(real, 2), "synthetic_steps_per_s": round(fake, 2),
                "loader_samples_per_s": round(real * args.batch, 1), "loader_ratio": round(real / fake, 3)}
        out["flops_per_sample"] = flops_per_sample(spec, args.clusters, device)
        out |= bench_search(args.search_db, args.search_queries, args.search_bits, args.search_k, args.repeats + 2)
        out |= bench_bf16(pixels, clusters, tmp, args, device) if cuda else {
            "train_samples_per_s_bf16": None, "mfu": None}
        if not args.skip_ray:
            out |= bench_ray(pixels, clusters, tmp, args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
