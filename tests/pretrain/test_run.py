"""End-to-end runs of `pretrain/run.py`, as a user runs it (a subprocess on a local Ray instance)."""
import json

import pytest

from infra.layout import RunLayout
from tests.conftest import TOY_RUN, run_cli

pytestmark = pytest.mark.ray

SMALL = TOY_RUN


def test_demo_run_builds_shards_then_skips_them_and_keeps_its_files_on_a_bad_rerun(tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli(["pretrain/run.py", "--run-dir", str(run_dir), *SMALL])
    assert first.returncode == 0, first.stderr
    assert "stage shard: running (not run yet)" in first.stderr
    for stage in ("train_round0", "hash_k16", "eval"):
        assert f"stage {stage}: running (not run yet)" in first.stderr
    assert RunLayout(run_dir).final.is_file() and RunLayout(run_dir).final_codes.is_file()
    assert RunLayout(run_dir).figure("attributes_k16").is_file()
    manifest = json.loads(RunLayout(run_dir).manifest.read_text())
    outputs = manifest["stages"]["shard"]["outputs"]
    assert "shards/shards.json" in outputs and len(outputs) == 5  # 19 photos / 5 per shard = 4 tars + index
    assert RunLayout(run_dir).config.is_file() and RunLayout(run_dir).figure("patches").is_file()
    assert any((run_dir / "wandb").glob("offline-run-*"))  # real W&B, offline
    ran = manifest["stages"]["train_round0"]  # the recipe (hashed) and what it ran on (recorded)
    assert ran["config"]["global_batch"] == 16 and "num_workers" not in ran["config"]
    res = ran["resources"]
    assert (res["num_workers"], res["batch_size_per_worker"]) == (1, 16)
    assert res["lr"] == pytest.approx(0.01 * 16 / 64)  # train.lr at lr_base_batch 64, scaled linearly to 16

    second = run_cli(["pretrain/run.py", "--run-dir", str(run_dir), *SMALL])
    assert second.returncode == 0, second.stderr
    for stage in ("shard", "features", "cluster_round0", "train_round0", "hash_k16", "eval"):
        assert f"stage {stage}: up to date, skipped" in second.stderr
    assert json.loads(RunLayout(run_dir).manifest.read_text())["stages"] == manifest["stages"]

    changed = run_cli(["pretrain/run.py", "--run-dir", str(run_dir), *SMALL, "--set", "data.jpeg_quality=80"])
    assert changed.returncode == 0 and "stage shard: running (config changed)" in changed.stderr
    assert "stage features: running (inputs changed)" in changed.stderr  # a redo propagates
    assert "stage cluster_round0: running (inputs changed)" in changed.stderr
    metrics = [json.loads(x) for x in RunLayout(run_dir).metrics.read_text().splitlines()]
    assert [m["skipped"] for m in metrics if m.get("stage") == "shard"] == [False, True, False]
    assert sum(m.get("image") == "shard/patches" for m in metrics) == 3

    # a bad rerun of the existing run directory loses nothing already written
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    bad = run_cli(["pretrain/run.py", "--run-dir", str(run_dir), *SMALL, "--set", "data.source=/no/such/dir"])
    assert bad.returncode == 2
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before


def test_bad_key_and_missing_source_fail_in_one_line_and_write_nothing(tmp_path):
    bad = run_cli(["pretrain/run.py", "--run-dir", str(tmp_path / "a"), "--set", "data.nope=1"])
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("error: unknown config key 'data.nope'; valid keys: run.name")
    missing = run_cli(["pretrain/run.py", "--run-dir", str(tmp_path / "b"), "--set", f"data.source={tmp_path}/x"])
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"error: source not found: {tmp_path}/x"]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_help_lists_config_keys():
    out = run_cli(["pretrain/run.py", "--help"])
    assert out.returncode == 0 and "data.patches_per_image" in out.stdout and "--set KEY=VALUE" in out.stdout


def test_grid_places_every_image():
    import numpy as np

    from pretrain.figures import grid

    imgs = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (10, 20, 30)])
    g = grid(imgs, cols=2, pad_px=1)
    assert g.shape == (9, 9, 3)
    assert g[0, 0, 0] == 10 and g[0, 5, 0] == 20 and g[5, 0, 0] == 30 and g[5, 5, 0] == 255


def test_prebuilt_shards_dir_is_recorded_and_checked(tmp_path, shard_dir):
    run_dir = tmp_path / "run"
    base = ["pretrain/run.py", "--run-dir", str(run_dir), *SMALL, "--set", "tracking.wandb=disabled"]
    ok = run_cli([*base, "--set", f"data.shards_dir={shard_dir}", "--set", "data.patch_size_px=32",
                  "--set", "train.arch=alexnet32"])
    assert ok.returncode == 0, ok.stderr
    assert "shards: 60 patches in 3 shards" in ok.stderr and not RunLayout(run_dir).shards.exists()
    rec = json.loads(RunLayout(run_dir).manifest.read_text())["stages"]["shard"]
    assert rec["config"]["shards_dir"] == str(shard_dir.resolve()) and rec["inputs"]["shards"]
    wrong = run_cli([*base, "--set", f"data.shards_dir={shard_dir}"])
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines() == [
        "error: data.shards_dir holds 32px patches but data.patch_size_px is 96"]
    arch = run_cli([*base, "--set", f"data.shards_dir={shard_dir}", "--set", "data.patch_size_px=32"])
    assert arch.returncode == 2
    assert arch.stderr.strip().splitlines() == [
        "error: train.arch alexnet96 takes 96px patches but data.patch_size_px is 32"]


def test_cluster_runs_need_an_absolute_run_dir_and_one_driver_per_dir(tmp_path):
    rel = run_cli(["pretrain/run.py", "--run-dir", "runs/x"], env_extra={"RAY_ADDRESS": "127.0.0.1:1"})
    assert rel.returncode == 2 and "must be an absolute shared path" in rel.stderr
    from infra.rundir import RunDir

    held = RunDir(tmp_path / "busy")
    held.lock()
    busy = run_cli(["pretrain/run.py", "--run-dir", str(tmp_path / "busy")])
    held.unlock()
    assert busy.returncode == 2 and busy.stderr.strip().splitlines()[-1].startswith("error: run directory")
    assert "in use by another run" in busy.stderr


def check_digits_run(run_dir):
    """What a run of the digits config at toy size (stages 3-5) must hold: shards -> HOG features ->
    clusters scored against the labels -> ... -> the retrieval table. The ablation test's `ours` run is
    such a run (tests/pretrain/test_ablation.py), so it is checked there rather than run again here."""
    import numpy as np

    with np.load(RunLayout(run_dir).clusters(0), allow_pickle=False) as z:
        c = len(z["offsets"]) - 1
        assert z["member_index"].shape == z["member_key"].shape == z["member_score"].shape
        assert z["weights"].shape == (c, 32) and z["bias"].shape == z["rank_score"].shape == (c,)
        assert np.all(np.diff(z["rank_score"]) <= 0)  # best cluster first
        assert z["member_key"][0].startswith("digits/")
    summary = json.loads(RunLayout(run_dir).cluster_summary(0).read_text())
    assert summary["clusters"] == c and summary["purity"] > 0.8 and 0 < summary["nmi"] <= 1
    assert RunLayout(run_dir).figure("clusters_round0").is_file()
    assert not RunLayout(run_dir).cluster_work(0).exists()
    rows = json.loads(RunLayout(run_dir).retrieval.read_text())["results"]
    assert {r["method"] for r in rows} == {"ours", "LSH", "PCAH", "ITQ", "SH"} and all(0 < r["map"] <= 1 for r in rows)
    assert RunLayout(run_dir).figure("retrieval_k16").is_file()
    # codes that carry information: every bit splits the patches, and most patches get a code of their own
    # (codes thresholded at another mode's mean once collapsed to 3 distinct values here, at chance mAP)
    codes = np.unpackbits(np.load(RunLayout(run_dir).final_codes), axis=1)
    share = codes.mean(0)
    assert codes.shape == (1797, 16) and share.min() > 0.15 and share.max() < 0.85, share
    assert len(np.unique(np.load(RunLayout(run_dir).final_codes), axis=0)) > 500
    stats = json.loads((run_dir / "eval" / "codes.json").read_text())["16"]
    assert stats["balance_dev"] < 0.15
    ours = next(r for r in rows if r["method"] == "ours")
    assert ours["map"] > 0.2  # chance is about 0.1 (ten digits), where the collapsed codes were; this toy run: 0.29


def test_gpu_tasks_without_gpus_and_impossible_features_fail_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = run_cli(["pretrain/run.py", "--run-dir", str(tmp_path / "run"), *SMALL, "--set", "cluster.gpus_per_task=1",
                   "--set", "ray.num_cpus=1"])
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == ("error: cluster.gpus_per_task is 1.0 but no node of the Ray cluster "
                                                   "has that many GPUs (most on one node: 0); 0 runs the SVMs on CPUs")
    hog = run_cli(["pretrain/run.py", "--config", "pretrain/configs/digits.yaml", "--run-dir", str(tmp_path / "d"),
                   "--set", "features.hog_cell_px=32", "--set", "tracking.wandb=disabled", "--set", "ray.num_cpus=1"])
    assert hog.returncode == 2 and hog.stderr.strip().splitlines()[-1].startswith("error: features: cell_px must be")
