"""Stage 5 as a run-directory step: the codes of stage 4 scored and drawn.

    eval/retrieval.json, eval/retrieval.md   Hamming-ranking mAP and precision@N, ours vs LSH, PCAH,
                                             ITQ and SH on the same labelled patches (paper Table 2)
    eval/codes.json                          per K: bit balance and bit correlation of our codes
    figures/attributes_kK.png                the most confident patches on each side of a few bits (Fig. 4)
    figures/retrieval_kK.png                 top retrievals of a few queries per method (Fig. 7)

Labels are read here and only here in stages 3-5; without labels (the demo photos) the retrieval
table is skipped and the figures are drawn without correctness borders.

Memory is bounded for any N: labels come from the shards' metadata arrays (8 bytes a patch), the
retrieval scores a seeded subset of at most the queries + `eval.gallery_max` labelled patches
(`retrieval.eval_subset`; `retrieval.json` records its sizes and seed), the baselines are fitted on at
most `eval.baseline_fit_max` of them and encode the rest in chunks, and codes, scores and features are
read in chunks of rows (pretrain/eval/scan.py), never whole.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from pretrain.config import Config, to_dict
from pretrain.eval.attributes import balanced_bits, extremes_figure, retrieval_grid
from pretrain.eval.retrieval import (HammingIndex, encode_chunks, eval_subset, evaluate_retrieval, fit_baselines,
                                     retrieval_table)
from pretrain.eval.scan import extreme_rows, read_rows, score_stats
from pretrain.figures import save_png
from infra import layout
from infra.layout import RunLayout
from infra.rundir import RunDir, StageResult
from infra.storage import atomic_write_json, atomic_write_text
from shards.store import PatchStore

log = logging.getLogger(__name__)
GRID_TOP = 8
INPUT_CHUNK = 2048  # baseline input rows read and encoded at once (96x96 gray: 75 MB of float32)
FIT_STREAM = 0xF17  # the baselines' fit sample's random stream


def baseline_input(store: PatchStore, rows: np.ndarray, kind: str, features) -> np.ndarray:
    """(n, d) float32 inputs of the baselines: gray pixels flattened, or the round-0 init features;
    rows (n,) int64 ascending, read in chunks."""
    if kind == "features":
        return np.asarray(read_rows(features, rows), np.float32)
    out = None
    gray = np.array([0.299, 0.587, 0.114], np.float32)
    for start in range(0, len(rows), INPUT_CHUNK):
        part = (store.get(rows[start : start + INPUT_CHUNK]).astype(np.float32) @ gray).reshape(
            -1, store.shards.patch_px ** 2) / 255.0
        if out is None:
            out = np.empty((len(rows), part.shape[1]), np.float32)
        out[start : start + len(part)] = part
    return out if out is not None else np.zeros((0, store.shards.patch_px ** 2), np.float32)


def score_retrieval(labels: np.ndarray, codes: dict[int, object], read_input: Callable[[np.ndarray], np.ndarray],
                    bits: tuple[int, ...], *, queries_per_class: int, repeats: int, precision_at: tuple[int, ...],
                    gallery_max: int, baseline_fit_max: int, seed: int) -> dict:
    """The retrieval table of ours and the baselines, in memory bounded by the subset, not by N.

    labels: (N,) int64 (< 0: unlabelled); codes: K -> path of our (N, K/8) packed codes; read_input:
    rows (n,) int64 ascending -> (n, d) float32 baseline inputs. -> {"rows": table rows (and skipped
    baselines), "packed": {(method, K): (n, K/8) uint8 codes of the subset}, "labelled_rows": (n,) the
    subset's global rows, "subset": its sizes and seed}."""
    rows = eval_subset(labels, queries_per_class=queries_per_class, gallery_max=gallery_max, seed=seed)
    fit = np.arange(len(rows))
    if len(rows) > baseline_fit_max:
        fit = np.sort(np.random.default_rng([seed, FIT_STREAM]).choice(len(rows), baseline_fit_max, replace=False))
    x_fit = read_input(rows[fit])
    hashers, skipped = fit_baselines(x_fit, bits, seed=seed)
    for row in skipped:  # e.g. more bits than input dimensions
        log.warning("baseline %s at %d bits skipped: %s", row["method"], row["bits"], row["skipped"])
    packed = {("ours", k): read_rows(codes[k], rows) for k in bits}
    if len(fit) == len(rows):  # the fit sample is every row: read once
        chunks = (x_fit[i : i + INPUT_CHUNK] for i in range(0, len(rows), INPUT_CHUNK))
    else:
        x_fit = None
        chunks = (read_input(rows[i : i + INPUT_CHUNK]) for i in range(0, len(rows), INPUT_CHUNK))
    packed |= encode_chunks(hashers, chunks)
    kw = dict(queries_per_class=queries_per_class, repeats=repeats, precision_at=precision_at, seed=seed,
              gallery_max=gallery_max)
    sub = labels[rows]
    table = [{"method": name, "bits": k, **evaluate_retrieval(c, sub, **kw)}
             for k in bits for (name, kk), c in packed.items() if kk == k]
    subset = {"labelled": int((labels >= 0).sum()), "scored": int(len(rows)), "queries": table[0]["queries"],
              "gallery": table[0]["gallery"], "classes": int(len(np.unique(sub))), "baseline_fit": int(len(fit)),
              "seed": seed, "bounded": bool(len(rows) < (labels >= 0).sum())}
    return {"rows": table + skipped, "packed": packed, "labelled_rows": rows, "subset": subset}


def _retrieval(cfg: Config, run: RunDir, store: PatchStore, labels: np.ndarray, bits: tuple[int, ...]) -> dict:
    e, lay = cfg.eval, RunLayout(run.path)
    return score_retrieval(
        labels, {k: lay.codes(k) for k in bits},
        lambda rows: baseline_input(store, rows, e.baseline_input, lay.features(0)), bits,
        queries_per_class=e.queries_per_class, repeats=e.repeats, precision_at=e.precision_at,
        gallery_max=e.gallery_max, baseline_fit_max=e.baseline_fit_max, seed=cfg.run.seed)


def _grid(cfg: Config, store: PatchStore, labels: np.ndarray, found: dict, k: int) -> np.ndarray:
    rows = found["labelled_rows"]
    rng = np.random.default_rng(cfg.run.seed)
    q = rng.choice(len(rows), min(cfg.eval.figure_queries, len(rows)), replace=False)
    ranked = {}
    for (name, kk), codes in found["packed"].items():
        if kk == k:
            _, idx = HammingIndex(codes).search(codes[q], GRID_TOP + 1)
            # the query itself is in the database: drop it from its own list
            ranked[name] = np.array([[j for j in r if j != qi][:GRID_TOP] for r, qi in zip(idx, q)])
    image, _ = retrieval_grid(rows[q], {n: rows[r] for n, r in ranked.items()}, store.get, labels)
    return image  # rows per query: ours, then LSH, PCAH, ITQ, SH (those that ran)


def eval_stage(cfg: Config, run: RunDir, shards_root, force: bool = False) -> StageResult:
    bits = cfg.hash.all_bits
    inputs = {layout.hash_stage(k): run.outputs_fingerprint(layout.hash_stage(k)) for k in bits}
    config = to_dict(cfg.eval) | {"bits": list(bits), "seed": cfg.run.seed}
    lay = RunLayout(run.path)
    out = lay.eval_dir

    def work():
        store = PatchStore(shards_root)
        labels = store.labels(np.arange(len(store)))
        produced = {}
        stats = {}
        for k in bits:  # two passes over the scores in chunks: the statistics, then the chosen bits' extremes
            stats[k], share = score_stats(lay.scores(k))
            picks = extreme_rows(lay.scores(k), balanced_bits(share, cfg.eval.figure_bits))
            produced[save_png(lay.figure(f"attributes_k{k}"), extremes_figure(picks, store.get))] = None
        atomic_write_json(out / "codes.json", {str(k): v for k, v in stats.items()})
        produced[out / "codes.json"] = None
        if (labels >= 0).any():
            found = _retrieval(cfg, run, store, labels, bits)
            atomic_write_json(lay.retrieval, {"protocol": config | {"subset": found["subset"]},
                                              "results": found["rows"]})
            atomic_write_text(out / "retrieval.md", retrieval_table(found["rows"]) + "\n")
            produced |= {lay.retrieval: None, out / "retrieval.md": None}
            for k in bits:
                produced[save_png(lay.figure(f"retrieval_k{k}"), _grid(cfg, store, labels, found, k))] = None
            log.info("retrieval (Hamming ranking):\n%s", retrieval_table(found["rows"]))
        else:
            log.info("no labels in these shards: retrieval mAP skipped (figures and code statistics only)")
        return produced

    return run.run_stage(layout.EVAL, work, config=config, inputs=inputs, force=force)
