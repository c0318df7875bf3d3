"""The 100x rehearsal (scripts/rehearse_scale.py) and the planner (scripts/plan_scale.py) at toy size,
and the coverage fold that keeps the driver's memory linear in the patches."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from pretrain.cluster import cover
from pretrain.cluster.cover import CoverFold, cover_chunk, merge_chunks
from pretrain.config import CONFIG_DIR, load_config
from tests.conftest import REPO, run_cli

sys.path.insert(0, str(REPO / "scripts"))
import plan_scale  # noqa: E402

STEPS = ["init_kmeans", "svm_round1", "svm_round2", "svm_round3", "svm_round4", "merge", "final", "cover"]
STEP_KEYS = {"step", "n", "clusters_in", "clusters", "units", "wall_s", "cpu_s", "task_cpu_s", "tasks", "bytes_read",
             "io_read_bytes", "peak_rss_mb", "task_peak_rss_mb", "cpus", "loadavg"}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """One rehearsal at two toy sizes on a local 2-CPU Ray instance -> (stdout lines, the --out file)."""
    out = tmp_path_factory.mktemp("rehearsal") / "r.jsonl"
    run = run_cli(["scripts/rehearse_scale.py", "--sizes", "3000,6000", "--merge-sizes", "300,600", "--cpus", "2",
                   "--out", str(out)], timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")], out


@pytest.mark.ray
def test_the_rehearsal_prints_a_line_per_step_and_size_and_the_growth(rehearsal):
    lines, out = rehearsal
    assert [json.loads(x) for x in out.read_text().splitlines()] == lines  # the file holds what was printed
    steps = [d for d in lines if d.get("step") in STEPS]
    assert [(d["n"], d["step"]) for d in steps] == [(n, s) for n in (3000, 6000) for s in STEPS]
    for d in steps:
        assert STEP_KEYS <= d.keys(), STEP_KEYS - d.keys()
        assert d["units"] == d["n"] * d["clusters_in"] and d["tasks"] >= 1 and d["bytes_read"] > 0
        assert d["task_peak_rss_mb"] > 0 and d["cpu_s"] >= d["task_cpu_s"] > 0
    assert steps[0]["clusters_in"] == 3000 // 200  # clusters = patches / --patches-per-cluster
    cover_rows = [d for d in steps if d["step"] == "cover"]
    assert all(d["bytes_read"] == d["n"] * 256 * 2 for d in cover_rows)  # every row read once, float16
    growth = {d["growth"]: d for d in lines if "growth" in d}
    assert set(growth) == {*STEPS, "merge_greedy"}
    for step, g in growth.items():
        assert {"units_ratio", "cpu_ratio", "wall_ratio", "peak_rss_ratio"} <= g.keys()
        assert isinstance(g["superlinear"], list) and isinstance(g["wall_superlinear"], bool)
        assert step == "merge_greedy" or {"bytes_ratio", "task_peak_rss_ratio"} <= g.keys()
    summary = [d for d in lines if d.get("step") == "summary"]
    assert len(summary) == 2 and all(0 < d["coverage"] <= 1 and d["purity"] > 0.3 for d in summary)


def plan(capsys, *args) -> dict:
    plan_scale.main([*args, "--json"])
    return json.loads(capsys.readouterr().out)


@pytest.mark.ray
def test_the_planner_plans_imagenet_from_the_rehearsal_and_names_what_bounds_it(rehearsal, capsys, tmp_path):
    _, out = rehearsal
    extra = tmp_path / "bench.jsonl"
    evals = [{"bench": "eval", "n": n, "wall_s": 1.0, "labels_s": n / 1e4, "stats_s": n / 1e4, "retrieval_s": 0.8,
              "queries": 100, "gallery": 900, "peak_rss_mb": 500} for n in (1000, 4000)]  # bench_eval's shape
    extra.write_text("not json\n" + "".join(json.dumps(d) + "\n" for d in evals))
    plan_scale.main(["--measured", str(out), str(extra)])
    text = capsys.readouterr().out
    assert "bounded by:" in text and "clustering: svm_round1" in text and "measured: r.jsonl:" in text
    p = plan(capsys, "--measured", str(out), str(extra))
    assert p["patches"] == 1281167 * 10  # imagenet.yaml's patches per image
    assert p["bounding_stage"] in p["stage_totals_s"]
    assert p["stage_totals_s"][p["bounding_stage"]] == max(p["stage_totals_s"].values())
    rows = {r["stage"]: r for r in p["rows"]}
    e = load_config(CONFIG_DIR / "imagenet.yaml").eval
    retrieval = 0.8 * (e.queries_per_class * 1000 * e.gallery_max * e.repeats) / (100 * 900 * 2)
    assert rows["evaluation"]["time_s"] == pytest.approx(2e-4 * p["patches"] + retrieval, rel=1e-6)
    assert p["skipped_lines"] == 1
    for r in p["rows"]:
        assert r["sources"] and all(s.split(":")[0] in ("measured", "assumed", "config", "not measured")
                                    or s[0].isdigit() or s.startswith("members") for s in r["sources"]), r


@pytest.mark.ray
def test_the_plan_scales_with_the_cluster(rehearsal, capsys):
    _, out = rehearsal
    images = ["--images", str(1024 * 1000)]  # 1,024 shards of imagenet.yaml's 1,000 images: 2 waves, then 1
    small = {r["stage"]: r for r in plan(capsys, "--measured", str(out), "--nodes", "8", *images)["rows"]}
    large = {r["stage"]: r for r in plan(capsys, "--measured", str(out), "--nodes", "16", *images)["rows"]}
    # CPU-bound over many tasks: twice the cores, half the time (bytes over twice the links too)
    assert large["init features"]["time_s"] == pytest.approx(small["init features"]["time_s"] / 2, rel=0.01)
    # the GPU-bound SVM rounds over 30 blocks: 64 GPUs already run them all at once
    assert large["clustering: svm_round2"]["time_s"] == pytest.approx(small["clustering: svm_round2"]["time_s"],
                                                                       rel=0.01)
    # the members' decoding spreads over the cores, their assembly (one task) does not
    assert small["member pixels"]["time_s"] / 2 < large["member pixels"]["time_s"] < small["member pixels"]["time_s"]
    # the config's 8 training GPUs do not get faster with more nodes
    assert large["training (per round)"]["time_s"] == small["training (per round)"]["time_s"]


@pytest.mark.ray
def test_reproduce_predicts_the_large_size_from_the_small_one(rehearsal, capsys):
    _, out = rehearsal
    plan_scale.main(["--reproduce", str(out), "--json"])
    r = json.loads(capsys.readouterr().out)
    assert r["fitted_on_n"] == [3000] and r["predicted_n"] == 6000 and "proportional" in r["model"]
    assert [s["step"] for s in r["steps"]] == STEPS
    for s in r["steps"]:
        assert s["predicted_cpu_s"] > 0 and np.isfinite(s["cpu_error"]) and np.isfinite(s["wall_error"])


def test_reproduce_with_three_sizes_fits_the_per_task_cost(tmp_path, capsys):
    lines = [{"rehearsal": "cluster", "step": "svm_round1", "n": n, "clusters_in": n // 100, "units": n * (n // 100),
              "tasks": max(1, n // 1000), "cpu_s": 0.5 * max(1, n // 1000) + 2e-6 * n * (n // 100) + 0.1,
              "task_cpu_s": 0.5 * max(1, n // 1000) + 2e-6 * n * (n // 100), "wall_s": 1.0, "bytes_read": n * 512,
              "peak_rss_mb": 800, "task_peak_rss_mb": 900, "cpus": 2} for n in (2000, 4000, 8000)]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in lines))
    plan_scale.main(["--reproduce", str(path), "--json"])
    r = json.loads(capsys.readouterr().out)
    (s,) = r["steps"]
    assert r["fitted_on_n"] == [2000, 4000] and abs(s["cpu_error"]) < 0.05  # a + b x units recovers both terms


def test_the_coverage_fold_is_the_same_in_any_order_and_bounded_slices_change_nothing(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(900, 8)).astype(np.float16)
    w, b = rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    spans = [np.arange(lo, min(lo + 200, 900)) for lo in range(0, 900, 200)]
    parts = [cover_chunk(x, s, w, b, top_n=30, device="cpu") for s in spans]
    whole = merge_chunks(parts, top_n=30)
    fold = CoverFold(30)
    for i in reversed(range(len(parts))):
        part = dict(parts[i])
        fold.add(i, part)
        assert part == {}  # nothing left for the mapper's list of results to hold
    got = fold.result()
    for key in ("best", "best_score", "top_score", "top_index"):
        np.testing.assert_array_equal(got[key], whole[key])
    scores = x.astype(np.float32) @ w.T + b
    np.testing.assert_allclose(whole["top_score"], -np.sort(-scores, axis=0)[:30].T, rtol=1e-5)
    one = cover_chunk(x, np.arange(900), w, b, top_n=30, device="cpu")
    monkeypatch.setattr(cover, "SCORE_BUDGET", 5 * 7)  # slices of 256 rows (the floor), not one of 900
    sliced = cover_chunk(x, np.arange(900), w, b, top_n=30, device="cpu")
    for key in ("best", "top_index"):
        np.testing.assert_array_equal(sliced[key], one[key])
    np.testing.assert_allclose(sliced["top_score"], one["top_score"], rtol=1e-6)
