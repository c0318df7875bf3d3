"""End to end: `transfer/voc07.py` on a tiny generated VOC tree, and its one-line errors."""
import json

import pytest

from tests.transfer.fixtures import trained_like_trunk, write_final
from transfer import voc07
from transfer.synthetic import make_voc

TINY = ["train.iterations=6", "train.checkpoint_every=3", "train.log_every=2", "train.scale_px=128",
        "train.max_size_px=200", "train.loader_workers=0", "model.fc_dim=32", "proposals.max_side_px=160",
        "proposals.max_boxes=200", "test.figure_images=2", "tracking.wandb=disabled", "ray.num_cpus=2"]


@pytest.fixture(scope="module")
def tiny_voc(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc"), trainval=6, test=3, seed=0)


@pytest.mark.ray
@pytest.mark.slow
def test_a_short_run_writes_results_and_reruns_nothing(tmp_path, tiny_voc, capsys):
    ckpt = write_final(tmp_path / "final.safetensors", trained_like_trunk())
    args = ["--ckpt", str(ckpt), "--voc", str(tiny_voc), "--run-dir", str(tmp_path / "run"),
            "--set", f"run.root={tmp_path}", *[a for s in TINY for a in ("--set", s)]]
    assert voc07.main(args) == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert set(results["ap"]) >= {"cat", "person"} and 0.0 <= results["map"] <= 1.0
    assert results["init"] == "pretrained" and results["timing"]["test_images"] == 3
    for name in ("results.md", "detector.safetensors", "figures/pr_curves.png", "figures/detections.png",
                 "data/train.npz", "data/test.npz", "train/metrics.jsonl", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert "mAP" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    # the proposals cache sits beside the run, and a rerun redoes nothing
    assert any((tmp_path / "proposals").rglob("chunk-*.npz"))
    stamp = (run / "results.json").stat().st_mtime_ns
    assert voc07.main(args) == 0
    assert (run / "results.json").stat().st_mtime_ns == stamp
    # another schedule in the same directory: a new training run, with a log of its own
    assert voc07.main([*args, "--set", "train.iterations=4"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4] and json.loads((run / "results.json").read_text())["iterations"] == 4


def test_bad_inputs_fail_in_one_line_before_anything_is_written(tmp_path, tiny_voc, capsys):
    trunk = trained_like_trunk()
    broken = write_final(tmp_path / "broken.safetensors", trunk, drop="bn4.running_var")
    run_dir = tmp_path / "run"
    cases = [
        (["--ckpt", str(broken), "--voc", str(tiny_voc)], "missing bn4.running_var"),
        (["--ckpt", str(tmp_path / "nope.safetensors")], "weights file not found"),
        (["--init", "pretrained"], "needs --ckpt"),
        (["--init", "random", "--voc", str(tmp_path / "no-voc")], str(tmp_path / "no-voc")),
        (["--init", "random", "--set", "train.fg_iou=2"], "train.bg_iou/fg_iou"),
        (["--init", "random", "--set", "train.nope=1"], "unknown config key 'train.nope'"),
    ]
    for argv, message in cases:
        assert voc07.main([*argv, "--run-dir", str(run_dir)]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not run_dir.exists()


@pytest.mark.ray
@pytest.mark.slow
def test_checkpoint_and_run_directory_in_a_bucket(tmp_path, tiny_voc, bucket, capsys):
    from infra import storage

    ckpt = f"{bucket}/runs/demo/final.safetensors"
    storage.put_file(write_final(tmp_path / "final.safetensors", trained_like_trunk()), ckpt)
    run = f"{bucket}/transfer/demo"
    args = ["--ckpt", ckpt, "--voc", str(tiny_voc), "--run-dir", run, "--set", f"run.root={tmp_path}",
            *[a for s in TINY for a in ("--set", s)]]
    assert voc07.main(args) == 0
    results = json.loads(storage.to_path(f"{run}/results.json").read_text())
    assert results["ckpt"] == ckpt and 0.0 <= results["map"] <= 1.0
    for name in ("detector.safetensors", "manifest.json", "train/metrics.jsonl", "figures/pr_curves.png"):
        assert storage.size_of(f"{run}/{name}"), name
    assert "mAP" in capsys.readouterr().out
    manifest = storage.to_path(f"{run}/manifest.json").read_text()
    assert voc07.main(args) == 0  # a rerun skips every stage: its record is not rewritten
    assert storage.to_path(f"{run}/manifest.json").read_text() == manifest
    assert not any(tmp_path.glob("**/s3:"))
