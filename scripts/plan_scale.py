"""Plans a run at ImageNet scale from measured JSON lines: time, memory and bytes moved per stage.

    python scripts/plan_scale.py --nodes 8 --gpus-per-node 8 --cpus-per-node 64 --net-gbps 200 --gpu h100 \
        [--measured rehearsal.jsonl bench.jsonl ...] [--config pretrain/configs/imagenet.yaml] [--json]
    (--measured defaults to scripts/measured/*.jsonl: what was measured on this repository's machine)
    python scripts/plan_scale.py --reproduce rehearsal.jsonl [--json]

The model, per stage: time = a measured cost per unit (CPU-seconds per patch x cluster of a clustering
step, per patch of feature encoding, FLOPs per training sample, ...) x the run's units / the parallel
slots it gets (CPU cores or GPUs, never more than it has tasks) + bytes moved / network bandwidth.
A clustering step's task CPU time is fit as a x tasks + b x (patches x clusters) over the rehearsal's
sizes (scripts/rehearse_scale.py), its driver CPU time (serial) and its memory per task and in the
driver as linear in the patches. With cluster.gpus_per_task > 0 the tasks' CPU-seconds become GPU-seconds
by the ratio of the GPU's fp32 rate (peak x --gemm-eff, assumed) to the calibrated GEMM rate of one
rehearsal task. Every figure names its source: "measured: <file:line> ..." or "assumed: ...".
--reproduce fits the same model on all but the largest rehearsal size and predicts the largest one.

Lines are read leniently (anything else is skipped): rehearsal lines ({"rehearsal": "cluster", ...}),
bench_cluster ("fv_per_s"), bench_shards ("ours_per_core"), bench_train ("loader_steps_per_s"; on CUDA
"train_samples_per_s_bf16"), bench_transfer ("train_images_per_s"), {"bench": "eval", "n", "wall_s",
["queries"], ["peak_rss_mb"]}, and a GPU training line {"bench": "train", "device": "h100",
"samples_per_s": <per GPU>, ["batch"]} (what a GPU run of the training should print).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pretrain.config import CONFIG_DIR, load_config  # noqa: E402
from pretrain.train.data import PART_ROWS  # noqa: E402

# assumed vendor figures (dense, no sparsity): bf16 and fp32 (non-tensor-core) TFLOP/s, GPU memory GB
GPUS = {"h100": (989.0, 67.0, 80), "h200": (989.0, 67.0, 141), "a100": (312.0, 19.5, 80), "l40s": (362.0, 91.6, 48)}
STEPS = ("init_kmeans", "svm_round1", "svm_round2", "svm_round3", "svm_round4", "merge", "final", "cover")
# assumptions with no measurement behind them (each printed where it is used)
IMAGE_BYTES = 110e3  # mean ImageNet train JPEG (the 1.28M-image set is ~140 GB)
IMAGE_PIXELS_PER_PATCH = 15.0  # a mean ImageNet image (~400 x 350 px) has ~15x a 96x96 patch's pixels
ENCODE_VS_DECODE = 1.5  # JPEG encoding a patch costs ~1.5x decoding it
CLASSES = 1000  # ImageNet classes (evaluation queries = queries_per_class x classes)
BENCH_EVAL_REPEATS = 2  # bench_eval.py's default --repeats (its lines do not say)
NVLINK = {"h100": 450e9, "h200": 450e9, "a100": 300e9, "l40s": 32e9}  # bytes/s per GPU one way (L40S: PCIe)


@dataclass
class Measured:
    """Lines by kind, each kept with its source "file:line"."""

    rehearsal: list = field(default_factory=list)
    calibrate: list = field(default_factory=list)
    summary: list = field(default_factory=list)
    bench: dict = field(default_factory=dict)  # kind -> (line, source), the last one of each kind
    evals: list = field(default_factory=list)  # bench_eval's lines, one per size
    skipped: int = 0


def classify(d: dict) -> str | None:
    if "rehearsal" in d:
        return None if "growth" in d else {"calibrate": "calibrate", "summary": "summary"}.get(d.get("step"), "step")
    if d.get("bench") in ("eval", "train", "kmeans", "svm", "export"):
        return {"train": "gpu_train"}.get(d["bench"], d["bench"])
    for key, kind in (("fv_per_s", "cluster"), ("ours_per_core", "shards"), ("train_images_per_s", "transfer"),
                      ("loader_steps_per_s", "train"), ("train_samples_per_s_bf16", "train")):
        if key in d:
            return kind
    return "?"


def read_measured(paths: list[str]) -> Measured:
    m = Measured()
    for path in paths:
        for i, text in enumerate(Path(path).read_text().splitlines(), 1):
            try:
                d = json.loads(text)
            except ValueError:
                d = None
            kind = classify(d) if isinstance(d, dict) else "?"
            src = f"{Path(path).name}:{i}"
            if kind == "step" and d.get("step") in STEPS and d.get("units"):
                m.rehearsal.append((d, src))
            elif kind in ("calibrate", "summary"):
                getattr(m, kind).append((d, src))
            elif kind in ("?", "step"):
                m.skipped += kind == "?"
            elif kind == "eval" and "n" in d:
                m.evals.append((d, src))
            elif kind is not None:
                m.bench[kind] = (d, src)
    return m


def fit(xs: list[list[float]], y: list[float]) -> np.ndarray:
    """Non-negative least squares y ~ X c; with fewer points than columns, the last column alone."""
    x, y = np.asarray(xs, float), np.asarray(y, float)
    if len(y) < x.shape[1]:
        c = np.zeros(x.shape[1])
        c[-1] = (y / np.maximum(x[:, -1], 1e-30)).mean()
        return c
    return nnls(x, y)[0]


@dataclass
class StepModel:
    """One clustering step: task CPU = a tasks + b units (units = patches x clusters), driver CPU = c + d
    patches (its arrays are per patch), memory per task and in the driver a + b patches."""

    task: np.ndarray
    driver: np.ndarray
    task_mem: np.ndarray
    driver_mem: np.ndarray
    bytes_: np.ndarray
    clusters_share: float  # clusters_in / the k-means target at the largest size
    sources: list

    @classmethod
    def of(cls, lines: list) -> "StepModel":
        ds = [d for d, _ in lines]
        task = fit([[d["tasks"], d["units"]] for d in ds], [d["task_cpu_s"] for d in ds])
        driver = fit([[1, d["n"]] for d in ds], [max(d["cpu_s"] - d["task_cpu_s"], 0) for d in ds])
        task_mem = fit([[1, d["n"]] for d in ds], [d.get("task_peak_rss_mb", 0) for d in ds])
        driver_mem = fit([[1, d["n"]] for d in ds], [d["peak_rss_mb"] for d in ds])
        bytes_ = fit([[d["n"], d["units"]] for d in ds], [d["bytes_read"] for d in ds])
        big = max(ds, key=lambda d: d["n"])
        target = big["n"] // 200 if "target" not in big else big["target"]
        return cls(task, driver, task_mem, driver_mem, bytes_, big["clusters_in"] / max(target, 1),
                   [s for _, s in lines])

    def predict(self, n: float, clusters: float, tasks: int) -> dict:
        units = n * clusters
        return {"task_cpu_s": self.task[0] * tasks + self.task[1] * units,
                "driver_cpu_s": self.driver[0] + self.driver[1] * n,
                "task_mem_mb": self.task_mem[0] + self.task_mem[1] * n,
                "driver_mem_mb": self.driver_mem[0] + self.driver_mem[1] * n,
                "bytes_read": self.bytes_[0] * n + self.bytes_[1] * units}


def step_models(m: Measured, exclude_n: int | None = None) -> dict[str, StepModel]:
    by: dict[str, list] = {}
    targets = {d["n"]: d.get("target_clusters") for d, _ in m.summary}
    for d, src in m.rehearsal:
        if d["n"] != exclude_n:
            by.setdefault(d["step"], []).append(({**d, "target": targets.get(d["n"]) or d["n"] // 200}, src))
    return {step: StepModel.of(lines) for step, lines in by.items()}


def waves(total_s: float, tasks: int, slots: int) -> float:
    """Time of `tasks` equal tasks taking `total_s` together on `slots` parallel slots."""
    return math.ceil(tasks / max(slots, 1)) * total_s / max(tasks, 1)


def flops_per_sample(arch: str, width: float, clusters: int) -> tuple[float, int] | tuple[None, None]:
    """FLOPs of one training sample (forward + backward of the trunk and its softmax head), counted by
    torch's FlopCounterMode on a batch of 2 on the CPU, and the parameters; (None, None) without torch."""
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from pretrain.models.alexnet import ARCHS, ClusterHead, build_trunk
    except ImportError:
        return None, None
    trunk = build_trunk(arch, width=width)
    head = ClusterHead(trunk.feature_dim, clusters)
    px = ARCHS[arch].input_px
    with FlopCounterMode(display=False) as counter:
        head(trunk(torch.randn(2, 3, px, px))).logsumexp(1).sum().backward()
    params = sum(p.numel() for p in [*trunk.parameters(), *head.parameters()])
    return counter.get_total_flops() / 2, params


@dataclass
class Cluster:
    nodes: int
    gpus_per_node: int
    cpus_per_node: int
    net_gbps: float
    gpu: str

    @property
    def cpus(self) -> int:
        return self.nodes * self.cpus_per_node

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def node_bw(self) -> float:  # bytes/s through one node's network
        return self.net_gbps * 1e9 / 8


class Planner:
    """Rows {stage, count, time_s (each), slots, task_mem_mb, driver_mem_mb, bytes, sources} for one run."""

    def __init__(self, cfg, cl: Cluster, m: Measured, *, images: int, mfu: float, gemm_eff: float,
                 min_step_ms: float = 10.0):
        self.cfg, self.cl, self.m, self.mfu, self.gemm_eff = cfg, cl, m, mfu, gemm_eff
        self.min_step_s = min_step_ms / 1e3
        self.images, self.n = images, images * cfg.data.patches_per_image
        self.bf16, self.fp32, _ = GPUS[cl.gpu]
        self.rows: list[dict] = []

    def bench(self, kind: str, key: str, default: float, why: str) -> tuple[float, str]:
        line = self.m.bench.get(kind)
        if line and isinstance(line[0].get(key), (int, float)):
            return float(line[0][key]), f"measured: {line[1]} {key}={line[0][key]}"
        return default, f"assumed: {key}={default} ({why}; give the bench's line to measure it)"

    def add(self, stage: str, time_s: float, *, count: int = 1, slots: str = "", task_mem_mb=None,
            driver_mem_mb=None, bytes_=0.0, sources=()) -> None:
        self.rows.append({"stage": stage, "count": count, "time_s": time_s, "slots": slots,
                          "task_mem_mb": task_mem_mb, "driver_mem_mb": driver_mem_mb, "bytes": bytes_,
                          "sources": list(sources)})

    def net(self, bytes_: float, nodes: int) -> float:
        return bytes_ / (max(nodes, 1) * self.cl.node_bw)

    def net_source(self) -> str:
        return f"assumed: {self.cl.net_gbps:g} Gb/s per node, storage serving every node at that rate"

    def coverage(self) -> tuple[float, str]:
        if self.m.summary:
            d, src = max(self.m.summary, key=lambda x: x[0]["n"])
            return d["coverage"], f"measured: {src} coverage={d['coverage']} (synthetic features; digits: 0.70-0.85)"
        return 0.7, "assumed: coverage 0.7 (imagenet.yaml's comment)"

    def data_stages(self) -> None:
        c, cfg = self.cl, self.cfg
        bare, s1 = self.bench("shards", "bare_decode_per_core", 1500.0, "96x96 JPEG decodes/s per core")
        per_patch, s2 = self.bench("shards", "bytes_per_patch_ours", 6000.0, "shard bytes per patch")
        core_s = self.images * (IMAGE_PIXELS_PER_PATCH + cfg.data.patches_per_image * ENCODE_VS_DECODE) / bare
        tasks = math.ceil(self.images / cfg.data.images_per_shard)
        moved = self.images * IMAGE_BYTES + self.n * per_patch
        self.add("shard build", waves(core_s, tasks, c.cpus) + self.net(moved, c.nodes), slots=f"{c.cpus} cores",
                 bytes_=moved, sources=[s1, s2, f"assumed: an image decodes like {IMAGE_PIXELS_PER_PATCH:g} patches,"
                                        f" encoding a patch {ENCODE_VS_DECODE:g}x its decode, {IMAGE_BYTES / 1e3:g} kB"
                                        " per source image", self.net_source()])
        fv, s3 = self.bench("cluster", "fv_per_s", 60.0, "Fisher vectors/s per core")
        line = self.m.bench.get("cluster")
        threads = line[0].get("torch_threads", 1) if line else 1
        fv /= threads  # a bench run with several threads: per core, as if it used them all
        scale = cfg.features.gmm_components / 32  # bench_cluster encodes with 32 Gaussians
        core_s = self.n / fv * scale
        moved = self.n * per_patch + self.n * cfg.features.out_dim * 2
        self.add("init features", waves(core_s, tasks, c.cpus) + self.net(moved, c.nodes), slots=f"{c.cpus} cores",
                 bytes_=moved, sources=[s3 + (f" on {threads} threads ({line[0].get('fv_patches')} patches)"
                                              if line else ""),
                                        f"assumed: cost x {scale:g} for {cfg.features.gmm_components} Gaussians vs "
                                        "the bench's 32 (the encoding dominates)", s2, self.net_source()])

    def cluster_stages(self) -> None:
        cfg, c, cc = self.cfg, self.cl, self.cfg.cluster
        models = step_models(self.m)
        if not models:
            self.add("clustering", float("nan"), sources=["not measured: give scripts/rehearse_scale.py's lines"])
            return
        k = min(cc.max_clusters, int(self.n * (1 - cc.natural_fraction) / 2) // cc.init_divisor)
        on_gpu = cc.gpus_per_task > 0
        slots = int(c.gpus / cc.gpus_per_task) if on_gpu else c.cpus
        device = self.m.rehearsal[-1][0].get("device", "cpu")
        factor, conv = 1.0, "measured on the rehearsal's device"
        if on_gpu and device == "cpu":
            cal = max(self.m.calibrate, key=lambda x: x[0].get("gemm_gflops_per_task", 0), default=None)
            gflops = cal[0]["gemm_gflops_per_task"] if cal else 50.0
            factor = gflops / (self.fp32 * 1e3 * self.gemm_eff)
            conv = (f"assumed: a task's CPU-second is {factor:.2g} {c.gpu} GPU-seconds ({self.fp32:g} TFLOP/s fp32"
                    f" x gemm_eff {self.gemm_eff:g} vs {gflops:g} GFLOP/s per task, "
                    + (f"measured: {cal[1]}" if cal else "assumed") + ")")
        count = {"init_kmeans": 1, "merge": cfg.train.rounds, "final": cfg.train.rounds, "cover": cfg.train.rounds}
        for step in STEPS:
            if step not in models:
                continue
            mod = models[step]
            clusters = k * mod.clusters_share
            rows = self.n if step == "cover" else 0
            tasks = (1 if step == "init_kmeans" else math.ceil(rows / cc.cover_rows) if step == "cover"
                     else math.ceil(clusters / cc.block_clusters))
            p = mod.predict(self.n, clusters, tasks)
            moved = self.n * cfg.features.out_dim * 2 * c.nodes if step == "svm_round1" else 0.0  # a copy per node
            if step == "cover":  # each task returns its clusters' top-n (12 B each) and its rows' best
                moved += tasks * self.n * 12 + self.n * 12
            kslots = 1 if step == "init_kmeans" else slots
            task_s, how = p["task_cpu_s"] * factor, conv
            km = self.gpu_line("kmeans", "wall_s") if step == "init_kmeans" and on_gpu else None
            if km:  # FAISS k-means measured on this GPU: scaled by points x centroids x iterations
                d = km[0]
                d1 = int(self.n * (1 - cc.natural_fraction) / 2)
                task_s = d["wall_s"] * d1 * k * cc.kmeans_iters / (d["n"] * d["k"] * d.get("niter", 20))
                how = f"measured: {km[1]} {d['n']} x {d['k']} in {d['wall_s']} s, scaled by points x centroids x iters"
            time_s = waves(task_s, tasks, kslots) + p["driver_cpu_s"] + self.net(moved, 1)
            self.add(f"clustering: {step}", time_s, count=count.get(step, cfg.train.rounds),
                     slots=f"{min(kslots, tasks)} of {kslots} {'GPUs' if on_gpu else 'cores'} ({tasks} tasks)",
                     task_mem_mb=p["task_mem_mb"], driver_mem_mb=p["driver_mem_mb"], bytes_=moved,
                     sources=[f"measured: {', '.join(mod.sources)} fit task CPU {mod.task[0]:.3g} s/task + "
                              f"{mod.task[1]:.3g} s/(patch x cluster), driver {mod.driver[1]:.3g} s/patch; "
                              f"{clusters:.0f} clusters ({mod.clusters_share:.3f} of k={k}), local reads "
                              f"{p['bytes_read'] / 1e9:.1f} GB", how]
                     + ([self.net_source()] if moved else []))

    def member_pixels(self) -> tuple[float, str]:
        cov, src = self.coverage()
        members = self.n * cov
        key = "local_store_per_core" if "local_store_per_core" in self.m.bench.get("shards", ({},))[0] \
            else "ours_shuffled_per_core"  # PatchStore's random access (bench_shards --s3), else the stream's
        rate, s1 = self.bench("shards", key, 1000.0, "patches/s per core, random order")
        px = self.cfg.data.patch_size_px
        moved = members * px * px * 3
        tasks = math.ceil(members / PART_ROWS)  # decoding tasks, then one assembly task on one node
        decode = waves(members / rate, tasks, self.cl.cpus)
        self.add("member pixels", decode + self.net(moved, self.cl.nodes) + self.net(2 * moved, 1),
                 count=self.cfg.train.rounds, slots=f"{min(tasks, self.cl.cpus)} cores + 1 node",
                 bytes_=3 * moved, sources=[src, s1, f"assumed: {tasks} decoding tasks of {PART_ROWS} members"
                                            " write parts, one task on one node reads them and writes members.npy", self.net_source()])
        return members, src

    def gpu_line(self, kind: str, key: str):
        """A bench line of `kind` measured on this plan's GPU (its device names it) with `key`, or None."""
        line = self.m.bench.get(kind)
        ok = line and line[0].get(key) and self.cl.gpu in str(line[0].get("device", "")).lower()
        return line if ok else None

    def gpu_rate(self, flops: float | None, clusters: int) -> tuple[float, str]:
        """Training samples/s per GPU: a measured GPU line, else peak bf16 x MFU / FLOPs per sample."""
        line = self.gpu_line("gpu_train", "samples_per_s")
        if line:
            return float(line[0]["samples_per_s"]), f"measured: {line[1]} samples_per_s={line[0]['samples_per_s']}"
        line = self.m.bench.get("train")
        if line and line[0].get("train_samples_per_s_bf16") and self.cl.gpu in str(line[0].get("device", "")).lower():
            v = line[0]["train_samples_per_s_bf16"]
            return float(v), f"measured: {line[1]} train_samples_per_s_bf16={v} (batch 256)"
        if flops is None:
            return float("nan"), "not measured and no torch to count FLOPs"
        return (self.bf16 * 1e12 * self.mfu / flops,
                f"assumed: {self.cl.gpu} {self.bf16:g} TFLOP/s bf16 x MFU {self.mfu:g} / {flops / 1e9:.2f} GFLOP per "
                f"sample (counted: {self.cfg.train.arch} width {self.cfg.train.width:g}, {clusters} clusters, fwd+bwd)")

    def step_time(self, sec: dict, samples: float, rate: float, workers: int, params: int | None) -> tuple[float, str]:
        """Seconds for `samples` at `rate` per GPU on `workers` DDP GPUs, each step's gradient all-reduce
        overlapping its backward pass (a step takes the longer of the two)."""
        batch = getattr(sec, "global_batch", 0) or getattr(sec, "batch_size_per_worker", 64) * workers
        steps = samples / batch
        compute = max(batch / (rate * workers), self.min_step_s)
        floor = f" (assumed: >= {self.min_step_s * 1e3:g} ms a step)"
        if not params or workers < 2:
            return steps * compute, f"{steps:.3g} steps of {batch}{floor}"
        nodes = math.ceil(workers / self.cl.gpus_per_node)
        grad = params * (2 if getattr(self.cfg.train, "grad_compression", "none") == "bf16" else 4)
        link, how = (self.cl.node_bw, "the network") if nodes > 1 else (NVLINK.get(self.cl.gpu, 32e9), "NVLink")
        comm = 2 * grad * (workers - 1) / workers / link
        return steps * max(compute, comm), (f"{steps:.3g} steps of {batch}; ring all-reduce of {grad / 1e6:.0f} MB "
                                            f"over {how} {comm * 1e3:.1f} ms vs compute {compute * 1e3:.1f} ms a step "
                                            f"(assumed: overlapped){floor}")

    def forward_pass(self, fwd_flops: float | None) -> tuple[float, list]:
        """Seconds of one CNN pass over every patch (round features, code export) on all GPUs."""
        c = self.cl
        decode, s_dec = self.bench("shards", "ours_per_core", 2000.0, "patches/s per core, in order")
        line = self.gpu_line("export", "images_per_s")
        if line:
            gpu_s, src = self.n / (line[0]["images_per_s"] * c.gpus), f"measured: {line[1]} images_per_s"
        else:
            gpu_s = self.n * (fwd_flops or float("nan")) / (c.gpus * self.bf16 * 1e12 * self.mfu)
            src = f"assumed: forward = 1/3 of the fwd+bwd FLOPs at MFU {self.mfu:g}"
        cpu_s = self.n / decode / min(c.cpus, 4 * c.gpus)
        return max(gpu_s, cpu_s), [src, s_dec, f"assumed: decoding on {min(c.cpus, 4 * c.gpus)} cores overlaps "
                                   "inference (tasks of 0.25 GPU)", self.net_source()]

    def gpu_stages(self, members: float, cov_src: str) -> None:
        cfg, c = self.cfg, self.cl
        clusters = int(cfg.cluster.max_clusters * 0.97)
        flops, params = flops_per_sample(cfg.train.arch, cfg.train.width, clusters)
        rate, s_rate = self.gpu_rate(flops, clusters)
        workers = min(cfg.train.num_workers, c.gpus)
        px = cfg.data.patch_size_px
        pixels = members * px * px * 3
        nodes = math.ceil(workers / c.gpus_per_node)
        samples = members * cfg.train.views_per_member * cfg.train.epochs
        t, s_steps = self.step_time(cfg.train, samples, rate, workers, params)
        note = f"config: train.num_workers={cfg.train.num_workers} of {c.gpus} GPUs"
        self.add("training (per round)", t + self.net(pixels, 1), count=cfg.train.rounds, slots=f"{workers} GPUs",
                 bytes_=pixels * nodes, sources=[s_rate, f"{samples:.3g} samples = members x {cfg.train.views_per_member}"
                                                 f" views x {cfg.train.epochs:g} epochs; {s_steps}", cov_src, note,
                                                 "members.npy read once per training node"])
        per_patch, _ = self.bench("shards", "bytes_per_patch_ours", 6000.0, "shard bytes per patch")
        fwd_s, fsrc = self.forward_pass(flops / 3 if flops else None)
        moved = self.n * per_patch + self.n * cfg.features.out_dim * 2
        self.add("round features (fc7)", fwd_s + self.net(moved, c.nodes), count=cfg.train.rounds - 1,
                 slots=f"{c.gpus} GPUs", bytes_=moved, sources=fsrc)
        bits = cfg.hash.all_bits
        hsamples = members * cfg.hash.views_per_member * cfg.hash.epochs
        t, s_steps = self.step_time(cfg.hash, hsamples, rate / 2, workers, params)
        self.add("hashing (per code length)", t, count=len(bits), slots=f"{workers} GPUs", bytes_=pixels * nodes,
                 sources=[s_rate, "assumed: a sample is an image and its positive (2x the training FLOPs); "
                          f"{s_steps}", note])
        self.add("code export (per code length)", fwd_s + self.net(self.n * 8, 1), count=len(bits),
                 slots=f"{c.gpus} GPUs", bytes_=self.n * per_patch, sources=fsrc)

    def evaluation(self) -> None:
        """bench_eval's lines: its per-patch parts (labels, code statistics) fit linear in n, its retrieval
        (bounded: queries x the gallery bound) scaled by queries x gallery x repeats."""
        if not self.m.evals:
            self.add("evaluation", float("nan"), sources=["not measured: give scripts/bench_eval.py's lines"])
            return
        e, ds = self.cfg.eval, [d for d, _ in self.m.evals]
        per_patch = fit([[1, d["n"]] for d in ds], [d.get("labels_s", 0) + d.get("stats_s", 0) for d in ds])
        mem = fit([[1, d["n"]] for d in ds], [d.get("peak_rss_mb", 0) for d in ds])
        big = max(ds, key=lambda d: d["n"])
        queries = e.queries_per_class * CLASSES
        gallery = min(getattr(e, "gallery_max", self.n), self.n)
        work = queries * gallery * e.repeats / (big.get("queries", 1) * big.get("gallery", big["n"]) * BENCH_EVAL_REPEATS)
        retrieval = big.get("retrieval_s", big["wall_s"]) * work
        self.add("evaluation", per_patch[0] + per_patch[1] * self.n + retrieval, slots="1 process",
                 task_mem_mb=mem[0] + mem[1] * self.n,
                 sources=[f"measured: {', '.join(s for _, s in self.m.evals)}: labels + statistics fit "
                          f"{per_patch[1] * 1e6:.3g} s per 1M patches, retrieval {big.get('retrieval_s')} s for "
                          f"{big.get('queries')} queries x {big.get('gallery')} gallery, RSS fit {mem[0]:.0f} MB + "
                          f"{mem[1] * 1e6:.3g} MB per 1M patches",
                          f"assumed: retrieval scales with queries x gallery x repeats ({queries} x {gallery} x "
                          f"{e.repeats}; {CLASSES} classes; the bench's {BENCH_EVAL_REPEATS} repeats)"])

    def transfer(self) -> None:
        d, src = self.m.bench.get("transfer", ({}, None))
        gpu_line = self.cl.gpu in str(d.get("device", "")).lower()
        train_ips = d["train_images_per_s"] if gpu_line else 102.0
        test_ms = d.get("test_ms_per_image", 12.2) if gpu_line else 12.2
        s1 = (f"measured: {src} train_images_per_s={train_ips}, test {test_ms} ms/image" if gpu_line else
              "assumed: README's H100 run of bench_transfer (102 training images/s fp32, 12.2 ms per test image),"
              " transcribed, not a JSON line")
        pps = d.get("proposals_per_s_per_core", 4.2)
        s2 = (f"measured: {src} proposals_per_s_per_core={pps}" if "proposals_per_s_per_core" in d else
              "assumed: 4.2 proposals/s per core (README)") + " (images of 200-320 px; VOC's ~500x375 cost ~2.5x)"
        props = 9963 * 2.5 / pps / self.cl.cpus
        self.add("detection transfer", 40000 * 2 / train_ips + 4952 * test_ms / 1e3 + props, slots="1 GPU",
                 sources=[s1, s2, "assumed: the paper's schedule (40k iterations x 2 images, VOC07 5011 trainval,"
                          " 4952 test)"])

    def plan(self) -> dict:
        self.data_stages()
        self.cluster_stages()
        members, cov_src = self.member_pixels()
        self.gpu_stages(members, cov_src)
        self.evaluation()
        self.transfer()
        for r in self.rows:
            r["total_s"] = r["time_s"] * r["count"]
        pretrain = [r for r in self.rows if r["stage"] != "detection transfer" and not math.isnan(r["total_s"])]
        groups: dict[str, float] = {}  # "clustering: svm_round1" -> clustering, "training (per round)" -> training
        for r in pretrain:
            name = r["stage"].split(":")[0].split(" (")[0]
            groups[name] = groups.get(name, 0.0) + r["total_s"]
        bound = max(groups, key=groups.get)
        return {"cluster": vars(self.cl), "patches": self.n, "images": self.images, "rows": self.rows,
                "stage_totals_s": groups, "pretrain_total_s": sum(groups.values()), "bounding_stage": bound,
                "assumptions": {"mfu": self.mfu, "gemm_eff": self.gemm_eff, "min_step_ms": self.min_step_s * 1e3,
                                "gpu_bf16_tflops": self.bf16,
                                "gpu_fp32_tflops": self.fp32}}


def reproduce(m: Measured) -> dict:
    """The model fit on every rehearsal size but the largest, predicting the largest: per step its task
    CPU, its total CPU (tasks + driver) and its wall time on the rehearsal's cores."""
    sizes = sorted({d["n"] for d, _ in m.rehearsal})
    if len(sizes) < 2:
        raise SystemExit("plan_scale: --reproduce needs rehearsal lines at two sizes or more")
    models, rows = step_models(m, exclude_n=sizes[-1]), []
    for d, src in m.rehearsal:
        if d["n"] != sizes[-1] or d["step"] not in models:
            continue
        p = models[d["step"]].predict(d["n"], d["clusters_in"], d["tasks"])
        cpu = p["task_cpu_s"] + p["driver_cpu_s"]
        wall = waves(p["task_cpu_s"], d["tasks"], d.get("cpus", 1)) + p["driver_cpu_s"]
        rows.append({"step": d["step"], "line": src, "n": d["n"], "clusters_in": d["clusters_in"],
                     "predicted_cpu_s": cpu, "measured_cpu_s": d["cpu_s"], "cpu_error": cpu / d["cpu_s"] - 1,
                     "predicted_wall_s": wall, "measured_wall_s": d["wall_s"], "wall_error": wall / d["wall_s"] - 1})
    total = {k: sum(r[k] for r in rows) for k in ("predicted_cpu_s", "measured_cpu_s", "predicted_wall_s",
                                                    "measured_wall_s")}
    total["cpu_error"] = total["predicted_cpu_s"] / total["measured_cpu_s"] - 1
    total["wall_error"] = total["predicted_wall_s"] / total["measured_wall_s"] - 1
    fitted_on = sizes[:-1]
    return {"fitted_on_n": fitted_on, "predicted_n": sizes[-1], "steps": rows, "total": total,
            "model": "task CPU a x tasks + b x units, driver CPU c + d x patches" if len(fitted_on) > 1 else
            "proportional: CPU per (patch x cluster) of the one smaller size"}


def human_time(s: float) -> str:
    if math.isnan(s):
        return "?"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def print_plan(p: dict) -> None:
    c = p["cluster"]
    print(f"plan: {p['images']} images x {p['patches'] // p['images']} patches = {p['patches']} patches on "
          f"{c['nodes']} nodes x {c['gpus_per_node']} {c['gpu']} + {c['cpus_per_node']} cores, "
          f"{c['net_gbps']:g} Gb/s")
    print(f"{'stage':34} {'x':>2} {'each':>9} {'total':>9} {'slots':>30} {'task MB':>8} {'driver MB':>9} {'moved GB':>9}")
    for r in p["rows"]:
        mem = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
        print(f"{r['stage']:34} {r['count']:>2} {human_time(r['time_s']):>9} {human_time(r['total_s']):>9} "
              f"{r['slots'][:30]:>30} {mem(r['task_mem_mb']):>8} {mem(r['driver_mem_mb']):>9} {r['bytes'] / 1e9:>9.1f}")
    print("per stage (pretraining):", ", ".join(f"{k} {human_time(v)}" for k, v in p["stage_totals_s"].items()))
    print(f"pretraining total {human_time(p['pretrain_total_s'])}; bounded by: {p['bounding_stage']}")
    print("sources:")
    for r in p["rows"]:
        for s in r["sources"]:
            print(f"  {r['stage']}: {s}")


def print_reproduce(r: dict) -> None:
    print(f"reproduce: fitted on n={r['fitted_on_n']}, predicting n={r['predicted_n']} ({r['model']})")
    print(f"{'step':12} {'pred cpu':>9} {'meas cpu':>9} {'err':>7} {'pred wall':>9} {'meas wall':>9} {'err':>7}")
    for s in [*r["steps"], {"step": "total", **r["total"]}]:
        print(f"{s['step']:12} {s['predicted_cpu_s']:9.1f} {s['measured_cpu_s']:9.1f} {s['cpu_error']:+7.1%} "
              f"{s['predicted_wall_s']:9.1f} {s['measured_wall_s']:9.1f} {s['wall_error']:+7.1%}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--cpus-per-node", type=int, default=64)
    ap.add_argument("--net-gbps", type=float, default=200.0)
    ap.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    ap.add_argument("--measured", nargs="*", default=None,
                    help="JSON-lines files of benches and rehearsals (default: scripts/measured/*.jsonl, this "
                         "repository's own measurements)")
    ap.add_argument("--config", default=str(CONFIG_DIR / "imagenet.yaml"))
    ap.add_argument("--images", type=int, default=1281167, help="source images (ImageNet train)")
    ap.add_argument("--mfu", type=float, default=0.15, help="assumed training MFU without a measured GPU line")
    ap.add_argument("--gemm-eff", type=float, default=0.5, help="assumed share of fp32 peak the SVM tasks reach")
    ap.add_argument("--min-step-ms", type=float, default=10.0,
                    help="assumed least time of a training step without a measured GPU line (launches, optimizer)")
    ap.add_argument("--reproduce", default=None, help="a rehearsal JSONL: predict its largest size from the rest")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    if args.reproduce:
        r = reproduce(read_measured([args.reproduce]))
        print(json.dumps(r)) if args.json else print_reproduce(r)
        return
    if args.measured is None:
        args.measured = sorted(str(f) for f in (REPO / "scripts" / "measured").glob("*.jsonl"))
    for f in args.measured:
        if not Path(f).is_file():
            raise SystemExit(f"plan_scale: no such file: {f}")
    cl = Cluster(args.nodes, args.gpus_per_node, args.cpus_per_node, args.net_gbps, args.gpu)
    m = read_measured(args.measured)
    p = Planner(load_config(args.config), cl, m, images=args.images, mfu=args.mfu, gemm_eff=args.gemm_eff,
                min_step_ms=args.min_step_ms).plan()
    p["skipped_lines"] = m.skipped
    print(json.dumps(p)) if args.json else print_plan(p)


if __name__ == "__main__":
    main()
