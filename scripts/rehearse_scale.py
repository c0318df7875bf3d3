"""A 100x rehearsal of the clustering stage: the real discovery loop, through Ray tasks, on synthetic
features with planted clusters, at two sizes, step by step.

    python scripts/rehearse_scale.py [--sizes 25000,100000] [--out rehearsal.jsonl]      # CI size, ~50 s
    python scripts/rehearse_scale.py --sizes 250000,1000000 --merge-sizes 7500,30000 --out full.jsonl

For each size n: a float16 (n, 256) .npy memmap (as `features/round0.npy`) is generated in chunks (bounded
memory): a Gaussian mixture of n / --patches-per-cluster centres on a 32-D subspace plus isotropic noise,
some patches background only, L2-normalised. Then `pretrain.cluster.discover.Discovery` runs with the
cluster settings of pretrain/configs/imagenet.yaml (block size, k-means init, rounds, coverage), its
max_clusters set to n / --patches-per-cluster and its hard-negative cache kept at ImageNet's share of
N_t (cache_size / (patches / 4)), through `infra.ray_edge.ray_map` as pretrain/run.py builds the mapper
(num_gpus = --gpus-per-task). Every task is wrapped in a meter: its time, the feature bytes it reads
(rows fetched from the memmap x row bytes, counted where the task opens the features; also the kernel's
read_bytes, which the page cache makes ~0), and its peak RSS (VmHWM, reset at task start; memmap pages
touched count). One JSON line per step (init_kmeans, svm_roundR, merge, final, cover):
  {"rehearsal": "cluster", "step", "n", "clusters_in", "clusters", "units" (n x clusters_in), "wall_s",
   "cpu_s" (tasks' + driver's CPU seconds), "task_cpu_s", "task_s" (tasks' wall, summed), "tasks",
   "bytes_read", "io_read_bytes", "peak_rss_mb" (driver, reset per step), "task_peak_rss_mb" (max over
   tasks), "cpus", "loadavg", "device"}
then per step a growth line {"growth": step, "units_ratio", "cpu_ratio", "bytes_ratio", "peak_rss_ratio",
"task_peak_rss_ratio", "wall_ratio", "superlinear": [...], "wall_superlinear"} comparing the sizes: a
figure is superlinear when its ratio exceeds units_ratio by more than --tolerance. CPU seconds, not wall
time, are judged: other work on the same cores stretches wall time but hardly a process's CPU time.
`merge_greedy` lines drive `merge_clusters` alone at --merge-sizes clusters with synthetic firings
(the loop cannot reach 30k clusters on 2 cores). A `calibrate` line gives one task's GEMM GFLOP/s.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pretrain.cluster import discover  # noqa: E402
from pretrain.cluster.discover import Discovery  # noqa: E402
from pretrain.cluster.merge import merge_clusters  # noqa: E402
from pretrain.cluster.stage import discovery_params  # noqa: E402
from pretrain.config import CONFIG_DIR, load_config  # noqa: E402

SUB_DIM, DIM = 32, 256


def make_features(path: Path, n: int, centres: int, *, seed: int = 0, noise: float = 0.25,
                  background: float = 0.2, chunk: int = 65536) -> Path:
    """(n, 256) float16 .npy memmap at `path` and the planted labels (-1: background) beside it."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(DIM, SUB_DIM)))[0].astype(np.float32)  # (256, 32) orthonormal
    mu = rng.normal(size=(centres, SUB_DIM)).astype(np.float32)
    feats = np.lib.format.open_memmap(path, "w+", np.float16, (n, DIM))
    labels = np.lib.format.open_memmap(path.with_name(path.stem + "_labels.npy"), "w+", np.int32, (n,))
    for lo in range(0, n, chunk):
        r = np.random.default_rng([seed, lo // chunk])
        m = min(chunk, n - lo)
        z = np.where(r.random(m) < background, -1, r.integers(0, centres, m))
        x = np.where(z[:, None] >= 0, mu[np.maximum(z, 0)], 0) @ basis.T + noise * r.normal(size=(m, DIM))
        feats[lo : lo + m] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
        labels[lo : lo + m] = z
    feats.flush()
    labels.flush()
    return path


def _status_kb(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return float(line.split()[1])
    return 0.0


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def _cpu_s() -> float:
    """CPU seconds of this process so far (all threads): unlike wall time, not stretched by other
    processes sharing the cores."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _io_read() -> int:
    try:
        return int(next(ln for ln in open("/proc/self/io") if ln.startswith("read_bytes")).split()[1])
    except (OSError, StopIteration):
        return 0


class CountingRows:
    """A features memmap that counts the bytes of every row block fetched from it."""

    def __init__(self, arr, tally: list):
        self._a, self.tally, self.shape, self.dtype = arr, tally, arr.shape, arr.dtype

    def __len__(self):
        return len(self._a)

    def __getitem__(self, idx):
        out = self._a[idx]
        self.tally[0] += out.nbytes
        return out


def measured(fn, *args):
    """Runs the task fn(*args) in this (worker) process -> {"out": its result, "meter": figures}."""
    tally, opened = [0], discover._features
    discover._features = lambda path: CountingRows(opened(path), tally)
    reset_peak()
    io0, t0, cpu0 = _io_read(), time.perf_counter(), _cpu_s()
    try:
        out = fn(*args)
    finally:
        discover._features = opened
    return {"out": out, "meter": {"s": time.perf_counter() - t0, "cpu_s": _cpu_s() - cpu0, "bytes_read": tally[0],
                                  "io_read_bytes": _io_read() - io0, "peak_rss_mb": _status_kb("VmHWM") / 1024}}


class Meter:
    """Per step: wall time, the tasks' figures summed or maxed, the driver's peak RSS."""

    def __init__(self, n: int, emit):
        self.n, self.emit, self.cur = n, emit, None

    def begin(self, step: str, clusters_in: int) -> None:
        self.end()
        reset_peak()
        self.cur = {"step": step, "clusters_in": int(clusters_in), "t0": time.perf_counter(), "cpu0": _cpu_s(),
                    "tasks": 0, "task_s": 0.0, "task_cpu_s": 0.0, "bytes_read": 0, "io_read_bytes": 0,
                    "task_peak_rss_mb": 0.0}

    def task(self, m: dict) -> None:
        c = self.cur
        c["tasks"] += 1
        c["task_s"] += m["s"]
        c["task_cpu_s"] += m["cpu_s"]
        c["bytes_read"] += m["bytes_read"]
        c["io_read_bytes"] += m["io_read_bytes"]
        c["task_peak_rss_mb"] = max(c["task_peak_rss_mb"], m["peak_rss_mb"])

    def end(self) -> None:
        c, self.cur = self.cur, None
        if c is None:
            return
        wall, step, driver_cpu = time.perf_counter() - c.pop("t0"), c.pop("step"), _cpu_s() - c.pop("cpu0")
        c["clusters"] = c.get("clusters", c["clusters_in"])
        self.emit({"rehearsal": "cluster", "step": step, "n": self.n, **c,
                   "units": self.n * c["clusters_in"], "wall_s": round(wall, 3), "task_s": round(c["task_s"], 3),
                   "task_cpu_s": round(c["task_cpu_s"], 3), "cpu_s": round(c["task_cpu_s"] + driver_cpu, 3),
                   "task_peak_rss_mb": round(c["task_peak_rss_mb"], 1),
                   "peak_rss_mb": round(_status_kb("VmHWM") / 1024, 1), "cpus": os.cpu_count(),
                   "loadavg": os.getloadavg()[0]})


def metered_mapper(cluster_map, meter: Meter):
    """`cluster_map` with every task measured; the final SVMs open the `final` step (the merge ends)."""
    def mapper(fn, arg_tuples, *, desc, on_result=None, **kw):
        if desc == "final svms":
            merged = sum(len(a[0]["members"][1]) - 1 for a in arg_tuples)
            meter.cur["clusters"] = merged
            meter.begin("final", merged)

        def got(i, r):
            meter.task(r["meter"])
            if on_result is not None:
                on_result(i, r["out"])
        results = cluster_map(measured, [(fn, *a) for a in arg_tuples], desc=desc, on_result=got, **kw)
        return [r["out"] for r in results]
    return mapper


class MeteredDiscovery(Discovery):
    """The discovery loop with a step boundary at each of its steps (the loop itself unchanged)."""

    meter: Meter

    def _init(self):
        self.meter.begin("init_kmeans", min(self.p.max_clusters, len(self.sets["D1"]) // self.p.init_divisor))
        return self._out(super()._init())

    def _round(self, clusters, r):
        self.meter.begin(f"svm_round{r + 1}", len(clusters))
        return self._out(super()._round(clusters, r))

    def _merge_and_finish(self, clusters):
        self.meter.begin("merge", len(clusters))
        return self._out(super()._merge_and_finish(clusters))

    def _cover(self, clusters):
        self.meter.begin("cover", len(clusters))
        return self._out(super()._cover(clusters))

    def _out(self, clusters):
        self.meter.cur["clusters"] = len(clusters)
        return clusters


def calibrate_gemm(rows: int = 16384, dim: int = 257, clusters: int = 1000, repeats: int = 5) -> dict:
    """One task's float32 GEMM rate, the SVMs' inner operation (GFLOP/s)."""
    import torch

    x, w = torch.randn(rows, dim), torch.randn(clusters, dim)
    x @ w.T
    t0 = time.perf_counter()
    for _ in range(repeats):
        x @ w.T
    return {"gflops": 2 * rows * dim * clusters * repeats / (time.perf_counter() - t0) / 1e9,
            "threads": torch.get_num_threads()}


def cache_size_for(n: int, cfg, share: float, images: int) -> int:
    """The hard-negative cache at the config's share of N_t (a quarter of the patches), so the rehearsal
    mines as the full run would; share <= 0 keeps the config's cache_size."""
    if share < 0:
        share = cfg.cluster.cache_size / (images * cfg.data.patches_per_image / 4)
    return cfg.cluster.cache_size if share == 0 else max(64, int(round(share * n / 4)))


def run_size(n: int, args, cfg, cluster_map, emit, root: Path) -> None:
    """Generates the features for n patches, runs the discovery loop on them, emits its steps."""
    (d := root / f"n{n}").mkdir(parents=True, exist_ok=True)
    clusters = max(2, n // args.patches_per_cluster)
    reset_peak()
    t0 = time.perf_counter()
    path = make_features(d / "round0.npy", n, clusters, seed=args.seed)
    emit({"rehearsal": "cluster", "step": "generate", "n": n, "wall_s": round(time.perf_counter() - t0, 3),
          "bytes_written": n * DIM * 2, "peak_rss_mb": round(_status_kb("VmHWM") / 1024, 1)})
    params = dataclasses.replace(discovery_params(cfg), max_clusters=clusters, device=args.device, seed=args.seed,
                                 cache_size=cache_size_for(n, cfg, args.cache_share, args.images))
    meter = Meter(n, lambda line: emit(line | {"device": args.device}))
    disc = MeteredDiscovery(path, d / "work", params, metered_mapper(cluster_map, meter), key=f"rehearsal-{n}")
    disc.meter = meter
    t0 = time.perf_counter()
    found = disc.run()
    meter.end()
    member_labels = np.load(d / "round0_labels.npy", mmap_mode="r")[found.member_index]  # planted; -1 none
    missed = sum(st.get("violators_outside_cache", 0) for h in disc.history for st in h.get("svm", []))
    majority = sum(np.bincount(m[m >= 0]).max(initial=0) for m in np.split(member_labels, found.offsets[1:-1]))
    emit({"rehearsal": "cluster", "step": "summary", "n": n, "clusters": len(found), "target_clusters": clusters,
          "cache_size": params.cache_size, "block_clusters": params.block_clusters, "rounds": params.rounds,
          "violators_outside_cache": int(missed), "coverage": round(len(np.unique(found.member_index)) / n, 4),
          "purity": round(float(majority / max(len(member_labels), 1)), 4), "wall_s": round(time.perf_counter() - t0, 3)})


def merge_greedy(clusters: int, emit, *, seed: int = 0, k: int = 20, threshold: float = 0.4) -> None:
    """merge_clusters at `clusters` clusters on synthetic firings: a third of them in pairs that fire
    on 15 of the same 20 patches (to be merged), the rest on random patches of a 100-per-cluster pool."""
    rng = np.random.default_rng(seed)
    fire_index = rng.integers(0, clusters * 100, size=(clusters, k))
    pairs = clusters // 6
    fire_index[1 : 2 * pairs : 2, :15] = fire_index[0 : 2 * pairs : 2, :15]
    fire_score = -np.sort(-rng.normal(size=(clusters, k)), axis=1).astype(np.float32)
    members, scores = list(fire_index[:, :5]), list(fire_score[:, :5])
    reset_peak()
    t0, cpu0 = time.perf_counter(), _cpu_s()
    merged, _, _ = merge_clusters(members, scores, lambda m: (fire_index, fire_score), threshold=threshold)
    emit({"rehearsal": "cluster", "step": "merge_greedy", "n": clusters * 100, "clusters_in": clusters,
          "clusters": len(merged), "units": clusters * k, "wall_s": round(time.perf_counter() - t0, 3),
          "cpu_s": round(_cpu_s() - cpu0, 3), "tasks": 0, "task_s": 0.0, "bytes_read": 0, "peak_rss_mb": round(_status_kb("VmHWM") / 1024, 1),
          "cpus": os.cpu_count(), "loadavg": os.getloadavg()[0]})


# figure -> its ratio's name; wall time is shown but not judged (other work shares these cores)
GROWN = {"cpu_s": "cpu_ratio", "bytes_read": "bytes_ratio", "peak_rss_mb": "peak_rss_ratio",
         "task_peak_rss_mb": "task_peak_rss_ratio", "wall_s": "wall_ratio"}


def growth(small: dict, large: dict, tolerance: float) -> dict:
    """Ratios large / small of each figure against the ratio of the work units (n x clusters_in)."""
    units = large["units"] / max(small["units"], 1)
    out = {"rehearsal": "cluster", "growth": small["step"], "n": [small["n"], large["n"]],
           "clusters_in": [small["clusters_in"], large["clusters_in"]], "units_ratio": round(units, 3)}
    flagged = []
    for key, name in GROWN.items():
        if small.get(key) and large.get(key) is not None:
            ratio = large[key] / small[key]
            out[name] = round(ratio, 3)
            if ratio > units * (1 + tolerance) and key != "wall_s":
                flagged.append(key)
    return out | {"superlinear": flagged, "wall_superlinear": out.get("wall_ratio", 0) > units * (1 + tolerance)}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    ap.add_argument("--sizes", type=ints, default=[25000, 100000], help="patches, comma-separated")
    ap.add_argument("--patches-per-cluster", type=int, default=200, help="clusters = patches / this")
    ap.add_argument("--merge-sizes", type=ints, default=[12000, 48000], help="clusters for merge_greedy ('' none)")
    ap.add_argument("--config", default=str(CONFIG_DIR / "imagenet.yaml"), help="the cluster settings")
    ap.add_argument("--set", action="append", default=[], help="config override a.b=c (repeatable)")
    ap.add_argument("--cache-share", type=float, default=-1.0,
                    help="hard-negative cache / N_t (-1: the config's share at --images; 0: its cache_size)")
    ap.add_argument("--images", type=int, default=1281167, help="images the config is meant for (ImageNet)")
    ap.add_argument("--gpus-per-task", type=float, default=0.0, help="as cluster.gpus_per_task (0 here)")
    ap.add_argument("--device", default="cpu", help="the SVM and coverage tasks' torch device (cuda with GPUs)")
    ap.add_argument("--cpus", type=int, default=None, help="the local Ray instance's CPUs (default: all)")
    ap.add_argument("--tolerance", type=float, default=0.3, help="superlinear above units_ratio x (1 + this)")
    ap.add_argument("--work", default=None, help="where the features go (default: a temporary directory)")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    cfg = load_config(args.config, args.set)
    sink = open(args.out, "a") if args.out else None

    def emit(line: dict) -> None:
        text = json.dumps(line)
        print(text, flush=True)
        if sink:
            sink.write(text + "\n")
            sink.flush()

    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *paths])  # Ray's workers import the tasks
    from infra.ray_edge import connect, ray_map

    connect(num_cpus=args.cpus)
    cluster_map = functools.partial(ray_map, num_gpus=args.gpus_per_task)  # as pretrain/run.py builds it
    (cal,) = cluster_map(measured, [(calibrate_gemm,)], desc="calibrate")
    emit({"rehearsal": "cluster", "step": "calibrate", "gemm_gflops_per_task": round(cal["out"]["gflops"], 2),
          "torch_threads": cal["out"]["threads"], "cpus": os.cpu_count(), "loadavg": os.getloadavg()[0]})
    lines: dict = {}

    def keep(line: dict) -> None:
        emit(line)
        lines.setdefault(line["step"], []).append(line)

    with tempfile.TemporaryDirectory(prefix="rehearse-scale-", dir=args.work) as tmp:
        for n in args.sizes:
            run_size(n, args, cfg, cluster_map, keep, Path(tmp))
            for f in Path(tmp).glob(f"n{n}/*.npy"):
                f.unlink()  # the next size's disk
    for c in args.merge_sizes:
        merge_greedy(c, keep, seed=args.seed)
    for step, got in lines.items():
        if "units" in got[0]:
            for small, large in zip(got, got[1:]):
                emit(growth(small, large, args.tolerance))
    if sink:
        sink.close()


if __name__ == "__main__":
    main()
