"""The ablation table (paper Table 5): its arithmetic, and `scripts/ablation.py` end to end at toy size."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pretrain.eval.ablation import ablation_table, over_seeds, rounds_table
from tests.conftest import TOY_TRAIN, run_cli
from tests.pretrain.test_run import check_digits_run


def test_rows_over_seeds_are_means_and_spreads():
    seeds = [[{"method": "ours", "map32": 0.8, "purity": 0.9}, {"method": "PCA+ITQ on fc7", "map32": 0.7, "purity": None}],
             [{"method": "ours", "map32": 0.6, "purity": 0.7}, {"method": "PCA+ITQ on fc7", "map32": 0.5, "purity": None}]]
    rows = over_seeds(seeds)
    assert [r["method"] for r in rows] == ["ours", "PCA+ITQ on fc7"]
    assert rows[0]["map32"] == pytest.approx(0.7) and rows[0]["map32_std"] == pytest.approx(0.1)
    assert rows[1]["purity"] is None and rows[0]["seeds"] == 2
    table = ablation_table(rows, (32,), 100)
    assert "| ours | 70.0 ± 10.0 | - | 0.800 ± 0.100 |" in table and "| PCA+ITQ on fc7 | 60.0 ± 10.0 | - | - |" in table
    md = rounds_table({"ours": [[{"clusters": 10, "coverage": 0.5, "purity": 0.9, "itq_map": 0.8}],
                                [{"clusters": 12, "coverage": 0.7, "purity": 0.8, "itq_map": 0.6}]]})
    assert "| ours | 0 | 11 | 0.600 ± 0.100 | 0.850 ± 0.050 | 70.0 ± 10.0 |" in md


@pytest.mark.ray
@pytest.mark.slow
def test_ablation_script_runs_every_method_and_writes_its_table(tmp_path):
    out = run_cli(["scripts/ablation.py", "--config", "pretrain/configs/digits.yaml", "--run-dir", str(tmp_path),
                   "--seeds", "1", *TOY_TRAIN, "--set", "train.rounds=2", "--set", "eval.repeats=2",
                   "--set", "tracking.wandb=disabled"], timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "ablation.json").read_text())
    methods = [r["method"] for r in result["rows"]]
    assert methods == ["ours", "k-means+CNN", "k-means+HOG", "PCA+ITQ on fc7", "printed Eq. 2"]
    for r in result["rows"]:
        assert 0 < r["map16"] <= 1, r
    assert (tmp_path / "seed0" / "ours" / "hash" / "printed_eq2" / "k16" / "codes.npy").is_file()
    ours = json.loads((tmp_path / "seed0" / "ours" / "clusters" / "round1.json").read_text())
    theirs = json.loads((tmp_path / "seed0" / "kmeans_cnn" / "clusters" / "round1.json").read_text())
    assert theirs["clusters"] <= ours["clusters"] and abs(theirs["coverage"] - ours["coverage"]) < 0.05
    assert theirs["steps"][0]["step"] == "kmeans"
    assert len(result["rounds"]["ours"][0]) == 2 and "itq_map" in result["rounds"]["ours"][0][1]
    text = (tmp_path / "ablation.md").read_text()
    assert "| ours |" in text and "k-means, init features" in text and text in out.stdout
    assert np.isfinite(result["purity"]["discovered (ours)"]["mean"])
    check_digits_run(tmp_path / "seed0" / "ours")  # the digits pipeline's own outputs, on its ours run
