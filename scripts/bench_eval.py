"""Stage 5's memory and time as N grows: the evaluation must stay bounded, not grow with the patches.

    python scripts/bench_eval.py [--sizes 100000 400000 1000000] [--classes 100] [--gallery-max 20000]

For each N, a synthetic run is written first (outside the measurement): shards.json with N patches in
shards of 10,000 (10 patches per source image, `--classes` labels) whose metadata parts are real (the
tars are empty placeholders: nothing here reads pixels), our packed codes and float16 scores at each
K in --bits (class centres plus noise, so mAP means something), and (N, --dim) float16 features as the
baselines' input (`eval.baseline_input=features`). Then a fresh process per N does what the eval stage
does with them, and reports its own peak RSS (VmHWM):

  labels_s     PatchStore.labels of all N and every patch's source key (PatchStore.sources, a glob
               over them as cluster.natural_world does), from the metadata parts
  retrieval_s  `pretrain.eval.stage.score_retrieval`: the seeded subset, ours + LSH, PCAH, ITQ, SH
               fitted on --fit-max patches and encoded in chunks, each scored over --repeats draws
  stats_s      per K the code statistics and the attribute figure's extremes, in chunks of rows

Prints one JSON line per N ({"bench": "eval", "n", "wall_s", "peak_rss_mb", "import_rss_mb", ...}) and
a last line with rss_growth = peak_rss(largest N) / peak_rss(smallest N) (goal: <= 1.5), the same for
the RSS above the imports (work_rss_growth), and time_growth.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PER_SHARD, PER_IMAGE, CHUNK = 10_000, 10, 100_000


def vm_hwm_mb() -> float:
    """This process's peak resident set (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(root: Path, n: int, args) -> None:
    """The synthetic shards (metadata parts only), codes, scores and features for n patches."""
    from infra import storage
    from pretrain.eval.retrieval import pack_codes
    from shards.meta import meta_bytes
    from shards.shardset import FORMAT, index_name, meta_name

    rng = np.random.default_rng(0)
    labels = rng.integers(0, args.classes, n // PER_IMAGE + 1).repeat(PER_IMAGE)[:n]  # one class per image
    shards = []
    for s, start in enumerate(range(0, n, PER_SHARD)):
        m = min(PER_SHARD, n - start)
        name = f"shard-{s:06d}.tar"
        keys = [f"c{labels[start + i]:03d}/img{(start + i) // PER_IMAGE:07d}.jpg" for i in range(m)]
        boxes = np.tile([0, 0, 96, 96], (m, 1)) + (np.arange(m) % PER_IMAGE)[:, None]
        part = storage.put_part(root / meta_name(name), meta_bytes(keys, boxes, labels[start : start + m]))
        (root / name).write_bytes(b"")
        (root / index_name(name)).write_bytes(b"")
        shards.append({"name": name, "patches": m, "records": -(-m // 16), "index": {"name": index_name(name)},
                       "meta": {"name": meta_name(name), "bytes": part["size"], "sha256": part["sha256"]}})
    storage.atomic_write_json(root / "shards.json", {"format": FORMAT, "patch_size_px": 96, "patches_per_record": 16,
                                                     "source": {"kind": "synthetic"}, "shards": shards})
    centres = {k: rng.normal(size=(args.classes, k)) for k in args.bits}
    feat_centres = rng.normal(size=(args.classes, args.dim))
    files = {f"scores{k}": (n, k) for k in args.bits} | {f"codes{k}": (n, k // 8) for k in args.bits}
    out = {name: np.lib.format.open_memmap(root / f"{name}.npy", "w+", np.uint8 if name.startswith("codes")
                                           else np.float16, shape) for name, shape in files.items()}
    out["features"] = np.lib.format.open_memmap(root / "features.npy", "w+", np.float16, (n, args.dim))
    for start in range(0, n, CHUNK):
        lab = labels[start : start + CHUNK]
        for k in args.bits:
            s = centres[k][lab] + 1.5 * rng.normal(size=(len(lab), k))
            out[f"scores{k}"][start : start + len(lab)] = s
            out[f"codes{k}"][start : start + len(lab)] = pack_codes(s > 0)
        out["features"][start : start + len(lab)] = feat_centres[lab] + 2.0 * rng.normal(size=(len(lab), args.dim))
    for mm in out.values():
        mm.flush()
    del out


def child(root: Path, n: int, args) -> dict:
    """The measured part, in this (fresh) process."""
    from pretrain.eval.attributes import balanced_bits
    from pretrain.eval.scan import extreme_rows, read_rows, score_stats
    from pretrain.eval.stage import score_retrieval
    from shards.store import PatchStore

    import_rss = vm_hwm_mb()
    t0 = time.perf_counter()
    store = PatchStore(root)
    labels = store.labels(np.arange(len(store)))
    sources, image = store.sources()
    hit = np.fromiter((fnmatch.fnmatchcase(s, "c000/*") for s in sources.tolist()), bool, len(sources))
    natural = int(hit[image].sum())
    t1 = time.perf_counter()
    found = score_retrieval(labels, {k: root / f"codes{k}.npy" for k in args.bits},
                            lambda rows: np.asarray(read_rows(root / "features.npy", rows), np.float32),
                            tuple(args.bits), queries_per_class=args.queries_per_class, repeats=args.repeats,
                            precision_at=(100,), gallery_max=args.gallery_max, baseline_fit_max=args.fit_max, seed=0)
    t2 = time.perf_counter()
    for k in args.bits:
        _, share = score_stats(root / f"scores{k}.npy")
        extreme_rows(root / f"scores{k}.npy", balanced_bits(share, 5))
    t3 = time.perf_counter()
    maps = {f"map_{r['method']}_{r['bits']}": round(r["map"], 4) for r in found["rows"] if "map" in r}
    return {"bench": "eval", "n": n, "wall_s": round(t3 - t0, 2), "peak_rss_mb": round(vm_hwm_mb(), 1),
            "import_rss_mb": round(import_rss, 1), "labels_s": round(t1 - t0, 2), "retrieval_s": round(t2 - t1, 2),
            "stats_s": round(t3 - t2, 2), "natural_matches": natural, **found["subset"], **maps}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000, 1_000_000], help="values of N")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--queries-per-class", type=int, default=10)
    p.add_argument("--gallery-max", type=int, default=20_000)
    p.add_argument("--fit-max", type=int, default=10_000, help="eval.baseline_fit_max")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--bits", type=int, nargs="+", default=[32, 64])
    p.add_argument("--dim", type=int, default=128, help="baseline input (features) dimension")
    p.add_argument("--work", default=None, help="folder for the synthetic runs (default: a temporary one)")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(Path(args.work), args.child, args)))
        return 0
    lines = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for n in args.sizes:
            root = Path(tmp) / f"n{n}"
            root.mkdir()
            prepare(root, n, args)
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--work", str(root),
                   "--child", str(n)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"error: the run at n={n} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                return 1
            lines.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(lines[-1]), flush=True)
            for f in root.iterdir():  # the next N's files need the room
                f.unlink()
    lo, hi = lines[0], lines[-1]
    print(json.dumps({"bench": "eval", "sizes": args.sizes, "goal_rss_growth": 1.5,
                      "rss_growth": round(hi["peak_rss_mb"] / lo["peak_rss_mb"], 3),
                      "work_rss_growth": round((hi["peak_rss_mb"] - hi["import_rss_mb"])
                                               / (lo["peak_rss_mb"] - lo["import_rss_mb"]), 3),
                      "time_growth": round(hi["wall_s"] / lo["wall_s"], 3),
                      "n_growth": round(hi["n"] / lo["n"], 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
