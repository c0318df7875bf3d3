"""Stage 5 as a run-directory step: the codes of stage 4 scored and drawn.

    eval/retrieval.json, eval/retrieval.md   Hamming-ranking mAP and precision@N, ours vs LSH, PCAH,
                                             ITQ and SH on the same labelled patches (paper Table 2)
    eval/codes.json                          per K: bit balance and bit correlation of our codes
    figures/attributes_kK.png                the most confident patches on each side of a few bits (Fig. 4)
    figures/retrieval_kK.png                 top retrievals of a few queries per method (Fig. 7)

Labels are read here and only here in stages 3-5; without labels (the demo photos) the retrieval
table is skipped and the figures are drawn without correctness borders.
"""
from __future__ import annotations

import logging

import numpy as np

from pretrain.config import Config, to_dict
from pretrain.eval.attributes import bit_extremes, pick_bits, retrieval_grid
from pretrain.eval.retrieval import HammingIndex, baseline_codes, code_stats, evaluate_retrieval, retrieval_table
from pretrain.figures import save_png
from infra import layout, storage
from infra.layout import RunLayout
from infra.rundir import RunDir, StageResult
from infra.storage import atomic_write_json, atomic_write_text
from shards.store import PatchStore

log = logging.getLogger(__name__)
GRID_TOP = 8


def baseline_input(store: PatchStore, rows: np.ndarray, kind: str, features) -> np.ndarray:
    """(n, d) float32 inputs of the baselines: gray pixels flattened, or the round-0 init features."""
    if kind == "features":
        return np.asarray(np.load(storage.local_copy(features), mmap_mode="r")[rows], np.float32)
    gray = store.get(rows).astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return gray.reshape(len(rows), -1) / 255.0


def _retrieval(cfg: Config, run: RunDir, store: PatchStore, labels: np.ndarray, bits: tuple[int, ...]) -> dict:
    e, seed = cfg.eval, cfg.run.seed
    rows = np.flatnonzero(labels >= 0)
    lay = RunLayout(run.path)
    x = baseline_input(store, rows, e.baseline_input, lay.features(0))
    packed = {("ours", k): np.load(storage.local_copy(lay.codes(k)), mmap_mode="r")[rows] for k in bits}
    found, skipped = baseline_codes(x, bits, seed=seed)
    packed |= found
    for row in skipped:  # e.g. more bits than input dimensions
        log.warning("baseline %s at %d bits skipped: %s", row["method"], row["bits"], row["skipped"])
    kw = dict(queries_per_class=e.queries_per_class, repeats=e.repeats, precision_at=e.precision_at, seed=seed)
    table = [{"method": name, "bits": k, **evaluate_retrieval(codes, labels[rows], **kw)}
             for k in bits for (name, kk), codes in packed.items() if kk == k]
    return {"rows": table + skipped, "packed": packed, "labelled_rows": rows}


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
        for k in bits:
            scores = np.load(storage.local_copy(lay.scores(k))).astype(np.float32)
            stats[k] = code_stats((scores > 0).astype(np.uint8))
            fig = bit_extremes(scores, store.get, pick_bits(scores, cfg.eval.figure_bits))
            produced[save_png(lay.figure(f"attributes_k{k}"), fig)] = None
        atomic_write_json(out / "codes.json", {str(k): v for k, v in stats.items()})
        produced[out / "codes.json"] = None
        if (labels >= 0).any():
            found = _retrieval(cfg, run, store, labels, bits)
            atomic_write_json(lay.retrieval, {"protocol": config, "results": found["rows"]})
            atomic_write_text(out / "retrieval.md", retrieval_table(found["rows"]) + "\n")
            produced |= {lay.retrieval: None, out / "retrieval.md": None}
            for k in bits:
                produced[save_png(lay.figure(f"retrieval_k{k}"), _grid(cfg, store, labels, found, k))] = None
            log.info("retrieval (Hamming ranking):\n%s", retrieval_table(found["rows"]))
        else:
            log.info("no labels in these shards: retrieval mAP skipped (figures and code statistics only)")
        return produced

    return run.run_stage(layout.EVAL, work, config=config, inputs=inputs, force=force)
