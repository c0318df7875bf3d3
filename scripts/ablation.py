"""The paper's ablation table (Table 5) for a labelled config, as an output of the system.

    python scripts/ablation.py --config pretrain/configs/digits.yaml [--run-dir DIR] [--seeds 3] [--set KEY=VALUE]

Per seed s (run.seed = s) it runs, or reuses from a finished run directory, under DIR/seed<s>/:
    ours/         the pipeline (pretrain/run.py), plus the printed Eq. 2 fine-tune as extra stages
                  (hash/printed_eq2/kK/) on the same trunk and clusters
    kmeans_cnn/   the same pipeline with k-means clusters (cluster.method=kmeans): as many clusters as
                  ours' last round and cut to its coverage, on ours' shards
and scores every method of pretrain/eval/ablation.py on the eval stage's protocol. Prints, and writes
to DIR/ablation.md and DIR/ablation.json: the table (one row per method, keys method, map16, map32,
map64, ...), the cluster purity at equal coverage, and each round's clusters, coverage, purity and
PCA+ITQ mAP on its fc7. Labels score only; they never reach training. DIR defaults to
runs/ablation-<config name>.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.config import ConfigError, load_config  # noqa: E402
from pretrain.eval import ablation as ab  # noqa: E402
from pretrain.features.cnn import cnn_features  # noqa: E402
from pretrain.features.fisher import FisherEncoder  # noqa: E402
from infra.layout import RunLayout  # noqa: E402
from infra.rundir import RunDir  # noqa: E402
from pretrain.run import run as run_pipeline, task_map_for, trainer_for  # noqa: E402
from pretrain.train.stage import hash_stage  # noqa: E402
from infra.storage import atomic_write_json, atomic_write_text, sha256_file  # noqa: E402
from shards.store import PatchStore  # noqa: E402

log = logging.getLogger("ablation")
PRINTED = "printed_eq2"


def _summary(run: Path, last: int) -> dict:
    return json.loads(RunLayout(run).cluster_summary(last).read_text())


def _reports(run: Path) -> list[dict]:
    return json.loads(RunLayout(run).rounds.read_text())["rounds"]


def _scores_of_run(run: Path, bits) -> dict[int, dict]:
    rows = json.loads(RunLayout(run).retrieval.read_text())["results"]
    return {r["bits"]: r for r in rows if r["method"] == "ours" and r["bits"] in bits}


def one_seed(cfg_path: str, sets: list[str], seed: int, root: Path) -> tuple[list[dict], dict, dict]:
    """Runs (or reuses) the seed's runs -> (rows, purity rows, round reports per method)."""
    cfg = load_config(cfg_path, [*sets, f"run.seed={seed}"])
    bits, last, e = cfg.hash.all_bits, cfg.train.rounds - 1, cfg.eval
    protocol = dict(queries_per_class=e.queries_per_class, repeats=e.repeats, precision_at=e.precision_at,
                    gallery_max=e.gallery_max)  # the eval stage's subset, so every row scores the same patches
    ours = root / f"seed{seed}" / "ours"
    run_pipeline(cfg, ours, [])
    printed = load_config(cfg_path, [*sets, f"run.seed={seed}", "hash.printed_eq2=true"])
    shards = PatchStore(ours / "shards") if (ours / "shards").is_dir() else PatchStore(cfg.data.shards_dir)
    rundir = RunDir(ours)
    rundir.lock()
    try:
        for k in bits:
            hash_stage(printed, rundir, shards.shards.root, k, trainer_for(printed), task_map_for(printed),
                       variant=PRINTED)
    finally:
        rundir.unlock()
    summary = _summary(ours, last)
    km_sets = [*sets, f"run.seed={seed}", "cluster.method=kmeans", f"cluster.kmeans_clusters={summary['clusters']}",
               f"cluster.kmeans_coverage={min(1.0, summary['coverage']):.6f}",
               f"data.shards_dir={shards.shards.root}"]
    kmeans_cnn = root / f"seed{seed}" / "kmeans_cnn"
    run_pipeline(load_config(cfg_path, km_sets), kmeans_cnn, [])

    labels_all = shards.labels(np.arange(len(shards)))
    rows_l = np.flatnonzero(labels_all >= 0)
    labels = labels_all[rows_l]
    n_fit = cfg.train.feature_fit_patches
    pick = np.sort(np.random.default_rng(seed).permutation(len(shards))[:n_fit])  # itq_init's own sample
    patches = shards.get(np.arange(len(shards)))
    lay = RunLayout(ours)
    trunk = lay.model(last)
    fc7 = cnn_features(patches, model_path=str(trunk), model_sha256=sha256_file(trunk), layer="fc7")
    enc = FisherEncoder.load(lay.encoder(0))
    raw = ab.init_descriptors(patches, enc)
    itq = {name: ab.itq_scores(x[pick], x[rows_l], labels, bits, seed=seed, **protocol)
           for name, x in (("fc7", fc7), ("init", raw))}
    printed_codes = {k: np.load(lay.codes(k, PRINTED))[rows_l] for k in bits}
    n = e.precision_at[0]
    k, cov = summary["clusters"], min(1.0, summary["coverage"])
    init_feats = np.load(lay.features(0))
    rows = [
        ab.row("ours", _scores_of_run(ours, bits), summary.get("purity"), n),
        ab.row("k-means+CNN", _scores_of_run(kmeans_cnn, bits), _summary(kmeans_cnn, last).get("purity"), n),
        ab.row("k-means+HOG" if enc.kind == "hog" else "k-means+FV", itq["init"],
               ab.kmeans_purity(init_feats, labels_all, k, cov, seed), n),
        ab.row("PCA+ITQ on fc7", itq["fc7"], None, n),
        ab.row("printed Eq. 2", ab.code_scores(printed_codes, labels, seed=seed, **protocol), None, n),
    ]
    last_feats = np.load(lay.features(last))
    core = [h for h in summary["steps"] if h["step"] == cfg.cluster.rounds + 1][0]  # merged, before coverage
    purity = {"coverage": cov, "clusters": k, "discovered (ours)": summary.get("purity"),
              "k-means, init features": rows[2]["purity"],
              f"k-means, round {last} features (what ours' last clustering saw)":
                  ab.kmeans_purity(last_feats, labels_all, k, cov, seed),
              "k-means+CNN, its last round": rows[1]["purity"],
              "core coverage (the loop's members, before coverage)": core["coverage"],
              "discovered core (ours)": core.get("purity"),
              f"k-means, round {last} features, at the core's coverage":
                  ab.kmeans_purity(last_feats, labels_all, core["clusters"], core["coverage"], seed)}
    return rows, purity, {"ours": _reports(ours), "k-means+CNN": _reports(kmeans_cnn)}


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a labelled experiment YAML, e.g. pretrain/configs/digits.yaml")
    p.add_argument("--run-dir", default=None, help="default: runs/ablation-<config name>")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
        root = Path(args.run_dir or Path(cfg.run.root) / f"ablation-{Path(args.config).stem}")
        results = [one_seed(args.config, args.set, s, root) for s in range(args.seeds)]
    except (ConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bits, n = cfg.hash.all_bits, cfg.eval.precision_at[0]
    rows = ab.over_seeds([r[0] for r in results])
    purity = {key: {"mean": float(np.mean(v)), "std": float(np.std(v))}
              for key in results[0][1] for v in [[r[1][key] for r in results if r[1][key] is not None]] if v}
    rounds = {m: [r[2][m] for r in results] for m in results[0][2]}
    table = ab.ablation_table(rows, tuple(sorted(bits)), n)
    purity_md = "| clusters at equal coverage | value |\n|---|---|\n" + "".join(
        f"| {key} | {v['mean']:.3f} ± {v['std']:.3f} |\n" for key, v in purity.items())
    text = (f"# Ablation (paper Table 5): {args.config}, seeds 0-{args.seeds - 1}\n\n"
            f"Retrieval (%, mean ± std over seeds) and purity of each method's clusters at ours' coverage\n\n"
            f"{table}\n{purity_md}\nRounds (means over seeds)\n\n{ab.rounds_table(rounds)}")
    atomic_write_text(root / "ablation.md", text)
    atomic_write_json(root / "ablation.json", {"config": args.config, "overrides": args.set, "seeds": args.seeds,
                                               "rows": rows, "per_seed": [r[0] for r in results],
                                               "purity": purity, "rounds": rounds})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
