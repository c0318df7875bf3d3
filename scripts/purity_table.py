"""Purity of a run's discovered clusters against k-means with the same number of clusters.

    python pretrain/run.py --config pretrain/configs/digits.yaml --run-dir runs/digits
    python scripts/purity_table.py --run-dir runs/digits [--seeds 3]

Labels come from the shards' metadata and are used here only, for scoring. Prints a markdown table
(and, with --json, one JSON line). Rows:
  discovered            the clusters in clusters/round0.npz, over their members
  k-means, init features   FAISS k-means on features/round0.npy (the loop's own input), all patches
  k-means, raw HOG      FAISS k-means on unwhitened HOG of the patches (the paper's k-means+HOG), all patches
  ... same coverage     each k-means cluster cut to its members nearest the centroid, as many as the
                        discovered clusters hold (by rank of size): the same number of patches scored
k-means rows are the mean over --seeds seeds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.eval.clusters import kmeans_baseline, nmi, purity  # noqa: E402
from pretrain.features.hog import hog_features  # noqa: E402
from shards.store import PatchStore  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--round", type=int, default=0)
    ap.add_argument("--hog-cell-px", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    run = Path(args.run_dir)
    path = run / "clusters" / f"round{args.round}.npz"
    if not path.is_file():
        print(f"error: {path} not found; run pretrain/run.py first", file=sys.stderr)
        return 2
    with np.load(path, allow_pickle=False) as z:
        members = np.split(z["member_index"], z["offsets"][1:-1])
    store = PatchStore(run / "shards")
    labels = store.labels(np.arange(len(store)))
    if (labels < 0).all():
        print("error: the shards carry no labels to score against", file=sys.stderr)
        return 2
    sizes = np.array([len(m) for m in members])
    k = len(members)
    rows = [("discovered (ours)", k, int(sizes.sum()), purity(members, labels), nmi(members, labels))]
    feats = {"init features": np.load(run / "features" / f"round{args.round}.npy").astype(np.float32),
             "raw HOG": hog_features(store.get(np.arange(len(store))), args.hog_cell_px)}
    for name, x in feats.items():
        runs = [kmeans_baseline(x, labels, k, sizes, seed=s) for s in range(args.seeds)]
        mean = {key: float(np.mean([r[key] for r in runs])) for key in ("purity", "nmi", "purity_same_coverage")}
        rows.append((f"k-means, {name}", k, len(x), mean["purity"], mean["nmi"]))
        rows.append((f"k-means, {name}, same coverage", k, int(sizes.sum()), mean["purity_same_coverage"], None))
    print("| method | clusters | patches scored | purity | NMI |\n|---|---|---|---|---|")
    for name, c, n, p, m in rows:
        print(f"| {name} | {c} | {n} | {p:.3f} | {'' if m is None else f'{m:.3f}'} |")
    if args.json:
        print(json.dumps({name: {"clusters": c, "patches": n, "purity": p, "nmi": m} for name, c, n, p, m in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
